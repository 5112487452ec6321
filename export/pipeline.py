"""export_checkpoint / export_hf_bert: checkpoint -> ONNX graphs -> gates -> a new version in the model repository.

Phases, in order (each one can stop the export; nothing is published until the last):
1. export the graphs into a scratch folder (export/graphs.py);
2. onnx.checker, then offline optimisation (BERT and Transformer graphs);
3. parity against PyTorch (export/parity.py), the measured difference goes into the manifest;
4. optionally int8 quantization and its quality gates (export/quantize.py);
5. copy the final graphs and the tokenizers into a staged version and commit it atomically (export/writer.py).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence

import onnxruntime as ort
import torch
from tokenizers import Tokenizer
from torch import nn

from seqserve.export.graphs import (
    OPSET, ExportedGraph, add_greedy_loop, add_row_gather, bert_outputs, export_bert, export_mlm_head,
    export_translator, source_vocab_size,
)
from seqserve.export.parity import (
    DEFAULT_TOLERANCE,
    MAX_TOLERANCE,
    StepGraphs,
    bert_parity,
    check_onnx,
    decoder_start_id,
    greedy_loop_parity,
    open_session,
    row_gather_check,
    translator_parity,
)
from seqserve.export.quantize import (
    DEFAULT_SAMPLE_DOCUMENTS,
    MIN_DEV_SENTENCES,
    TranslationSetup,
    bert_quality,
    optimize_graph,
    quantize_int8,
    translation_quality,
)
from seqserve.export.writer import StagedVersion
from seqserve.server.repository import DECODER_TOP_K_OUTPUTS, GATHER_GRAPHS, TensorSpec

log = logging.getLogger(__name__)

QUANTIZATIONS = ("int8",)
DEVICES = ("cpu", "cuda")
# fp16 keeps ~3 significant digits (a logit of 20 is held to ~0.008) and its error grows with the value's magnitude:
# CUDA exports are gated on |onnxruntime - PyTorch| <= FP16_TOLERANCE + FP16_RTOL * |PyTorch| (parity.ParityReport).
# On an H200 the tiny test models' fp16 log-probabilities were off by up to 0.057 (the bidirectional LSTM).
FP16_TOLERANCE = 5e-2
FP16_RTOL = 1e-2


class ExportError(Exception):
    """An export that cannot be done as asked (unknown option, missing GPU, missing dev sample)."""


def check_tolerance(tolerance: float) -> float:
    """`tolerance` when it is above 0 and at most MAX_TOLERANCE (so neither NaN nor infinite); ExportError if not."""
    if not 0 < tolerance <= MAX_TOLERANCE:  # NaN compares False
        raise ExportError(f"tolerance must be above 0 and at most {MAX_TOLERANCE:g}, got {tolerance:g}")
    return float(tolerance)


def _finite(value: Any, where: str) -> Any:
    """`value` with every NaN or infinite number replaced by None (JSON has neither), each one logged."""
    if isinstance(value, float) and not math.isfinite(value):
        log.warning("%s is %s: written as null", where, value)
        return None
    if isinstance(value, dict):
        return {k: _finite(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v, f"{where}[{i}]") for i, v in enumerate(value)]
    return value


def _providers(device: str) -> list[str]:
    if device not in DEVICES:
        raise ExportError(f"device {device!r} is not one of {DEVICES}")
    if device == "cpu":
        return ["CPUExecutionProvider"]
    available = ort.get_available_providers()
    if "CUDAExecutionProvider" not in available or not torch.cuda.is_available():
        raise ExportError(
            f"--device cuda needs a GPU visible to torch (torch.cuda.is_available() = {torch.cuda.is_available()}) "
            f"and onnxruntime-gpu's CUDAExecutionProvider (available: {', '.join(available)}); export with "
            f"--device cpu instead"
        )
    return ["CUDAExecutionProvider", "CPUExecutionProvider"]


def _to_fp16(graph: ExportedGraph, keep_io_types: bool | Sequence[str] = True) -> ExportedGraph:
    """fp16 weights and compute; the inputs and outputs named in `keep_io_types` (True: all) stay float32, the other
    float ones become float16. Returns the graph with its spec's dtypes as the file now has them."""
    import onnx
    from onnxruntime.transformers.onnx_model import OnnxModel

    model = OnnxModel(onnx.load(str(graph.path)))
    keep = keep_io_types if isinstance(keep_io_types, bool) else list(keep_io_types)
    model.convert_float_to_float16(keep_io_types=keep)
    model.save_model_to_file(str(graph.path))
    saved = onnx.load(str(graph.path), load_external_data=False).graph
    dtypes = {value.name: onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type).name
              for value in (*saved.input, *saved.output)}  # fmt: skip

    def retyped(specs: Sequence[TensorSpec]) -> tuple[TensorSpec, ...]:
        return tuple(dataclasses.replace(spec, dtype=dtypes.get(spec.name, spec.dtype)) for spec in specs)

    spec = dataclasses.replace(graph.spec, inputs=retyped(graph.spec.inputs), outputs=retyped(graph.spec.outputs))
    return ExportedGraph(spec, graph.path)


