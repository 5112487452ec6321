"""Resident memory of a server across UnloadModel/LoadModel cycles, with the heap handed back after each unload
(server/manager.py release_freed_memory: gc.collect, then glibc's malloc_trim), with gc.collect alone, and with
nothing (as before: the unloaded version's objects left to the cyclic collector).

Each pass runs in a process of its own: a real server (ServerThread) on the repository given, N cycles of one model
through gRPC, VmRSS after each; then every model of the repository loaded and unloaded (no reload). Run from the
repository root:
    python docs/checks/unload-memory/check.py REPOSITORY MODEL [CYCLES]
"""

import subprocess
import sys

PASS = """
import gc, sys
import grpc
from seqserve.protos.v1 import seqserve_pb2 as pb, seqserve_pb2_grpc as pb_grpc
from seqserve.server import manager
from seqserve.server.config import ServerConfig
from seqserve.server.repository import ModelRepository
from seqserve.server.testing import ServerThread

root, model, cycles, mode = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
if mode == "nothing":  # as before: the unloaded version's objects wait for the cyclic collector
    manager.release_freed_memory = lambda: None
elif mode == "gc":  # collected at once, the heap not trimmed
    manager.release_freed_memory = gc.collect

def rss():
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmRSS")) // 1024

config = ServerConfig(port=0, metrics_port=None, models=(model,))
with ServerThread(config, ModelRepository(root)) as running, grpc.insecure_channel(running.address) as channel:
    models = pb_grpc.ModelsStub(channel)
    series = [rss()]
    for _ in range(cycles):
        models.UnloadModel(pb.UnloadModelRequest(model=pb.ModelSpec(name=model)), timeout=60)
        models.LoadModel(pb.LoadModelRequest(model=pb.ModelSpec(name=model)), timeout=60)
        series.append(rss())
    print(f"{mode:8s} MB after each cycle of {model}:", " ".join(map(str, series)))
with ServerThread(ServerConfig(port=0, metrics_port=None), ModelRepository(root)) as running, \
        grpc.insecure_channel(running.address) as channel:
    models, loaded = pb_grpc.ModelsStub(channel), rss()
    for name in ModelRepository(root).models():
        models.UnloadModel(pb.UnloadModelRequest(model=pb.ModelSpec(name=name)), timeout=60)
    print(f"{mode:8s} every model loaded {loaded} MB, all unloaded {rss()} MB")
"""

root, model = sys.argv[1], sys.argv[2]
cycles = sys.argv[3] if len(sys.argv) > 3 else "20"
for mode in ("nothing", "gc", "gc+trim"):
    done = subprocess.run([sys.executable, "-c", PASS, root, model, cycles, mode], capture_output=True, text=True)
    print(done.stdout.strip() or done.stderr[-2000:], flush=True)
