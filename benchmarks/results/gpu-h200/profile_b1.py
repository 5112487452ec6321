# One-off profile run on a lent H200 at bfc7276 (not part of `python -m benchmarks`), kept with its output
# profile_b1.json: python profile_b1.py OUT.json [cuda|cpu], from the repository root, with onnxruntime-gpu.
# At bfc7276 the bound run was OnnxStepModel._run_bound; it is _run since 429f4c5 (same behaviour).
"""Device one-off: where a batch-1 greedy decode of MarianMT small spends its time on CUDA (device state)."""
import json, statistics, sys, time, traceback
from pathlib import Path
import numpy as np, onnxruntime as ort
sys.path.insert(0, ".")
from benchmarks.marian_model import SIZES, build_marian_dir
from benchmarks.translate_transformer import sources_of_length
from seqserve.export.hf_marian import export_hf_marian
from seqserve.server.repository import load_model, SessionOptions
from seqserve.server.translation import Translator, DecodeOptions
from tokenizers import Tokenizer
out = Path(sys.argv[1]); report = {}; DEV = sys.argv[2] if len(sys.argv) > 2 else "cuda"
def say(k, v):
    report[k] = v; print(k, v, flush=True); out.write_text(json.dumps(report, indent=1))
hf = Path("/tmp/bw/marian-small/hf")
if not (hf / "config.json").exists():
    build_marian_dir(hf, SIZES["small"])
t = time.time(); path = export_hf_marian(hf, "/tmp/prof_repo", "m", version=1, force=True, device=DEV); say("export_s", round(time.time() - t, 1))
opts = SessionOptions(provider=DEV)
loaded = load_model(path, opts)
tok = Tokenizer.from_file(str(path / "source_tokenizer.json"))
text = sources_of_length(tok, 1, 20, seed=1)
def decode(tr, texts, beam=1):
    jobs = [tr.job(tr.codec.encode(x).ids, DecodeOptions(beam_size=beam, max_output_tokens=20)) for x in texts]
    return tr.run_batch(jobs, stopped=lambda i: False, on_step=lambda r: None, on_done=lambda i: None)
def med(fn, n=20, w=5):
    for _ in range(w): fn()
    ts = []
    for _ in range(n):
        s = time.perf_counter(); fn(); ts.append(time.perf_counter() - s)
    return round(statistics.median(ts) * 1e3, 3)
tr = Translator.for_model(loaded); sm = tr.step_model
say("steps", decode(tr, text))
say("b1_greedy_ms", med(lambda: decode(tr, text)))
# time in each StepModel method during one decode
acc = {}
for name in ("encode", "step_top_k", "step", "gather_rows"):
    f = getattr(sm, name)
    def wrap(*a, f=f, name=name, **k):
        s = time.perf_counter(); r = f(*a, **k); acc.setdefault(name, []).append(time.perf_counter() - s); return r
    setattr(sm, name, wrap)
decode(tr, text); acc.clear(); decode(tr, text)
say("per_method_ms", {k: [len(v), round(sum(v) * 1e3, 3)] for k, v in acc.items()})
for name in ("encode", "step_top_k", "step", "gather_rows"):
    setattr(sm, name, getattr(type(sm), name).__get__(sm))
# the decoder's run alone at cache length 10: bound OrtValues vs numpy feeds
try:
    src = np.asarray([tok.encode(text[0]).ids]); mask = np.zeros(src.shape, bool)
    memory, state = sm.encode(src, mask)
    prev = np.array([sm.bos_id]); cm = np.zeros((1, 0), bool)
    for i in range(10):
        v, ids, state = sm.step_top_k(prev, mask, memory, state, 1, cache_mask=cm)
        prev = ids[:, 0].copy(); cm = np.zeros((1, i + 1), bool)
    feeds = sm._feeds(prev, mask, memory, state, 1, cm)
    say("decoder_bound_run_us", med(lambda: sm._run(sm.decoder, feeds, ["topk_log_probs", "topk_ids"], sm._new_state), 200, 20) * 1e3)
    host = {k: (x.numpy() if isinstance(x, ort.OrtValue) else x) for k, x in feeds.items()}
    say("decoder_numpy_run_us", med(lambda: sm.decoder.run(["topk_log_probs", "topk_ids", *sm._new_state], host), 200, 20) * 1e3)
    b = sm.decoder.io_binding()
    for k, x in feeds.items():
        b.bind_ortvalue_input(k, x) if isinstance(x, ort.OrtValue) else b.bind_cpu_input(k, x)
    for n in ["topk_log_probs", "topk_ids", *sm._new_state]:
        b.bind_output(n, sm.device, 0)
    say("decoder_all_on_device_reused_binding_us", med(lambda: sm.decoder.run_with_iobinding(b), 200, 20) * 1e3)
    # profiled session: host-side time of each node against the run
    so = opts.ort_options(); so.enable_profiling = True; so.profile_file_prefix = "/tmp/prof_dec"
    ps = ort.InferenceSession(str(path / "decoder.onnx"), so, providers=opts.providers())
    pb = ps.io_binding()
    for k, x in feeds.items():
        pb.bind_ortvalue_input(k, x) if isinstance(x, ort.OrtValue) else pb.bind_cpu_input(k, x)
    for n in ["topk_log_probs", "topk_ids"]: pb.bind_output(n, "cpu")
    for n in sm._new_state: pb.bind_output(n, sm.device, 0)
    for _ in range(30): ps.run_with_iobinding(pb)
    events = json.loads(Path(ps.end_profiling()).read_text())
    runs = [e["dur"] for e in events if e.get("name") == "model_run"][10:]
    nodes = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    ops = {}
    for e in nodes:
        key = (e["args"].get("op_name"), e["args"].get("provider"))
        ops.setdefault(key, []).append(e["dur"])
    n_runs = len([e for e in events if e.get("name") == "model_run"])
    say("profile_model_run_us_median", statistics.median(runs))
    say("profile_nodes_per_run", round(len(nodes) / n_runs, 1))
    say("profile_node_host_us_per_run", round(sum(e["dur"] for e in nodes) / n_runs, 1))
    say("profile_by_op", sorted([[f"{k[0]}@{(k[1] or '')[:4]}", len(v) // n_runs, round(sum(v) / n_runs, 1)] for k, v in ops.items()], key=lambda r: -r[2])[:25])
    other = sorted({e.get("name") for e in events if e.get("cat") == "Session"})
    say("session_events", other[:20])
    sess = [e for e in events if e.get("cat") == "Session" and e.get("name") != "model_run"]
    agg = {}
    for e in sess: agg.setdefault(e["name"], []).append(e["dur"])
    say("session_event_us_per_run", {k: round(sum(v) / n_runs, 1) for k, v in agg.items()})
except Exception:
    traceback.print_exc()
# beam at batch 1 and a CPU baseline in the same process
try:
    say("b1_beam4_ms", med(lambda: decode(tr, text, 4)))
    t32 = sources_of_length(tok, 32, 20, seed=32)
    say("b32_greedy_ms", med(lambda: decode(tr, t32), 10, 3))
except Exception:
    traceback.print_exc()