# --------------------------------------------------------------------------------------------------------------
# BERT


def _export_bert_graphs(
    model: nn.Module, tokenizer: Tokenizer, work: Path, *, quantize: str | None, optimize: bool, tolerance: float,
    device: str, max_tokens: int, sample_documents: Sequence[Sequence[str]], split_mlm: bool,
) -> tuple[dict[str, Any], dict[str, Path]]:  # fmt: skip
    config = model.config
    providers = _providers(device)
    split_mlm = split_mlm and config.with_heads
    exported = {"model": export_bert(model, work, split_mlm=split_mlm)}
    if split_mlm:
        exported["mlm"] = export_mlm_head(model, work)
    for graph in exported.values():
        check_onnx(graph.path)
    record: dict[str, Any] = {}
    if optimize:
        # onnxruntime's CPU SkipLayerNormalization is slower than the Add + LayerNormalization it replaces
        # (optimize_graph); CUDA keeps the fused kernel.
        fused = optimize_graph(exported["model"].path, config.num_attention_heads, config.hidden_size,
                               skip_layer_norm=device == "cuda")  # fmt: skip
        record["optimization"] = {"model.onnx": fused}
    if device == "cuda":
        for graph in exported.values():
            _to_fp16(graph)
        tolerance = max(tolerance, FP16_TOLERANCE)
    fp32 = {key: open_session(graph.path, providers) for key, graph in exported.items()}
    record["parity"] = bert_parity(model, fp32["model"], tolerance, mlm_session=fp32.get("mlm"),
                                   rtol=FP16_RTOL if device == "cuda" else 0.0).to_dict()  # fmt: skip
    finals = {graph.spec.file: graph.path for graph in exported.values()}
    if quantize == "int8":
        finals = {file: work / f"int8.{file}" for file in finals}
        for graph in exported.values():
            quantize_int8(graph.path, finals[graph.spec.file])
        int8 = {key: open_session(finals[graph.spec.file], providers) for key, graph in exported.items()}
        record["quality"] = bert_quality(
            fp32["model"], int8["model"], tokenizer, config.pooling, config.with_heads, max_tokens, sample_documents,
            fp32_mlm=fp32.get("mlm"), int8_mlm=int8.get("mlm"),
        )
    record["graphs"] = {key: graph.spec.to_dict() for key, graph in exported.items()}
    return record, finals


def _bert_manifest(model: nn.Module, tokenizer: Tokenizer, max_tokens: int) -> dict[str, Any]:
    from seqserve.models.tokenization import special_token_ids

    config = model.config
    return {
        "task": "bert",
        "architecture": "bert",
        "config": {"family": "bert", "config": dataclasses.asdict(config)},
        "tokenizers": {"text": "tokenizer.json"},
        "special_tokens": special_token_ids(tokenizer),
        "limits": {"max_tokens": max_tokens},
        "outputs": bert_outputs(model),  # every output, whichever graph computes it
        "pooling": config.pooling,
        "normalize_embeddings": config.normalize_embeddings,
    }


