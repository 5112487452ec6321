# One-off (ninth round): v1_vs_open_inference.py for the translator only, the two contenders in the other order.
# PYTHONPATH=. python benchmarks/results/breakdown-ninth/v1_vs_open_inference_swapped.py - TRANSLATE_REPOSITORY
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


for repo, model, kind in ((Path(sys.argv[2]), "marian-small", "translate"),):
    with ServerProcess(repo, 2, ["--models", model]) as server, Client(server.address) as client, \
            grpc.insecure_channel(server.address) as channel:  # fmt: skip
        stub = v2_grpc.GRPCInferenceServiceStub(channel)
        text = ["the quick brown fox jumps over the lazy dog"]
        if kind == "encode":
            contenders = {"v1 Encode": lambda: client.encode(model, text),
                          "v2 ModelInfer": lambda: stub.ModelInfer(request(model, text))}
        else:
            options = DecodingOptions(max_output_tokens=20)
            contenders = {"v2 ModelInfer": lambda: stub.ModelInfer(request(
                              model, text, max_output_tokens=v2.InferParameter(int64_param=20))), "v1 Translate": lambda: client.translate(model, text, options)}
        for _ in range(3):
            t = timed_interleaved(contenders, 60, 5)
            print(model, " ".join(f"{k} {v[0] * 1e3:.2f} ms" for k, v in t.items()), flush=True)
