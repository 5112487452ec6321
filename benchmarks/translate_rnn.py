"""RNN translation benchmark: our own LSTM and GRU translators with attention, seqserve against the PyTorch reference.

Each model is trained here for a few steps (models/synthetic.py's letter-reversal task; the weights only need to be ours
and fixed), exported with `export_checkpoint`, and run on the same sources by:
  seqserve-inproc   the server's Translator (server/translation.py) on the exported version, tokenization included;
  torch-reference   models/decoding.py `greedy_decode` on the checkpoint's torch model (eval, no_grad), same threads,
                    tokenization included.
Workloads: batch 1 and batch 32 sources of ~20 tokens, greedy (the torch reference has no beam search); throughput is
target tokens per second, and the outputs of both are compared.

    python -m benchmarks.translate_rnn --threads 2 --json benchmarks/results/translate_rnn.json
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from benchmarks.common import Results, Row, base_arguments, load_in_process, setup, timed_interleaved
from benchmarks.translate_transformer import InProcess

log = logging.getLogger("benchmarks.translate_rnn")


def build(args: argparse.Namespace, arch: str) -> tuple[Path, Path]:
    """(checkpoint folder, exported version folder) of one architecture, built once into the work folder."""
    from seqserve.export.pipeline import export_checkpoint
    from seqserve.models.synthetic import tiny_translator
    from seqserve.server.repository import ModelRepository

    tag = f"{arch}-h{args.hidden}-l{args.layers}"
    checkpoint = args.work / "rnn" / tag
    if not (checkpoint / "model.safetensors").is_file():
        tiny_translator(checkpoint, arch=arch, hidden_size=args.hidden, embed_size=args.hidden, layers=args.layers,
                        steps=args.steps, validate_every=args.steps, max_len=48, seed=1)  # fmt: skip
    repo = args.work / "rnn_repository"
    if tag not in (ModelRepository(repo).models() if repo.is_dir() else {}):
        export_checkpoint(checkpoint, repo, tag)
    return checkpoint, repo / tag / "1"


def main(argv: list[str] | None = None) -> int:
    parser = base_arguments(__doc__.splitlines()[0])
    parser.add_argument("--archs", nargs="+", default=["lstm", "gru"], help="RNN architectures to train and run")
    parser.add_argument("--hidden", type=int, default=256, help="hidden (and embedding) size of the translators")
    parser.add_argument("--layers", type=int, default=2, help="encoder and decoder layers")
    parser.add_argument("--steps", type=int, default=150, help="training steps of each translator")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32], help="sentences per call")
    parser.add_argument("--source-tokens", type=int, default=20, help="letters per source sentence")
    args = parser.parse_args(argv)
    if args.quick:
        args.hidden, args.layers, args.steps, args.batches, args.source_tokens = 32, 1, 5, [1, 4], 6
    setup(args)
    import torch

    from seqserve.models.checkpoint import load_checkpoint
    from seqserve.models.decoding import greedy_decode
    from seqserve.models.synthetic import reversal_pairs

    torch.set_num_threads(args.threads)
    results = Results("Translate, RNN: our translators (target tokens/s)", "seqserve-inproc")
    notes: list[str] = []
    for arch in args.archs:
        checkpoint_dir, version_dir = build(args, arch)
        ckpt = load_checkpoint(checkpoint_dir)
        model, config = ckpt.model.eval(), ckpt.config
        source_tok, target_tok = ckpt.tokenizers["source"], ckpt.tokenizers["target"]
        inproc = InProcess(load_in_process(version_dir, args.threads))
        max_new = 2 * args.source_tokens + 4

        def reference(texts: list[str]) -> list[list[int]]:
            ids = [source_tok.encode(t).ids for t in texts]
            longest = max(map(len, ids))
            src = torch.tensor([r + [config.pad_id] * (longest - len(r)) for r in ids])  # (B, S)
            with torch.no_grad():
                out = greedy_decode(model, src, src == config.pad_id, max_new, config.bos_id, config.eos_id)
            rows = [[i for i in r if i != config.pad_id] for r in out.tolist()]
            rows = [r[: r.index(config.eos_id)] if config.eos_id in r else r for r in rows]
            target_tok.decode_batch(rows, skip_special_tokens=True)
            return rows

        for batch in args.batches:
            texts = [s for s, _ in reversal_pairs(batch, seed=batch, min_len=args.source_tokens - 2,
                                                  max_len=args.source_tokens + 2)]  # fmt: skip
            workload = f"{arch} batch {batch} greedy"
            contenders = {"seqserve-inproc": lambda: inproc.translate(texts, 1, max_new),
                          "torch-reference": lambda: reference(texts)}  # fmt: skip
            timings = timed_interleaved(contenders, args.repeats, args.warmup)
            (seconds, ours), (their_seconds, theirs) = timings["seqserve-inproc"], timings["torch-reference"]
            results.add(Row(workload, "seqserve-inproc", sum(len(r.tokens) for r in ours), "tokens", seconds))
            results.add(Row(workload, "torch-reference", sum(map(len, theirs)), "tokens", their_seconds))
            same = sum(r.tokens == t for r, t in zip(ours, theirs))
            notes.append(f"{workload}: seqserve and the torch reference give identical tokens for {same} of "
                         f"{len(texts)} sentences")  # fmt: skip
    results.finish(args, notes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
