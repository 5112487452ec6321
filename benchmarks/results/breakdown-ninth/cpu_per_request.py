# One-off (ninth round): run from the repository root with PYTHONPATH=. ; see docs/benchmarks.md "Ninth round".
import sys, time, os, resource
from pathlib import Path
sys.path.insert(0, ".")
from benchmarks.common import ServerProcess, load_in_process
from benchmarks.translate_transformer import InProcess, sources_of_length
from seqserve.clients import Client, DecodingOptions
from tokenizers import Tokenizer
repo = Path("/tmp/seqserve-bench/translate_repository")
name = sys.argv[1] if len(sys.argv) > 1 else "marian-small"
tok = Tokenizer.from_file(str(repo / name / "1" / "source_tokenizer.json"))
texts = sources_of_length(tok, 1, 20, seed=1)
inproc = InProcess(load_in_process(repo / name / "1", 2))
N = 200
with ServerProcess(repo, 2, ["--models", name]) as server, Client(server.address) as client:
    opts = DecodingOptions(beam_size=1, max_output_tokens=20)
    for _ in range(20): client.translate(name, texts, opts); inproc.translate(texts, 1, 20)
    for rep in range(3):
        c0, w0 = time.process_time(), time.perf_counter()
        for _ in range(N): inproc.translate(texts, 1, 20)
        ci, wi = (time.process_time() - c0) / N, (time.perf_counter() - w0) / N
        s0, c0, w0 = server.cpu_seconds(), time.process_time(), time.perf_counter()
        for _ in range(N): client.translate(name, texts, opts)
        sg, cg, wg = (server.cpu_seconds() - s0) / N, (time.process_time() - c0) / N, (time.perf_counter() - w0) / N
        print(f"inproc wall {wi*1e3:.2f} cpu {ci*1e3:.2f} | grpc wall {wg*1e3:.2f} server cpu {sg*1e3:.2f} client cpu {cg*1e3:.2f}", flush=True)
