"""Transformer translation on a GPU: seqserve with onnxruntime's CUDA provider beside transformers on the same GPU.

    python -m benchmarks.translate_cuda --size small --threads 8 --json benchmarks/results/translate_cuda.json

Needs a GPU visible to torch and onnxruntime-gpu (refuses clearly otherwise). The MarianMT of benchmarks/marian_model.py
(random weights, built into --work) is exported twice with export_hf_marian: for CUDA (fp16, gated on the GPU) and
for the CPU (fp32). Contenders, one process, `timed_interleaved`: seqserve's Translator on the CUDA export (the
reference of the ratio column; decoder state kept on the GPU), the same with the state on the host between steps
(device_state=False, as before the gather graphs), the same on the CPU export with --threads threads (this machine's
CPU), and `transformers` `generate` on the GPU in fp32 and fp16, each tokenizing and detokenizing. Workloads as
benchmarks.translate_transformer's: batch 1 and 32 sources of ~20 tokens, 20 target tokens each, greedy and beam 4.
Not part of `python -m benchmarks` (no GPU there).
"""

from __future__ import annotations

import json
import logging

from benchmarks.common import Results, Row, setup, timed_interleaved
from benchmarks.marian_model import SIZES, build_marian_dir
from benchmarks.translate_transformer import (
    SOURCE_TOKENS, InProcess, generate_ids, sources_of_length, translation_arguments,
)

log = logging.getLogger("benchmarks.translate_cuda")


class NoGpu(RuntimeError):
    pass


def check_gpu() -> None:
    import onnxruntime as ort
    import torch

    if "CUDAExecutionProvider" not in ort.get_available_providers() or not torch.cuda.is_available():
        raise NoGpu(
            "benchmarks.translate_cuda needs a GPU visible to torch (torch.cuda.is_available() = "
            f"{torch.cuda.is_available()}) and onnxruntime-gpu's CUDAExecutionProvider (onnxruntime has: "
            f"{', '.join(ort.get_available_providers())})"
        )


def main(argv: list[str] | None = None) -> int:
    args = translation_arguments(__doc__.splitlines()[0], "small", argv)
    setup(args)
    try:
        check_gpu()
    except NoGpu as exc:
        log.error("%s", exc)
        return 2
    import torch
    from tokenizers import Tokenizer
    from transformers import MarianMTModel

    from seqserve.export.hf_marian import export_hf_marian
    from seqserve.server.repository import SessionOptions, load_model, shared_thread_pool

    hf_dir = args.work / f"marian-{args.size}" / "hf"
    if not (hf_dir / "config.json").exists():
        build_marian_dir(hf_dir, SIZES[args.size])
    repo = args.work / "cuda_repository"
    exported = {
        provider: export_hf_marian(hf_dir, repo, f"marian-{args.size}-{provider}", version=1, force=True,
                                   device=provider)  # fmt: skip
        for provider in ("cuda", "cpu")
    }
    shared_thread_pool(args.threads, 1)
    loaded = {
        provider: load_model(path, SessionOptions(provider=provider, intra_op_threads=args.threads))
        for provider, path in exported.items()
    }
    ours = {provider: InProcess(model) for provider, model in loaded.items()}
    # The CUDA path before the gather graphs: decoder state and memory back on the host between steps.
    ours["cuda-host"] = InProcess(loaded["cuda"], device_state=False)
    tokenizer = Tokenizer.from_file(str(exported["cuda"] / "source_tokenizer.json"))
    target_tokenizer = Tokenizer.from_file(str(exported["cuda"] / "target_tokenizer.json"))
    torch.set_num_threads(args.threads)
    hf = {dtype: MarianMTModel.from_pretrained(str(hf_dir), dtype=getattr(torch, dtype)).cuda().eval()
          for dtype in ("float32", "float16")}  # fmt: skip
    pad = hf["float32"].config.pad_token_id

    def translated(provider: str, texts: list[str], beam: int) -> int:
        return sum(len(r.tokens) for r in ours[provider].translate(texts, beam, args.max_new))

    def generated(dtype: str, texts: list[str], beam: int) -> int:  # detokenized, as seqserve's translations are
        out = generate_ids(hf[dtype], tokenizer, texts, beam, args.max_new, pad)
        target_tokenizer.decode_batch(out.tolist(), skip_special_tokens=True)
        return int(out.ne(pad).sum())

    notes: list[str] = []
    results = Results(f"Translate on a GPU ({torch.cuda.get_device_name()}): MarianMT {args.size} (target tokens/s)",
                      "seqserve-cuda fp16")  # fmt: skip
    for batch in args.batches:
        texts = sources_of_length(tokenizer, batch, SOURCE_TOKENS, seed=batch)
        for beam in args.beams:
            workload = f"batch {batch} {'greedy' if beam == 1 else f'beam {beam}'}"
            contenders = {
                "seqserve-cuda fp16": lambda: translated("cuda", texts, beam),
                "seqserve-cuda fp16, state on host": lambda: translated("cuda-host", texts, beam),
                f"seqserve-cpu fp32 ({args.threads} threads)": lambda: translated("cpu", texts, beam),
                "transformers-cuda fp32": lambda: generated("float32", texts, beam),
                "transformers-cuda fp16": lambda: generated("float16", texts, beam),
            }
            for contender, (seconds, tokens) in timed_interleaved(contenders, args.repeats, args.warmup).items():
                results.add(Row(workload, contender, tokens, "tokens", seconds))
            if beam == 1:  # the same weights: fp16 on the GPU against transformers' fp32 greedy choices
                theirs = [[t for t in row if t != pad] for row in
                          generate_ids(hf["float32"], tokenizer, texts, 1, args.max_new, pad).tolist()]  # fmt: skip
                same = sum(r.tokens == t for r, t in zip(ours["cuda"].translate(texts, 1, args.max_new), theirs))
                notes.append(f"{workload}: seqserve-cuda fp16 and transformers fp32 greedy outputs identical for "
                             f"{same} of {len(texts)} sentences")  # fmt: skip
    parity = json.loads((exported["cuda"] / "manifest.json").read_text())["parity"]
    notes.append(f"CUDA export: fp16, max |onnxruntime - PyTorch| {parity['max_abs_diff']:.3g} over the parity cases")
    results.finish(args, notes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
