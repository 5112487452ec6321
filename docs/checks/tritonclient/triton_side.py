"""Runs in a venv with tritonclient[grpc] only: Triton's own client against seqserve's port; prints JSON."""
import json, sys
import numpy as np
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException
c = triton.InferenceServerClient(sys.argv[1])
out = {"live": c.is_server_live(), "ready": c.is_server_ready(), "model_ready": c.is_model_ready("en-de"),
       "unknown_ready": c.is_model_ready("nope"), "server": c.get_server_metadata(as_json=True),
       "meta": c.get_model_metadata("sotu-bert", as_json=True)}
texts = ["Click the Save button.", "Opens the Print dialog."]
t = triton.InferInput("text", [2], "BYTES"); t.set_data_from_numpy(np.array([s.encode() for s in texts], dtype=object))
r = c.infer("en-de", [t], parameters={"beam_size": 4, "length_penalty": 0.6}, request_id="r1")  # an int and a float
out["translation"] = [x.decode() for x in r.as_numpy("translation")]
out["score"] = r.as_numpy("score").tolist()
out["id"] = r.get_response().id
r = c.infer("minilm-l6", [t], outputs=[triton.InferRequestedOutput("embedding")])
out["embedding"] = r.as_numpy("embedding").tolist()
p = triton.InferInput("text_pair", [2], "BYTES"); p.set_data_from_numpy(np.array([b"The deficit grew.", b"We act."], dtype=object))
a = triton.InferInput("text", [2], "BYTES"); a.set_data_from_numpy(np.array([b"We must balance the budget.", b"Thank you."], dtype=object))
r = c.infer("sotu-bert", [a, p], outputs=[triton.InferRequestedOutput("is_next_probability")])
out["nsp"] = r.as_numpy("is_next_probability").tolist()
try:
    c.infer("en-de", [t], parameters={"beam_size": 99})
except InferenceServerException as e:
    out["error"] = [e.status(), e.message()]
print(json.dumps(out))
