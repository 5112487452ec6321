"""Transformer translation on a GPU: seqserve with onnxruntime's CUDA provider beside transformers on the same GPU.

    python -m benchmarks.translate_cuda --size small --threads 8 --json benchmarks/results/translate_cuda.json

Needs a GPU visible to torch and onnxruntime-gpu (refuses clearly otherwise). The MarianMT of benchmarks/marian_model.py
(random weights, built into --work) is exported twice with export_hf_marian: for CUDA (fp16, gated on the GPU) and
for the CPU (fp32). Contenders, one process, `timed_interleaved`: seqserve's Translator on the CUDA export (the
reference of the ratio column), the same on the CPU export with --threads threads (this machine's CPU), and
`transformers` `generate` on the GPU in fp32 and fp16. Workloads as benchmarks.translate_transformer's: batch 1 and
32 sources of ~20 tokens, 20 target tokens each, greedy and beam 4. Not part of `python -m benchmarks` (no GPU there).
"""

from __future__ import annotations

import json
import logging

from benchmarks.common import Results, Row, base_arguments, setup, timed_interleaved
from benchmarks.marian_model import SIZES, build_marian_dir
from benchmarks.translate_transformer import SOURCE_TOKENS, sources_of_length

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
    parser = base_arguments(__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="small", help="MarianMT size (tiny is for tests)")
    parser.add_argument("--max-new", type=int, default=20, help="target tokens decoded per sentence")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32], help="sentences per call")
    parser.add_argument("--beams", type=int, nargs="+", default=[1, 4], help="beam sizes (1: greedy)")
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.batches, args.beams, args.max_new = "tiny", [1, 4], [1, 2], 6
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
    from seqserve.server.translation import DecodeOptions, Translator

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
    translators = {
        provider: Translator.for_model(load_model(path, SessionOptions(provider=provider,
                                                                       intra_op_threads=args.threads)))
        for provider, path in exported.items()
    }  # fmt: skip
    tokenizer = Tokenizer.from_file(str(exported["cuda"] / "source_tokenizer.json"))
    torch.set_num_threads(args.threads)
    hf = {dtype: MarianMTModel.from_pretrained(str(hf_dir), dtype=getattr(torch, dtype)).cuda().eval()
          for dtype in ("float32", "float16")}  # fmt: skip
    pad = hf["float32"].config.pad_token_id

    def ours(translator: Translator, texts: list[str], beam: int) -> int:
        options = DecodeOptions(beam_size=beam, max_output_tokens=args.max_new)
        jobs = [translator.job(translator.codec.encode(t).ids, options) for t in texts]
        translator.run_batch(jobs, stopped=lambda i: False, on_step=lambda rows: None, on_done=lambda i: None)
        return sum(len(job.result[0].tokens) for job in jobs)

    def generate(model, texts: list[str], beam: int) -> int:
        return int(generated(model, texts, beam).ne(pad).sum())

    def generated(model, texts: list[str], beam: int):
        ids = [tokenizer.encode(t).ids for t in texts]
        longest = max(map(len, ids))
        input_ids = torch.tensor([r + [pad] * (longest - len(r)) for r in ids]).cuda()
        with torch.no_grad():
            out = model.generate(input_ids=input_ids, attention_mask=input_ids.ne(pad), num_beams=beam,
                                 do_sample=False, max_new_tokens=args.max_new)  # fmt: skip
        torch.cuda.synchronize()
        return out[:, 1:]  # (B, T) without the decoder start token

    def greedy_tokens(translator: Translator, texts: list[str]) -> list[list[int]]:
        options = DecodeOptions(beam_size=1, max_output_tokens=args.max_new)
        jobs = [translator.job(translator.codec.encode(t).ids, options) for t in texts]
        translator.run_batch(jobs, stopped=lambda i: False, on_step=lambda rows: None, on_done=lambda i: None)
        return [list(job.result[0].tokens) for job in jobs]

    notes: list[str] = []
    results = Results(f"Translate on a GPU ({torch.cuda.get_device_name()}): MarianMT {args.size} (target tokens/s)",
                      "seqserve-cuda fp16")  # fmt: skip
    for batch in args.batches:
        texts = sources_of_length(tokenizer, batch, SOURCE_TOKENS, seed=batch)
        for beam in args.beams:
            workload = f"batch {batch} {'greedy' if beam == 1 else f'beam {beam}'}"
            contenders = {
                "seqserve-cuda fp16": lambda: ours(translators["cuda"], texts, beam),
                f"seqserve-cpu fp32 ({args.threads} threads)": lambda: ours(translators["cpu"], texts, beam),
                "transformers-cuda fp32": lambda: generate(hf["float32"], texts, beam),
                "transformers-cuda fp16": lambda: generate(hf["float16"], texts, beam),
            }
            for contender, (seconds, tokens) in timed_interleaved(contenders, args.repeats, args.warmup).items():
                results.add(Row(workload, contender, tokens, "tokens", seconds))
            if beam == 1:  # the same weights: fp16 on the GPU against transformers' fp32 greedy choices
                theirs = [[t for t in row if t != pad] for row in generated(hf["float32"], texts, 1).tolist()]
                same = sum(a == b for a, b in zip(greedy_tokens(translators["cuda"], texts), theirs))
                notes.append(f"{workload}: seqserve-cuda fp16 and transformers fp32 greedy outputs identical for "
                             f"{same} of {len(texts)} sentences")  # fmt: skip
    parity = json.loads((exported["cuda"] / "manifest.json").read_text())["parity"]
    notes.append(f"CUDA export: fp16, max |onnxruntime - PyTorch| {parity['max_abs_diff']:.3g} over the parity cases")
    results.finish(args, notes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