# --------------------------------------------------------------------------------------------------------------
# Translators


def _export_translator_graphs(
    model: nn.Module, family: str, tokenizers: dict[str, Tokenizer], work: Path, *, quantize: str | None,
    optimize: bool, tolerance: float, device: str, dev: Sequence[tuple[str, str]] | None,
) -> tuple[dict[str, Any], dict[str, Path]]:  # fmt: skip
    config = model.config
    providers = _providers(device)
    enc, dec = export_translator(model, work)
    record: dict[str, Any] = {}
    for graph in (enc, dec):
        check_onnx(graph.path)
    if optimize and family == "transformer":
        # The encoder as a BERT (no SkipLayerNormalization on CPU, optimize_graph); a decoder step has one position a
        # row, where the fused node costs no more than the three it replaces.
        record["optimization"] = {
            g.spec.file: optimize_graph(g.path, config.n_heads, config.d_model,
                                        skip_layer_norm=g is dec or device == "cuda")
            for g in (enc, dec)
        }  # fmt: skip
    if device == "cuda":
        # The state and memory cross between steps (and stay on the GPU, server/translation.py) in float16: half the
        # bytes, and none of the ~20 Casts a step that float32 at the boundary costs; the log-probabilities a search
        # adds up come out in float32.
        enc = _to_fp16(enc, keep_io_types=False)
        dec = _to_fp16(dec, keep_io_types=["log_probs", DECODER_TOP_K_OUTPUTS[0]])
        tolerance = max(tolerance, FP16_TOLERANCE)
    memory, state = tuple(model.memory_names()), tuple(model.state_names())
    fp32 = StepGraphs(open_session(enc.path, providers), open_session(dec.path, providers), memory, state)
    # Greedy tokens may differ only at near-ties of the precision's own rounding, whatever tolerance was asked for.
    near_tie = FP16_TOLERANCE if device == "cuda" else DEFAULT_TOLERANCE
    record["parity"] = translator_parity(model, fp32, tolerance, rtol=FP16_RTOL if device == "cuda" else 0.0,
                                         near_tie_tolerance=near_tie).to_dict()  # fmt: skip
    finals = {"encoder.onnx": enc.path, "decoder.onnx": dec.path}
    if quantize == "int8":
        finals = {name: work / f"int8.{name}" for name in finals}
        quantize_int8(enc.path, finals["encoder.onnx"])
        quantize_int8(dec.path, finals["decoder.onnx"])
        int8 = StepGraphs(
            open_session(finals["encoder.onnx"], providers), open_session(finals["decoder.onnx"], providers),
            memory, state,
        )  # fmt: skip
        setup = TranslationSetup(
            tokenizers["source"], tokenizers["target"], decoder_start_id(config), config.eos_id, config.pad_id,
            config.max_src_len, config.max_tgt_len,
        )  # fmt: skip
        record["quality"] = translation_quality(fp32, int8, setup, dev)
    record["graphs"] = {"encoder": enc.spec.to_dict(), "decoder": dec.spec.to_dict()}
    record["decoder"] = {"memory": list(memory), "state": list(state)}
    # Row gathers of the state and memory, so a GPU decoder keeps them on the device between steps.
    gathers = {}
    for group, names in (("state", state), ("memory", memory)):
        graph = add_row_gather(dec.spec, names, work / f"{GATHER_GRAPHS[group]}.onnx")
        check_onnx(graph.path)
        finals[graph.spec.file] = graph.path
        record["graphs"][GATHER_GRAPHS[group]] = graph.spec.to_dict()
        gathers[group] = open_session(graph.path, providers)
    step_graphs = int8 if quantize == "int8" else fp32
    record["row_gather_check"] = row_gather_check(
        gathers, step_graphs, decoder_start_id(config), source_vocab_size(model), config.pad_id
    )
    if family == "rnn" and device == "cpu":
        # A whole greedy decode in one run (graphs.add_greedy_loop), built from the final (fp32 or int8) step graph
        # and checked against it. CUDA exports keep the step loop: the Loop's control flow runs on the CPU there.
        loop = add_greedy_loop(finals["decoder.onnx"], dec.spec, state, config.eos_id, config.pad_id,
                               work / "greedy.onnx")  # fmt: skip
        check_onnx(loop.path)
        record["greedy_loop_parity"] = greedy_loop_parity(
            open_session(loop.path, providers), step_graphs, decoder_start_id(config), config.eos_id, config.pad_id,
            source_vocab_size(model), tolerance,
        ).to_dict()  # fmt: skip
        finals["greedy.onnx"] = loop.path
        record["graphs"]["greedy"] = loop.spec.to_dict()
    return record, finals


