# One-off (ninth round): run from the repository root with PYTHONPATH=. ; see docs/benchmarks.md "Ninth round".
# With SORTED=1 the stages print in time order; NOFINISH=1 reaches the server (stamp_server.py): each sentence is
# then answered only when its batch ends. The answer-at-end runs:
# for v in '' 1 '' 1; do NOFINISH=$v SORTED=1 PYTHONPATH=. python benchmarks/results/breakdown-ninth/stamp_client_translate.py marian-small; done
import sys, time, json, subprocess, os, signal
from pathlib import Path
sys.path.insert(0, ".")
from benchmarks.common import free_port
from benchmarks.translate_transformer import sources_of_length
from seqserve.clients import Client, DecodingOptions
from tokenizers import Tokenizer
repo = Path("/tmp/seqserve-bench/translate_repository"); name = sys.argv[1]
tok = Tokenizer.from_file(str(repo / name / "1" / "source_tokenizer.json"))
texts = sources_of_length(tok, 1, 20, seed=1)
port = free_port()
p = subprocess.Popen([sys.executable, "benchmarks/results/breakdown-ninth/stamp_server.py", "/tmp/stamps.json", "serve", "--repository", str(repo), "--port", str(port),
    "--metrics-port", "-1", "--threads", "2", "--instances", "1", "--log-level", "WARNING", "--models", name], env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
time.sleep(6)
client = Client(f"127.0.0.1:{port}"); opts = DecodingOptions(beam_size=1, max_output_tokens=20)
for _ in range(30): client.translate(name, texts, opts)
p.send_signal(signal.SIGUSR1); time.sleep(1)
base = len(json.load(open("/tmp/stamps.json")))
mine = []
for _ in range(200):
    a = time.monotonic(); client.translate(name, texts, opts); b = time.monotonic(); mine.append((a, b)); time.sleep(0.002)
p.send_signal(signal.SIGUSR1); time.sleep(1); p.terminate(); p.wait()
st = json.load(open("/tmp/stamps.json"))[base:]
import statistics, bisect
times = [t for _, t in st]
rows = []
for a, b in mine:
    ev = [(w, t) for w, t in st if a <= t <= b]
    first = {}
    for w, t in ev: first.setdefault(w, t)
    rows.append({"client send": 0.0, **{w: (t - a) * 1e3 for w, t in first.items()}, "client recv": (b - a) * 1e3})
keys = ["client send", "served.translate in", "worker start", "run_batch in", "encode in", "encode out", "run_batch out", "finish call", "finish called", "resolve in loop", "resolve done", "served.translate out", "worker end", "client recv"]
prev = 0
if os.environ.get("SORTED"):
    keys = sorted((k for k in keys if any(k in r for r in rows)), key=lambda k: statistics.median(r[k] for r in rows if k in r))
for k in keys:
    v = statistics.median(r[k] for r in rows if k in r)
    print(f"{k:24s} {v:7.3f} ms  (+{v - prev:.3f})"); prev = v
