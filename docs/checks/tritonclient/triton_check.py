"""One-off check: Triton's own client (tritonclient[grpc], in a venv of its own: it needs protobuf < 7) against
`seqserve serve` on make serve's repository, its answers compared with seqserve.v1's.

    python3 -m venv /tmp/tcenv && /tmp/tcenv/bin/pip install 'tritonclient[grpc]' numpy
    PYTHONPATH=. .venv/bin/python docs/checks/tritonclient/triton_check.py model_repository /tmp/tcenv/bin/python
"""
import json, subprocess, sys
from pathlib import Path
sys.path.insert(0, ".")
import numpy as np
from benchmarks.common import ServerProcess
from seqserve.clients import Client, DecodingOptions
repo = Path(sys.argv[1]); venv_python = sys.argv[2]
with ServerProcess(repo, 2) as s, Client(s.address) as c:
    got = json.loads(subprocess.run([venv_python, str(Path(__file__).with_name("triton_side.py")), s.address], capture_output=True, text=True, check=True).stdout)
    texts = ["Click the Save button.", "Opens the Print dialog."]
    ref = c.translate("en-de", texts, DecodingOptions(beam_size=4, length_penalty=0.6))
    print("status", got["live"], got["ready"], got["model_ready"], got["unknown_ready"], got["server"])
    print("metadata sotu-bert", got["meta"])
    print("translation", got["translation"], "same as v1:", got["translation"] == [t.hypotheses[0].text for t in ref],
          "scores", np.allclose(got["score"], [t.hypotheses[0].score for t in ref], rtol=1e-6), "id", got["id"])
    emb = np.asarray(got["embedding"]); print("embedding", emb.shape, "max |diff| to v1", float(np.abs(emb - c.encode("minilm-l6", texts)).max()))
    nsp = c.score_next_sentence("sotu-bert", [("We must balance the budget.", "The deficit grew."), ("Thank you.", "We act.")])
    print("nsp", got["nsp"], "max |diff| to v1", float(np.abs(np.asarray(got["nsp"]) - nsp).max()))
    print("error", got["error"])
