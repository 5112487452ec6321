# One-off (ninth round): the gRPC path of HEAD against the seventh full run's code (92f4848, a git worktree at /tmp/old7 linked as /tmp/old7path/seqserve) at batch 32; PYTHONPATH=. python benchmarks/results/breakdown-ninth/grpc_head_vs_seventh.py marian-small-int8 32 1
import sys, os, subprocess
from pathlib import Path
sys.path.insert(0, "/work/main")
import benchmarks.common as bc
from benchmarks.common import ServerProcess, load_in_process, timed_interleaved
from benchmarks.translate_transformer import InProcess, sources_of_length
from seqserve.clients import Client, DecodingOptions
from tokenizers import Tokenizer
repo = Path("/tmp/seqserve-bench/translate_repository")
name, batch, beam = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
tok = Tokenizer.from_file(str(repo / name / "1" / "source_tokenizer.json"))
texts = sources_of_length(tok, batch, 20, seed=batch)
inproc = InProcess(load_in_process(repo / name / "1", 2))
new = ServerProcess(repo, 2, ["--models", name])
os.environ["PYTHONPATH"] = "/tmp/old7path"
old = ServerProcess(repo, 2, ["--models", name])
del os.environ["PYTHONPATH"]
with new, old, Client(new.address) as cn, Client(old.address) as co:
    opts = DecodingOptions(beam_size=beam, max_output_tokens=20)
    c = {"inproc": lambda: inproc.translate(texts, beam, 20), "grpc HEAD": lambda: cn.translate(name, texts, opts),
         "grpc 92f4848": lambda: co.translate(name, texts, opts)}
    for rep in range(3):
        t = timed_interleaved(c, 10, 2)
        print(" ".join(f"{k} {v[0]*1e3:.1f}ms" for k, v in t.items()), flush=True)
