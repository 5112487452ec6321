# One-off (ninth round): resident memory of the decoder.onnx + greedy.onnx sessions, plain and with their common
# initializers handed to both as one set of OrtValues.
# python benchmarks/results/breakdown-ninth/shared_weights.py plain|share [VERSION_DIR]
import sys, onnx, numpy as np, onnxruntime as ort
from onnx import numpy_helper
sys.path.insert(0, ".")  # run from the repository root
from seqserve.server.repository import SessionOptions
def rss(): return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) / 1024
d = sys.argv[2] if len(sys.argv) > 2 else "model_repository/en-de/1/"  # make serve's en-de
mode = sys.argv[1]
def inits(path):
    m = onnx.load(path)
    out = {i.name: i for i in m.graph.initializer}
    def walk(g):
        for n in g.node:
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    for i in a.g.initializer: out[i.name] = i
                    walk(a.g)
    walk(m.graph)
    return out
dec, gr = inits(d + "decoder.onnx"), inits(d + "greedy.onnx")
common = [n for n in dec if n in gr and dec[n].raw_data == gr[n].raw_data and len(dec[n].raw_data) > 4096]
print(len(dec), len(gr), "common big", len(common), sum(len(dec[n].raw_data) for n in common) / 2**20, "MiB")
vals = {n: ort.OrtValue.ortvalue_from_numpy(numpy_helper.to_array(dec[n])) for n in common} if mode == "share" else {}
del dec, gr
import gc; gc.collect()
base = rss()
o = SessionOptions(intra_op_threads=1)
keep = []
for g in ("decoder.onnx", "greedy.onnx"):
    so = o.ort_options()
    for n, v in vals.items(): so.add_initializer(n, v)
    keep.append(ort.InferenceSession(d + g, sess_options=so, providers=["CPUExecutionProvider"]))
    print(g, f"+{rss() - base:.1f} MiB"); base = rss()
