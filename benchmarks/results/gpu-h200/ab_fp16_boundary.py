# One-off A/B run on a lent H200 (not part of `python -m benchmarks`; kept with its results, ab_fp16_boundary.txt).
# Run from the repository root with onnxruntime-gpu: python ab_fp16_boundary.py OUT.txt. Its first run (the file's first
# six lines) looped batch (1, 32) x beam (1, 4); the second, this version, the order below.
"""Device A/B: the CUDA export with float16 state and memory at the graph boundary (now) against float32 there (the
sixth round's keep_io_types=True), same MarianMT small weights, same process, decoder state on the GPU for both."""
import json, sys, logging
from pathlib import Path
import onnx
sys.path.insert(0, ".")
import seqserve.export.pipeline as pl
from benchmarks.common import timed_interleaved
from benchmarks.marian_model import SIZES, build_marian_dir
from benchmarks.translate_transformer import InProcess, sources_of_length
from seqserve.export.hf_marian import export_hf_marian
from seqserve.server.repository import load_model, SessionOptions
from tokenizers import Tokenizer
logging.basicConfig(level=logging.WARNING)
dev = sys.argv[2] if len(sys.argv) > 2 else "cuda"
hf = Path("/tmp/bw/marian-small/hf")
if not (hf / "config.json").exists():
    build_marian_dir(hf, SIZES["small"])
repo = Path("/tmp/ab_repo")
new = export_hf_marian(hf, repo, "fp16-boundary", version=1, force=True, device=dev)
orig = pl._to_fp16
pl._to_fp16 = lambda graph, keep_io_types=True: orig(graph, True)
old = export_hf_marian(hf, repo, "fp32-boundary", version=1, force=True, device=dev)
pl._to_fp16 = orig
lines = []
def say(x):
    print(x, flush=True); lines.append(x); Path(sys.argv[1]).write_text("\n".join(lines) + "\n")
for label, path in (("fp16 boundary", new), ("fp32 boundary", old)):
    casts = sum(n.op_type == "Cast" for n in onnx.load(str(path / "decoder.onnx")).graph.node)
    m = json.loads((path / "manifest.json").read_text())
    say(f"{label}: decoder Casts {casts}, parity max {m['parity']['max_abs_diff']:.3g}, state dtype "
        f"{[t['dtype'] for t in m['graphs']['decoder']['inputs'] if t['name'] in m['decoder']['state']][:1]}")
ours = {label: InProcess(load_model(path, SessionOptions(provider=dev))) for label, path in
        (("fp16 boundary", new), ("fp32 boundary", old))}
tok = Tokenizer.from_file(str(new / "source_tokenizer.json"))
for batch, beam in ((32, 1), (32, 4), (1, 1), (32, 1), (32, 4), (1, 1)):
    texts = sources_of_length(tok, batch, 20, seed=batch)
    if True:
        res = timed_interleaved({k: (lambda o=o: o.translate(texts, beam, 20)) for k, o in ours.items()}, 10, 2)
        a, b = ([r.tokens for r in res[k][1]] for k in ours)
        same = sum(x == y for x, y in zip(a, b))
        say(f"batch {batch} beam {beam}: " + ", ".join(f"{k} {s * 1e3:.2f} ms" for k, (s, _) in res.items())
            + f"; fp32-boundary / fp16-boundary time {res['fp32 boundary'][0] / res['fp16 boundary'][0]:.2f}x;"
            f" same best hypothesis {same}/{len(texts)}")