def _translator_manifest(model: nn.Module, family: str, tokenizers: dict[str, Tokenizer]) -> dict[str, Any]:
    from seqserve.models.tokenization import special_token_ids

    config = model.config
    special = {
        "pad": config.pad_id, "bos": config.bos_id, "eos": config.eos_id,
        "unk": special_token_ids(tokenizers["source"])["unk"], "decoder_start": decoder_start_id(config),
    }  # fmt: skip
    return {
        "task": "translation",
        "architecture": config.arch if family == "rnn" else family,
        "config": {"family": family, "config": dataclasses.asdict(config)},
        "tokenizers": {"source": "source_tokenizer.json", "target": "target_tokenizer.json"},
        "special_tokens": special,
        "limits": {"max_source_tokens": config.max_src_len, "max_target_tokens": config.max_tgt_len},
    }


# --------------------------------------------------------------------------------------------------------------
# Entry points


def export_model(
    model: nn.Module,
    family: str,
    tokenizers: dict[str, Tokenizer],
    metrics: dict[str, Any],
    repository: str | os.PathLike,
    name: str,
    version: int | None = None,
    quantize: str | None = None,
    optimize: bool = True,
    force: bool = False,
    tolerance: float = DEFAULT_TOLERANCE,
    device: str = "cpu",
    dev: Sequence[tuple[str, str]] | None = None,
    sample_documents: Sequence[Sequence[str]] | None = None,
    max_tokens: int | None = None,
    split_mlm: bool = False,
) -> Path:
    """Export a loaded model (eval mode) with its tokenizers into REPO/NAME/VERSION; returns the version folder."""
    # Everything that can be refused is refused here, before any work and before REPO/NAME is touched.
    if quantize not in (None, *QUANTIZATIONS):
        raise ExportError(f"quantize={quantize!r} is not one of {QUANTIZATIONS} (or None)")
    check_tolerance(tolerance)
    _providers(device)  # fail before any work when the device is missing
    if family == "bert" and dev:
        raise ExportError("a dev sample (--dev, dev=) feeds a translator's BLEU gate; this is a BERT (--sample)")
    if family != "bert" and sample_documents:
        raise ExportError("a prose sample (--sample, sample_documents=) feeds a BERT's gates; this is a translator "
                          "(--dev)")  # fmt: skip
    if family != "bert" and quantize == "int8":
        if not dev:
            raise ExportError("--quantize int8 of a translator needs a dev sample for its BLEU gate: pass --dev "
                              "FILE.tsv (dev=)")  # fmt: skip
        if len(dev) < MIN_DEV_SENTENCES:
            raise ExportError(f"the int8 BLEU gate needs at least {MIN_DEV_SENTENCES} dev pairs, got {len(dev)} "
                              f"(--dev, --dev-limit)")  # fmt: skip
    model = model.eval()
    with StagedVersion(repository, name, version, force) as stage, tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        if family == "bert":
            limit = min(max_tokens or model.config.max_position_embeddings, model.config.max_position_embeddings)
            record, finals = _export_bert_graphs(
                model, tokenizers["text"], work, quantize=quantize, optimize=optimize, tolerance=tolerance,
                device=device, max_tokens=limit, sample_documents=sample_documents or DEFAULT_SAMPLE_DOCUMENTS,
                split_mlm=split_mlm,
            )  # fmt: skip
            manifest = _bert_manifest(model, tokenizers["text"], limit)
            tokenizer_files = {"tokenizer.json": tokenizers["text"]}
        else:
            record, finals = _export_translator_graphs(
                model, family, tokenizers, work, quantize=quantize, optimize=optimize, tolerance=tolerance,
                device=device, dev=dev,
            )  # fmt: skip
            manifest = _translator_manifest(model, family, tokenizers)
            tokenizer_files = {
                "source_tokenizer.json": tokenizers["source"], "target_tokenizer.json": tokenizers["target"]
            }
        for file, path in finals.items():
            shutil.copyfile(path, stage.dir / file)
        for file, tokenizer in tokenizer_files.items():
            tokenizer.save(str(stage.dir / file))
        manifest.update(record)
        precision = "fp16" if device == "cuda" else "fp32"
        # parity compares the exported graphs before quantization with PyTorch; an int8 version's own figures are
        # its gates' (`quality`), listed among the metrics as quality_* so that ListModels shows them.
        manifest["parity"]["precision"] = precision
        metrics = _finite(dict(metrics), "metrics")
        if quantize:
            metrics.update({f"quality_{k}": v for k, v in record["quality"].items()})
        manifest.update(
            quantization=quantize,
            precision=precision,
            metrics=metrics,
            export={"opset": OPSET, "exporter": "torch.onnx (TorchScript)", "torch": torch.__version__,
                    "onnxruntime": ort.__version__, "device": device},  # fmt: skip
        )
        path = stage.commit(manifest)
    log.info("exported %s (max abs diff %.3g) to %s", name, record["parity"]["max_abs_diff"], path)
    return path


