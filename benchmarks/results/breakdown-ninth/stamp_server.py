"""One-off (ninth round): `seqserve serve` with wall-clock stamps (CLOCK_MONOTONIC, comparable across processes) at
each stage of a request, translate and encode; the stamps are written to argv[1] on SIGUSR1. With NOFINISH=1, a
translation is answered only when its batch ends (Batcher.finish does nothing). Started by the stamp_client_*.py
scripts: python stamp_server.py STAMPS.json serve --repository ... (the `seqserve` command's arguments)."""
import json
import os
import signal
import sys
import time

sys.path.insert(0, ".")
import seqserve.server.batcher as B  # noqa: E402
import seqserve.server.bert as BE  # noqa: E402
import seqserve.server.served as S  # noqa: E402
import seqserve.server.translation as T  # noqa: E402

STAMPS = []


def stamp(what):
    STAMPS.append((what, time.monotonic()))


def wrap(cls, name, before, after):
    orig = getattr(cls, name)
    if orig.__code__.co_flags & 0x80:  # a coroutine function

        async def wrapped(*a, **k):
            stamp(before)
            result = await orig(*a, **k)
            stamp(after)
            return result
    else:

        def wrapped(*a, **k):
            stamp(before)
            result = orig(*a, **k)
            stamp(after)
            return result

    setattr(cls, name, wrapped)


wrap(S.ServedModel, "translate", "served.translate in", "served.translate out")
wrap(S.ServedModel, "encode", "served.encode in", "served.encode out")
wrap(S.ServedModel, "_tokenize", "tokenize in", "tokenize out")
wrap(B.Batcher, "submit", "submit in", "submit out")
wrap(B.Batcher, "_run", "_run in", "_run out")
wrap(B.Batcher, "_execute", "worker start", "worker end")
wrap(B.Batcher, "_resolve", "resolve in loop", "resolve done")
if os.environ.get("NOFINISH"):
    B.Batcher.finish = lambda self, item: None
else:
    wrap(B.Batcher, "finish", "finish call", "finish called")
wrap(T.Translator, "run_batch", "run_batch in", "run_batch out")
wrap(T.OnnxStepModel, "encode", "encode in", "encode out")
wrap(BE.BertModel, "run_batch", "bert in", "bert out")
signal.signal(signal.SIGUSR1, lambda *_: json.dump(STAMPS, open(sys.argv[1], "w")))

from seqserve.cli import main  # noqa: E402

sys.exit(main(sys.argv[2:]))
