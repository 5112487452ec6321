"""Runs in a venv with tritonclient[grpc] only: Triton's own client against seqserve's port; prints JSON.

    /tmp/tcenv/bin/python docs/checks/tritonclient/triton_side.py HOST:PORT
"""

import json
import sys
from importlib import metadata

import numpy as np
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException


def strings(name: str, values: list[str]) -> triton.InferInput:
    tensor = triton.InferInput(name, [len(values)], "BYTES")
    tensor.set_data_from_numpy(np.array([v.encode() for v in values], dtype=object))
    return tensor


client = triton.InferenceServerClient(sys.argv[1])
out = {
    "tritonclient": metadata.version("tritonclient"),
    "live": client.is_server_live(), "ready": client.is_server_ready(), "model_ready": client.is_model_ready("en-de"),
    "unknown_ready": client.is_model_ready("nope"), "server": client.get_server_metadata(as_json=True),
    "meta": client.get_model_metadata("sotu-bert", as_json=True),
}
texts = strings("text", ["Click the Save button.", "Opens the Print dialog."])
# parameters as tritonclient sends them: an int as int64_param, a float as double_param
result = client.infer("en-de", [texts], parameters={"beam_size": 4, "length_penalty": 0.6}, request_id="r1")
out["translation"] = [x.decode() for x in result.as_numpy("translation")]
out["score"] = result.as_numpy("score").tolist()
out["id"] = result.get_response().id
result = client.infer("minilm-l6", [texts], outputs=[triton.InferRequestedOutput("embedding")])
out["embedding"] = result.as_numpy("embedding").tolist()
pairs = [strings("text", ["We must balance the budget.", "Thank you."]),
         strings("text_pair", ["The deficit grew.", "We act."])]
result = client.infer("sotu-bert", pairs, outputs=[triton.InferRequestedOutput("is_next_probability")])
out["nsp"] = result.as_numpy("is_next_probability").tolist()
try:
    client.infer("en-de", [texts], parameters={"beam_size": 99})
except InferenceServerException as e:
    out["error"] = [e.status(), e.message()]
print(json.dumps(out))
