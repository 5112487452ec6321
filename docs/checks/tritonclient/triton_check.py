"""One-off check: Triton's own client (tritonclient[grpc], in a venv of its own: it needs protobuf < 7) against
`seqserve serve` on make serve's repository, its answers compared with seqserve.v1's. From the repository root:

    python3 -m venv /tmp/tcenv && /tmp/tcenv/bin/pip install 'tritonclient[grpc]' numpy
    PYTHONPATH=. .venv/bin/python docs/checks/tritonclient/triton_check.py model_repository /tmp/tcenv/bin/python
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from benchmarks.common import ServerProcess
from seqserve.clients import Client, DecodingOptions

repo, venv_python = Path(sys.argv[1]), sys.argv[2]
side = Path(__file__).with_name("triton_side.py")
with ServerProcess(repo, 2) as server, Client(server.address) as client:
    run = subprocess.run([venv_python, str(side), server.address], capture_output=True, text=True, check=True)
    got = json.loads(run.stdout)
    texts = ["Click the Save button.", "Opens the Print dialog."]
    reference = client.translate("en-de", texts, DecodingOptions(beam_size=4, length_penalty=0.6))
    print("tritonclient", got["tritonclient"])
    print("status", got["live"], got["ready"], got["model_ready"], got["unknown_ready"], got["server"])
    print("metadata sotu-bert", got["meta"])
    same = got["translation"] == [t.hypotheses[0].text for t in reference]
    close = np.allclose(got["score"], [t.hypotheses[0].score for t in reference], rtol=1e-6)
    print("translation", got["translation"], "same as v1:", same, "scores within 1e-6:", close, "id", got["id"])
    embedding = np.asarray(got["embedding"])
    diff = float(np.abs(embedding - client.encode("minilm-l6", texts)).max())
    print("embedding", embedding.shape, "max |diff| to v1", diff)
    pairs = [("We must balance the budget.", "The deficit grew."), ("Thank you.", "We act.")]
    nsp = client.score_next_sentence("sotu-bert", pairs)
    print("nsp", got["nsp"], "max |diff| to v1", float(np.abs(np.asarray(got["nsp"]) - nsp).max()))
    print("error", got["error"])
