"""Transformer translation benchmark: one MarianMT (random weights) run by seqserve, CTranslate2 and transformers.

The model is built from a MarianConfig (benchmarks/marian_model.py: small 256/3+3/4/1024 or base 512/6+6/8/2048,
vocabulary 8000) and saved locally; CTranslate2 converts it with its own converter, seqserve exports it with
`export_hf_marian`, so every toolkit runs the same weights. EOS carries a -50 logit bias, so every toolkit decodes
exactly `--max-new` target tokens per sentence: throughput is target tokens per second.

Contenders, per workload (batch 1 and 32 sources of ~20 tokens, greedy and beam 4, fp32 and int8):
  seqserve-inproc   the server's Translator (server/translation.py) on the exported version, tokenization included;
  seqserve-grpc     `seqserve serve` in a subprocess and the blocking client;
  ctranslate2       Translator.translate_batch, same intra-op threads, compute type float32 / int8, tokenization
                    included (the same tokenizer.json);
  transformers      MarianMTModel.generate in PyTorch eager (fp32 workloads only).

    python -m benchmarks.translate_transformer --size base --threads 2 --json benchmarks/results/translate_base.json
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from benchmarks.common import Results, Row, ServerProcess, base_arguments, load_in_process, setup, timed_interleaved
from benchmarks.marian_model import SIZES, build_marian_dir, synthetic_sentences

log = logging.getLogger("benchmarks.translate_transformer")

SOURCE_TOKENS = 20


def build(args: argparse.Namespace) -> tuple[Path, Path, Path, str]:
    """(MarianMT dir, CTranslate2 dir, seqserve repository, model name), built once into the work folder."""
    import ctranslate2

    from seqserve.export.hf_marian import export_hf_marian
    from seqserve.export.quantize import QualityGateError
    from seqserve.server.repository import ModelRepository

    size = SIZES[args.size]
    hf_dir = args.work / f"marian-{args.size}" / "hf"
    if not (hf_dir / "model.safetensors").is_file():
        build_marian_dir(hf_dir, size, seed=0)
    ct2_dir = args.work / f"marian-{args.size}" / "ct2"
    if not (ct2_dir / "model.bin").is_file():
        ctranslate2.converters.TransformersConverter(str(hf_dir)).convert(str(ct2_dir), force=True)
    repo = args.work / "translate_repository"
    name = f"marian-{args.size}"
    existing = ModelRepository(repo).models() if repo.is_dir() else {}
    if name not in existing:
        export_hf_marian(hf_dir, repo, name, max_len=64)
    if f"{name}-int8" not in existing:
        # The int8 BLEU gate compares with the fp32 export's own greedy translations (a random model has no
        # references): it measures how far int8 moves the output.
        loaded = load_in_process(repo / name / "1", args.threads)
        sources = sources_of_length(loaded.tokenizers["source"], 32, SOURCE_TOKENS, seed=99)  # the gate takes >= 30
        references = [r.hypotheses[0].text for r in InProcess(loaded).translate(sources, 1, 64)]
        try:
            export_hf_marian(hf_dir, repo, f"{name}-int8", quantize="int8", max_len=64,
                             dev=list(zip(sources, references)))  # fmt: skip
        except QualityGateError as exc:
            log.warning("%s; publishing the int8 graphs anyway, for speed measurements only", exc)
            quantize_version(repo / name / "1", repo, f"{name}-int8", str(exc))
    return hf_dir, ct2_dir, repo, name


def quantize_version(fp32_dir: Path, repo: Path, name: str, gate: str) -> Path:
    """The fp32 version's graphs through export/quantize.py's int8 quantization, published as REPO/NAME without the
    BLEU gate (a random-weight model can fail it: its greedy choices are near-ties). For speed measurements only."""
    import json
    import shutil

    from seqserve.export.quantize import quantize_int8
    from seqserve.export.writer import StagedVersion

    manifest = json.loads((fp32_dir / "manifest.json").read_text(encoding="utf-8"))
    with StagedVersion(repo, name) as stage:
        for file in manifest["files"]:
            if file.endswith(".onnx"):
                quantize_int8(fp32_dir / file, stage.dir / file)
            else:
                shutil.copyfile(fp32_dir / file, stage.dir / file)
        for key in ("files", "version", "name", "format_version", "created"):
            manifest.pop(key, None)
        manifest.update(quantization="int8", quality={"gate_failed": gate})
        return stage.commit(manifest)


class InProcess:
    """server/translation.py's Translator: tokenize, batch decode (greedy or beam), detokenize."""

    def __init__(self, loaded, device_state: bool | None = None):
        from seqserve.server.translation import Translator

        self.translator = Translator.for_model(loaded, device_state=device_state)

    def translate(self, texts: list[str], beam: int, max_new: int) -> list:
        from seqserve.server.translation import DecodeOptions

        options = DecodeOptions(beam_size=beam, max_output_tokens=max_new)
        jobs = [self.translator.job(self.translator.codec.encode(t).ids, options) for t in texts]
        self.translator.run_batch(jobs, stopped=lambda i: False, on_step=lambda rows: None, on_done=lambda i: None)
        return [_Result(job.result[0].tokens, self.translator.codec.decode(list(job.result[0].tokens)))
                for job in jobs]  # fmt: skip


class _Result:
    def __init__(self, tokens, text):
        self.tokens, self.text = list(tokens), text
        self.hypotheses = [self]


def sources_of_length(tokenizer, n: int, tokens: int, seed: int) -> list[str]:
    """n synthetic sentences cut to about `tokens` source tokens (</s> included)."""
    out = []
    for text in synthetic_sentences(n, seed=seed):
        ids = tokenizer.encode(text).ids[: tokens - 1]
        out.append(tokenizer.decode(ids, skip_special_tokens=True))
    return out


