# One-off (ninth round): run from the repository root with PYTHONPATH=. ; see docs/benchmarks.md "Ninth round".
import sys, time, json, subprocess, os, signal, statistics
from pathlib import Path
sys.path.insert(0, ".")
from benchmarks.common import free_port
from seqserve.clients import Client
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
repo = Path("/tmp/seqserve-bench/encode_repository"); name = sys.argv[1]
texts = ["the quick brown fox jumps over the lazy dog"]
port = free_port()
p = subprocess.Popen([sys.executable, "benchmarks/results/breakdown-ninth/stamp_server.py", "/tmp/stamps_enc.json", "serve", "--repository", str(repo), "--port", str(port),
    "--metrics-port", "-1", "--threads", "2", "--instances", "1", "--log-level", "WARNING", "--models", name], env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
time.sleep(6)
client = Client(f"127.0.0.1:{port}")
hs = health_pb2_grpc.HealthStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
for _ in range(50): client.encode(name, texts)
p.send_signal(signal.SIGUSR1); time.sleep(1)
base = len(json.load(open("/tmp/stamps_enc.json")))
mine = []; hc = []
for _ in range(400):
    a = time.monotonic(); client.encode(name, texts); b = time.monotonic(); mine.append((a, b)); time.sleep(0.002)
    a = time.monotonic(); hs.Check(health_pb2.HealthCheckRequest(service="")); hc.append(time.monotonic() - a); time.sleep(0.002)
p.send_signal(signal.SIGUSR1); time.sleep(1); p.terminate(); p.wait()
st = json.load(open("/tmp/stamps_enc.json"))[base:]
rows = []
for a, b in mine:
    first = {}
    for w, t in st:
        if a <= t <= b: first.setdefault(w, t)
    rows.append({"client send": 0.0, **{w: (t - a) * 1e3 for w, t in first.items()}, "client recv": (b - a) * 1e3})
keys = ["client send", "served.encode in", "tokenize in", "tokenize out", "submit in", "_run in", "worker start", "bert in", "bert out", "worker end", "resolve in loop", "resolve done", "_run out", "submit out", "served.encode out", "client recv"]
prev = 0
for k in keys:
    vals = [r[k] for r in rows if k in r]
    if not vals: continue
    v = statistics.median(vals)
    print(f"{k:24s} {v:7.3f} ms  (+{v - prev:.3f})  n={len(vals)}"); prev = v
print("health check", statistics.median(hc) * 1e3)
