# One-off (ninth round): a batch-1 request over seqserve.v1 (the Python client) against the same over the Open Inference
# Protocol (raw stubs, raw BYTES contents as tritonclient sends them), same server, interleaved. From the repository root:
# PYTHONPATH=. python benchmarks/results/breakdown-ninth/v1_vs_open_inference.py ENCODE_REPOSITORY TRANSLATE_REPOSITORY
# With ENCODE_REPOSITORY '-', the translator alone; with SWAPPED=1, each pair of contenders in the other order.
import os
import struct
import sys
from pathlib import Path

import grpc

from benchmarks.common import ServerProcess, timed_interleaved
from seqserve.clients import Client, DecodingOptions
from seqserve.protos.inference import open_inference_pb2 as v2
from seqserve.protos.inference import open_inference_pb2_grpc as v2_grpc


def request(model: str, texts: list[str], **parameters) -> v2.ModelInferRequest:
    r = v2.ModelInferRequest(model_name=model, parameters=parameters)
    r.inputs.add(name="text", datatype="BYTES", shape=[len(texts)])
    r.raw_input_contents.append(b"".join(struct.pack("<I", len(t.encode())) + t.encode() for t in texts))
    return r


runs = [(Path(sys.argv[1]), "minilm", "encode")] if sys.argv[1] != "-" else []
for repo, model, kind in runs + [(Path(sys.argv[2]), "marian-small", "translate")]:
    with ServerProcess(repo, 2, ["--models", model]) as server, Client(server.address) as client, \
            grpc.insecure_channel(server.address) as channel:  # fmt: skip
        stub = v2_grpc.GRPCInferenceServiceStub(channel)
        text = ["the quick brown fox jumps over the lazy dog"]
        if kind == "encode":
            contenders = {"v1 Encode": lambda: client.encode(model, text),
                          "v2 ModelInfer": lambda: stub.ModelInfer(request(model, text))}
        else:
            options = DecodingOptions(max_output_tokens=20)
            contenders = {"v1 Translate": lambda: client.translate(model, text, options),
                          "v2 ModelInfer": lambda: stub.ModelInfer(request(
                              model, text, max_output_tokens=v2.InferParameter(int64_param=20)))}
        if os.environ.get("SWAPPED"):
            contenders = dict(reversed(contenders.items()))
        for _ in range(3):
            t = timed_interleaved(contenders, 60, 5)
            print(model, " ".join(f"{k} {v[0] * 1e3:.2f} ms" for k, v in t.items()), flush=True)