def translation_arguments(description: str, default_size: str, argv: list[str] | None) -> argparse.Namespace:
    """The translation benchmarks' options (base_arguments, MarianMT size, workloads); --quick: tiny sizes."""
    parser = base_arguments(description)
    parser.add_argument("--size", choices=sorted(SIZES), default=default_size, help="MarianMT size (tiny is for tests)")
    parser.add_argument("--max-new", type=int, default=20, help="target tokens decoded per sentence")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32], help="sentences per call")
    parser.add_argument("--beams", type=int, nargs="+", default=[1, 4], help="beam sizes (1: greedy)")
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.batches, args.beams, args.max_new = "tiny", [1, 4], [1, 2], 6
    return args


def generate_ids(model: Any, tokenizer: Any, texts: list[str], beam: int, max_new: int, pad: int) -> Any:
    """`transformers` `generate` on the model's device (greedy or beam): the (B, T) target ids without the decoder
    start token, padded after each row's end."""
    import torch

    ids = [tokenizer.encode(t).ids for t in texts]
    longest = max(map(len, ids))
    input_ids = torch.tensor([r + [pad] * (longest - len(r)) for r in ids], device=model.device)
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=input_ids.ne(pad), num_beams=beam, do_sample=False,
                             max_new_tokens=max_new)  # fmt: skip
    return out[:, 1:]


def main(argv: list[str] | None = None) -> int:
    args = translation_arguments(__doc__.splitlines()[0], "base", argv)
    setup(args)
    import ctranslate2
    import torch
    from tokenizers import Tokenizer
    from transformers import MarianMTModel

    from seqserve.clients import Client, DecodingOptions

    torch.set_num_threads(args.threads)
    hf_dir, ct2_dir, repo, name = build(args)
    hf_model = MarianMTModel.from_pretrained(str(hf_dir)).eval()
    source_tok = Tokenizer.from_file(str(repo / name / "1" / "source_tokenizer.json"))
    target_tok = Tokenizer.from_file(str(repo / name / "1" / "target_tokenizer.json"))
    pad = hf_model.config.pad_token_id
    results = Results(f"Translate, Transformer: MarianMT {args.size} (target tokens/s)", "seqserve-inproc")
    notes: list[str] = []

    def ct2_translate(translator, texts: list[str], beam: int) -> int:
        tokens = [source_tok.encode(t).tokens for t in texts]
        out = translator.translate_batch(tokens, beam_size=beam, max_decoding_length=args.max_new,
                                         max_batch_size=len(texts))  # fmt: skip
        [target_tok.decode([target_tok.token_to_id(p) for p in r.hypotheses[0]]) for r in out]
        return sum(len(r.hypotheses[0]) for r in out)

    def hf_generate(texts: list[str], beam: int) -> int:
        out = generate_ids(hf_model, source_tok, texts, beam, args.max_new, pad)
        target_tok.decode_batch(out.tolist(), skip_special_tokens=True)
        return int(out.ne(pad).sum())

    with ServerProcess(repo, args.threads, ["--models", name, f"{name}-int8"]) as server, \
            Client(server.address) as client:  # fmt: skip
        for precision, version in (("fp32", name), ("int8", f"{name}-int8")):
            inproc = InProcess(load_in_process(repo / version / "1", args.threads))
            ct2 = ctranslate2.Translator(str(ct2_dir), device="cpu", compute_type="float32" if precision == "fp32"
                                         else "int8", intra_threads=args.threads, inter_threads=1)  # fmt: skip
            for batch in args.batches:
                texts = sources_of_length(source_tok, batch, SOURCE_TOKENS, seed=batch)
                for beam in args.beams:
                    workload = f"{precision} batch {batch} {'greedy' if beam == 1 else f'beam {beam}'}"
                    contenders = {
                        "seqserve-inproc": lambda: sum(len(r.tokens) for r in inproc.translate(texts, beam,
                                                                                              args.max_new)),
                        "seqserve-grpc": lambda: sum(
                            len(t.hypotheses[0].tokens)
                            for t in client.translate(version, texts, DecodingOptions(beam_size=beam,
                                                                                     max_output_tokens=args.max_new))
                        ),
                        f"ctranslate2 {ct2.compute_type}": lambda: ct2_translate(ct2, texts, beam),
                    }  # fmt: skip
                    if precision == "fp32":
                        contenders["transformers eager fp32"] = lambda: hf_generate(texts, beam)
                    timings = timed_interleaved(contenders, args.repeats, args.warmup)
                    for contender, (seconds, tokens) in timings.items():
                        results.add(Row(workload, contender, tokens, "tokens", seconds))
                    if beam == 1:
                        ours = [r.tokens for r in inproc.translate(texts, 1, args.max_new)]
                        theirs = ct2.translate_batch([source_tok.encode(t).tokens for t in texts], beam_size=1,
                                                     max_decoding_length=args.max_new)  # fmt: skip
                        same = sum(o == [target_tok.token_to_id(p) for p in r.hypotheses[0]]
                                   for o, r in zip(ours, theirs))  # fmt: skip
                        notes.append(f"{workload}: seqserve and CTranslate2 greedy outputs identical for {same} of "
                                     f"{len(texts)} sentences")  # fmt: skip
        notes.append(f"server ready in {server.ready_seconds:.2f} s, resident memory "
                     f"{server.rss_bytes() / 2**20:.0f} MiB with fp32 and int8 loaded")  # fmt: skip
    results.finish(args, notes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
