# One-off (ninth round): the translate timeline with each sentence answered as it finishes (Batcher.finish, the
# server's way) and, with NOFINISH=1, only when its batch ends. From the repository root:
# for v in '' 1 '' 1; do NOFINISH=$v PYTHONPATH=. python benchmarks/results/breakdown-ninth/stamp_client_translate_answer_at_end.py marian-small; done
"""seqserve serve with wall-clock stamps (CLOCK_MONOTONIC, comparable across processes) at each stage of a request."""
import sys, time, json, signal, atexit
sys.path.insert(0, ".")
import seqserve.server.batcher as B, seqserve.server.served as S, seqserve.server.translation as T
STAMPS = []
def stamp(what): STAMPS.append((what, time.monotonic()))
def wrap(cls, name, before=None, after=None):
    orig = getattr(cls, name)
    if hasattr(orig, "__code__") and orig.__code__.co_flags & 0x80:  # coroutine
        async def w(*a, **k):
            stamp(before); r = await orig(*a, **k); stamp(after); return r
    else:
        def w(*a, **k):
            stamp(before); r = orig(*a, **k); stamp(after); return r
    setattr(cls, name, w)
wrap(S.ServedModel, "translate", "served.translate in", "served.translate out")
wrap(B.Batcher, "_execute", "worker start", "worker end")
import os
if os.environ.get("NOFINISH"):
    B.Batcher.finish = lambda self, item: None
else:
    wrap(B.Batcher, "finish", "finish call", "finish called")
wrap(B.Batcher, "_resolve", "resolve in loop", "resolve done")
wrap(T.Translator, "run_batch", "run_batch in", "run_batch out")
wrap(T.OnnxStepModel, "encode", "encode in", "encode out")
import seqserve.server.servicers as SV
orig_tr = SV.InferenceServicer.Translate
def dump(*_):
    json.dump(STAMPS, open(sys.argv[1], "w")); sys.exit(0)
signal.signal(signal.SIGUSR1, lambda *_: json.dump(STAMPS, open(sys.argv[1], "w")))
from seqserve.cli import main
sys.exit(main(sys.argv[2:]))