def export_checkpoint(
    checkpoint_dir: str | os.PathLike,
    repository: str | os.PathLike,
    name: str,
    version: int | None = None,
    quantize: str | None = None,
    optimize: bool = True,
    force: bool = False,
    tolerance: float = DEFAULT_TOLERANCE,
    device: str = "cpu",
    dev: Sequence[tuple[str, str]] | None = None,
    sample_documents: Sequence[Sequence[str]] | None = None,
    split_mlm: bool = False,
) -> Path:
    """A checkpoint folder (models/checkpoint.py) -> REPO/NAME/VERSION; returns the version folder."""
    from seqserve.models.checkpoint import load_checkpoint

    ckpt = load_checkpoint(checkpoint_dir).require_tokenizers()
    # An imported sentence-transformers model keeps its max_seq_length (models/hf.py writes it into metrics.json).
    max_tokens = ckpt.metrics.get("max_seq_length") if ckpt.family == "bert" else None
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1):
        raise ExportError(f"{ckpt.path}/metrics.json: max_seq_length = {max_tokens!r} is not a positive integer")
    return export_model(
        ckpt.model, ckpt.family, ckpt.tokenizers, ckpt.metrics, repository, name, version=version, quantize=quantize,
        optimize=optimize, force=force, tolerance=tolerance, device=device, dev=dev, sample_documents=sample_documents,
        max_tokens=max_tokens, split_mlm=split_mlm,
    )  # fmt: skip


def export_hf_bert(
    hf_dir: str | os.PathLike,
    repository: str | os.PathLike,
    name: str,
    version: int | None = None,
    quantize: str | None = None,
    optimize: bool = True,
    force: bool = False,
    tolerance: float = DEFAULT_TOLERANCE,
    device: str = "cpu",
    sample_documents: Sequence[Sequence[str]] | None = None,
    split_mlm: bool = False,
) -> Path:
    """A local Hugging Face BERT directory (via models/hf.py) -> REPO/NAME/VERSION; returns the version folder."""
    from seqserve.models.hf import load_hf_bert

    imported = load_hf_bert(hf_dir)
    return export_model(
        imported.model, "bert", {"text": imported.tokenizer}, {"imported": imported.info}, repository, name,
        version=version, quantize=quantize, optimize=optimize, force=force, tolerance=tolerance, device=device,
        sample_documents=sample_documents, max_tokens=int(imported.info["max_seq_length"]), split_mlm=split_mlm,
    )  # fmt: skip
