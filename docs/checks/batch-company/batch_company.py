"""One-off (from the tenth session's server audit): how far a long greedy translation moves with its batch company.

    PYTHONPATH=. .venv/bin/python docs/checks/batch-company/batch_company.py MODEL_REPOSITORY [MODEL]

The same sentence greedy alone and beside others: a batch of another shape takes other kernel paths (and, alone, an
RNN's greedy.onnx Loop instead of the step graph), so the floating-point sums round differently, and over a ~100-token
decode that can tip a near tie. Beam search is compared too. Output (make serve's en-de of the ninth session, the
audit's sentence) recorded in output.txt.
"""

import random
import sys
from pathlib import Path

import grpc

from seqserve.protos.v1 import seqserve_pb2 as pb
from seqserve.protos.v1 import seqserve_pb2_grpc as pb_grpc
from seqserve.server.config import ServerConfig
from seqserve.server.repository import ModelRepository
from seqserve.server.testing import ServerThread

repository, model = Path(sys.argv[1]), (sys.argv[2] if len(sys.argv) > 2 else "en-de")
random.seed(5)
words = ("click the save button open print dialog select text format font list toolbar file table insert rows "
         "columns you need").split()
sources = []
for _ in range(60):  # the audit's 60 requests, their options drawn as it drew them so the sentences are the same
    sources.append(" ".join(random.choice(words) for _ in range(random.randint(1, 40))).capitalize() + ".")
    beam = random.choice([0, 1, 2, 3, 5, 8])
    random.choice([0, 0.6, 1.0]), random.randint(1, max(beam, 1))
    if random.random() < 0.3:
        random.randint(1, 20)
    if random.random() < 0.2:
        random.choice([0.5, 1.0, 2.0])
long = sources[54]  # the one of the 60 whose translation changed with its company
config = ServerConfig(port=0, metrics_port=None, models=(model,))
with ServerThread(config, ModelRepository(repository)) as running, grpc.insecure_channel(running.address) as channel:
    stub = pb_grpc.InferenceStub(channel)

    def translate(texts, beam=1):
        options = pb.DecodingOptions(beam_size=beam, return_token_scores=True)
        request = pb.TranslateRequest(model=pb.ModelSpec(name=model), texts=texts, options=options)
        return stub.Translate(request).translations[0]

    alone = translate([long]).hypotheses[0]
    print(f"source ({translate([long]).source_tokens} tokens): {long}")
    print(f"greedy alone: {len(alone.tokens)} tokens, score {alone.score:.4f}")
    for company in ["Hi.", "Click the Save button.", sources[3], sources[10], "x " * 60]:
        beside = translate([long, company]).hypotheses[0]
        differ = next((k for k, (a, b) in enumerate(zip(alone.tokens, beside.tokens)) if a != b), None)
        print(f"greedy beside {company[:28]!r:32s}: {len(beside.tokens)} tokens, score {beside.score:.4f}, "
              f"first differing token: {differ}")
    for beam in (2, 4):
        a, b = translate([long], beam).hypotheses[0], translate([long, "Hi."], beam).hypotheses[0]
        print(f"beam {beam} alone / beside 'Hi.': {len(a.tokens)} / {len(b.tokens)} tokens, "
              f"scores {a.score:.4f} / {b.score:.4f}")
