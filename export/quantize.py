"""Offline graph optimisation (onnxruntime's transformer optimizer), int8 dynamic quantization, and the quality gates
a quantized export must pass: task quality rather than raw difference.

Letters: B batch, L sequence length, H hidden.

Gates (each compares the int8 graphs with the fp32 graphs of the same export, on the same sample; docs/training.md):
- BERT embeddings: cosine of every sentence embedding (the model's pooling) >= 0.99;
- BERT with heads: next-sentence accuracy within 1 point (percentage) of fp32; at the masked positions of the sample
  (15% of the tokens, fixed seed), the cosine of the int8 and fp32 masked-LM logits >= 0.99 at every position and
  the same top-1 token at >= 90% of them (a half-trained model has near-ties that int8 may flip);
- translators: corpus BLEU (sacrebleu) of greedy translations within 1 point of fp32 on a dev sample of at least 30
  pairs.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnx
from tokenizers import Tokenizer

from seqserve.export.parity import StepGraphs, greedy_decode_onnx

log = logging.getLogger(__name__)

MIN_EMBEDDING_COSINE = 0.99
MAX_NSP_ACCURACY_DROP = 1.0  # points
MAX_BLEU_DROP = 1.0  # points
MIN_MLM_LOGITS_COSINE = 0.99  # at every masked position
MIN_MLM_TOP1_AGREEMENT = 0.9  # share of masked positions where int8's best token is fp32's
# Corpus BLEU of fewer sentences moves by several points when one sentence changes: no gate at all.
MIN_DEV_SENTENCES = 30
MLM_MASK_PROBABILITY = 0.15

# A small built-in sample (three short documents) for the BERT gates when no --sample file is given.
DEFAULT_SAMPLE_DOCUMENTS: tuple[tuple[str, ...], ...] = (
    (
        "The weather was cold and grey when the train left the station.",
        "Most passengers slept, wrapped in their coats.",
        "By noon the clouds had cleared and the hills were bright with snow.",
        "A child in the last carriage counted the tunnels aloud.",
        "The conductor smiled and told her there were eleven more to come.",
    ),
    (
        "To install the program, open a terminal and run the setup script.",
        "The script asks for a folder where the files will be copied.",
        "When it finishes, restart the computer so that the new settings take effect.",
        "If the installation fails, the log file explains what went wrong.",
        "Send the log to the support team together with a short description.",
    ),
    (
        "Bees collect nectar from flowers and turn it into honey.",
        "A single hive can hold tens of thousands of workers.",
        "The queen lays eggs while the workers build wax cells to store them.",
        "In winter the bees cluster together to keep the colony warm.",
        "Beekeepers leave enough honey in the hive for the cold months.",
    ),
)


class QualityGateError(Exception):
    """An int8 export whose task quality falls below its gate; the message names the numbers and the gate."""

    def __init__(self, metric: str, fp32: float, int8: float, gate: str):
        self.metric, self.fp32, self.int8, self.gate = metric, fp32, int8, gate
        super().__init__(
            f"int8 quantization fails its quality gate on {metric}: fp32 {fp32:.4f}, int8 {int8:.4f} (gate: {gate}); "
            f"export without --quantize, or on a larger model"
        )


class UnusableSample(QualityGateError):
    """A quality gate's sample that cannot measure anything (no token to mask, say)."""

    def __init__(self, gate: str, why: str):
        self.metric, self.fp32, self.int8, self.gate = gate, float("nan"), float("nan"), why
        Exception.__init__(self, f"the int8 {gate} gate cannot use its sample: {why}")


# --------------------------------------------------------------------------------------------------------------
# Optimisation and quantization


def optimize_graph(path: Path, num_heads: int, hidden_size: int, *, skip_layer_norm: bool = True) -> dict[str, int]:
    """Rewrite `path` in place with onnxruntime's transformer optimizer (model_type bert); returns the fused op counts.

    The optimizer's Python fusions only (opt_level 0), so the saved graph stays portable across execution providers;
    onnxruntime applies its own provider-specific optimisations when a session opens it.

    `skip_layer_norm=False` leaves each residual add and its layer norm as ONNX Add and LayerNormalization nodes
    instead of one com.microsoft SkipLayerNormalization: onnxruntime's CPU kernel for it costs ~5 ns an element against
    ~1 ns for Add + LayerNormalization (1.32, one thread, 1024 x 384), which makes MiniLM's batch-32 encode 6 % (fp32)
    to 22 % (int8) slower (docs/benchmarks.md). Encoders on CPU turn it off. A decoder step keeps it: at one position
    a row both forms cost the same (benchmarks/levers.py layernorm) and unfused decoders measured no faster; so does
    CUDA, whose fused kernel is fast.
    """
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions("bert")
    options.enable_skip_layer_norm = skip_layer_norm
    optimized = optimize_model(
        str(path), model_type="bert", num_heads=num_heads, hidden_size=hidden_size, opt_level=0, use_gpu=False,
        optimization_options=options,
    )  # fmt: skip
    optimized.save_model_to_file(str(path))
    fused = {k: int(v) for k, v in optimized.get_fused_operator_statistics().items() if v}
    log.info("optimized %s: %s", path.name, fused)
    return fused


def has_contrib_ops(path: Path) -> bool:
    """Whether the graph uses com.microsoft operators (those the transformer optimizer fuses into)."""
    model = onnx.load(str(path), load_external_data=False)
    return any(node.domain == "com.microsoft" for node in model.graph.node)


def quantize_int8(src: Path, dst: Path) -> None:
    """onnxruntime dynamic quantization: int8 weights per output channel, activations quantized at run time."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    extra: dict[str, Any] = {}
    if has_contrib_ops(src):
        # Fused (com.microsoft) nodes have no ONNX type inference; tell the quantizer their tensors are float.
        extra["DefaultTensorType"] = onnx.TensorProto.FLOAT
    quantize_dynamic(str(src), str(dst), per_channel=True, weight_type=QuantType.QInt8, extra_options=extra)


# --------------------------------------------------------------------------------------------------------------
# BERT gates


def _padded(tokenizer: Tokenizer, max_length: int) -> Tokenizer:
    tok = Tokenizer.from_str(tokenizer.to_str())
    pad_id = tok.token_to_id("[PAD]")
    tok.enable_padding(pad_id=0 if pad_id is None else pad_id, pad_token="[PAD]")
    tok.enable_truncation(max_length=max_length)
    return tok


def _bert_feeds(tokenizer: Tokenizer, batch: Sequence[Any]) -> dict[str, np.ndarray]:
    encodings = tokenizer.encode_batch(list(batch))
    return {
        "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
        "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64),
    }


def sentence_embeddings(session: Any, tokenizer: Tokenizer, texts: Sequence[str], pooling: str) -> np.ndarray:
    """(N, H) embeddings with the model's pooling ("cls" or masked "mean"), batches of 16."""
    out = []
    for i in range(0, len(texts), 16):
        feeds = _bert_feeds(tokenizer, texts[i : i + 16])
        (seq,) = session.run(["sequence_output"], feeds)  # (B, L, H)
        if pooling == "mean":
            mask = feeds["attention_mask"][:, :, None].astype(np.float32)  # (B, L, 1)
            out.append((seq * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1e-9))  # (B, H)
        else:
            out.append(seq[:, 0])  # (B, H)
    return np.concatenate(out)


def nsp_accuracy(session: Any, tokenizer: Tokenizer, pairs: Sequence[Any]) -> float:
    """Percentage of next-sentence pairs whose argmax label is right."""
    correct = 0
    for i in range(0, len(pairs), 16):
        chunk = pairs[i : i + 16]
        (logits,) = session.run(["nsp_logits"], _bert_feeds(tokenizer, [(p.first, p.second) for p in chunk]))
        correct += int((logits.argmax(axis=-1) == np.array([p.label for p in chunk])).sum())
    return 100.0 * correct / len(pairs)


def _mlm_logits(model: Any, mlm: Any | None, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """(B, L, V) masked-LM logits: from model.onnx, or from mlm.onnx on its sequence_output (a split head)."""
    if mlm is None:
        (logits,) = model.run(["mlm_logits"], feeds)
        return logits
    (sequence,) = model.run(["sequence_output"], feeds)  # (B, L, H)
    (logits,) = mlm.run(["mlm_logits"], {"sequence_output": sequence})
    return logits


def mlm_agreement(
    fp32: Any, int8: Any, tokenizer: Tokenizer, texts: Sequence[str], fp32_mlm: Any | None = None,
    int8_mlm: Any | None = None, seed: int = 0,
) -> dict[str, Any]:  # fmt: skip
    """Mask MLM_MASK_PROBABILITY of each text's tokens (at least one; fixed seed) and compare the two graphs' masked-LM
    heads there: top-1 agreement, cosine of the logits, and each one's accuracy against the original tokens."""
    mask_id = tokenizer.token_to_id("[MASK]")
    if mask_id is None:
        return {}
    special = {i for t in ("[PAD]", "[CLS]", "[SEP]", "[MASK]", "[UNK]") if (i := tokenizer.token_to_id(t)) is not None}
    rng = np.random.default_rng(seed)
    agree = correct_fp32 = correct_int8 = positions = 0
    cosines = []
    for i in range(0, len(texts), 16):
        feeds = _bert_feeds(tokenizer, texts[i : i + 16])
        original = feeds["input_ids"].copy()  # (B, L)
        candidates = (feeds["attention_mask"] == 1) & ~np.isin(original, list(special))  # (B, L)
        chosen = candidates & (rng.random(original.shape) < MLM_MASK_PROBABILITY)  # (B, L)
        for row in np.flatnonzero(candidates.any(axis=1) & ~chosen.any(axis=1)):  # at least one a text
            chosen[row, rng.choice(np.flatnonzero(candidates[row]))] = True
        feeds["input_ids"] = np.where(chosen, mask_id, original)
        a = _mlm_logits(fp32, fp32_mlm, feeds)[chosen]  # (P, V)
        b = _mlm_logits(int8, int8_mlm, feeds)[chosen]  # (P, V)
        agree += int((a.argmax(-1) == b.argmax(-1)).sum())
        correct_fp32 += int((a.argmax(-1) == original[chosen]).sum())
        correct_int8 += int((b.argmax(-1) == original[chosen]).sum())
        positions += len(a)
        norms = np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-12)  # (P,)
        cosines.append((a * b).sum(-1) / norms)
    if not positions:
        raise UnusableSample("masked-LM", "no token to mask in it (only special tokens); give --sample documents "
                                          "with words in them")  # fmt: skip
    cos = np.concatenate(cosines)
    return {
        "mlm_masked_positions": positions,
        "mlm_top1_agreement": agree / positions,
        "mlm_logits_cosine_min": float(cos.min()),
        "mlm_accuracy_fp32": 100.0 * correct_fp32 / positions,
        "mlm_accuracy_int8": 100.0 * correct_int8 / positions,
    }


def bert_quality(
    fp32: Any, int8: Any, tokenizer: Tokenizer, pooling: str, has_heads: bool, max_length: int,
    documents: Sequence[Sequence[str]] = DEFAULT_SAMPLE_DOCUMENTS, fp32_mlm: Any | None = None,
    int8_mlm: Any | None = None,
) -> dict[str, Any]:  # fmt: skip
    """The BERT gates; raises QualityGateError, returns the measured figures for the manifest. `fp32_mlm`/`int8_mlm`:
    the mlm.onnx sessions of a split head (None: model.onnx computes mlm_logits itself)."""
    from seqserve.models.bert import make_nsp_pairs

    tok = _padded(tokenizer, max_length)
    texts = [s for doc in documents for s in doc]
    a = sentence_embeddings(fp32, tok, texts, pooling)  # (N, H)
    b = sentence_embeddings(int8, tok, texts, pooling)  # (N, H)
    cos = (a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-12)  # (N,)
    figures: dict[str, Any] = {
        "sample_sentences": len(texts),
        "embedding_cosine_min": float(cos.min()),
        "embedding_cosine_mean": float(cos.mean()),
    }
    if cos.min() < MIN_EMBEDDING_COSINE:
        raise QualityGateError("embedding cosine (minimum over the sample)", 1.0, float(cos.min()),
                               f">= {MIN_EMBEDDING_COSINE}")  # fmt: skip
    if has_heads:
        pairs = make_nsp_pairs([list(d) for d in documents], random.Random(0))
        acc_fp32, acc_int8 = nsp_accuracy(fp32, tok, pairs), nsp_accuracy(int8, tok, pairs)
        figures.update(nsp_pairs=len(pairs), nsp_accuracy_fp32=acc_fp32, nsp_accuracy_int8=acc_int8)
        if acc_fp32 - acc_int8 > MAX_NSP_ACCURACY_DROP:
            raise QualityGateError("NSP accuracy (%)", acc_fp32, acc_int8, f"within {MAX_NSP_ACCURACY_DROP} point")
        mlm = mlm_agreement(fp32, int8, tok, texts, fp32_mlm, int8_mlm)
        if not mlm:
            log.warning("the tokenizer has no [MASK] token: the masked-LM head of the int8 graphs is not gated")
        figures.update(mlm)
        if mlm and mlm["mlm_logits_cosine_min"] < MIN_MLM_LOGITS_COSINE:
            raise QualityGateError("masked-LM logits cosine (minimum over the masked positions)", 1.0,
                                   mlm["mlm_logits_cosine_min"], f">= {MIN_MLM_LOGITS_COSINE}")  # fmt: skip
        if mlm and mlm["mlm_top1_agreement"] < MIN_MLM_TOP1_AGREEMENT:
            raise QualityGateError("masked-LM top-1 agreement with fp32 (share of masked positions)", 1.0,
                                   mlm["mlm_top1_agreement"], f">= {MIN_MLM_TOP1_AGREEMENT}")  # fmt: skip
    return figures


# --------------------------------------------------------------------------------------------------------------
# Translation gate


@dataclass(frozen=True)
class TranslationSetup:
    source: Tokenizer
    target: Tokenizer
    start_id: int
    eos_id: int
    pad_id: int
    max_source_tokens: int
    max_target_tokens: int


def translate(graphs: StepGraphs, setup: TranslationSetup, sources: Sequence[str], batch: int = 16) -> list[str]:
    """Greedy translations through the step graphs."""
    out = []
    for i in range(0, len(sources), batch):
        encodings = [setup.source.encode(s).ids[: setup.max_source_tokens] for s in sources[i : i + batch]]
        width = max(len(e) for e in encodings)
        ids = np.full((len(encodings), width), setup.pad_id, dtype=np.int64)  # (B, S)
        for row, e in enumerate(encodings):
            ids[row, : len(e)] = e
        pad_mask = np.arange(width)[None, :] >= np.array([len(e) for e in encodings])[:, None]  # (B, S)
        max_len = min(setup.max_target_tokens, 2 * width + 10)
        tokens = greedy_decode_onnx(graphs, ids, pad_mask, max_len, setup.start_id, setup.eos_id, setup.pad_id)
        for row in tokens.tolist():
            row = row[: row.index(setup.eos_id)] if setup.eos_id in row else row
            out.append(setup.target.decode(row, skip_special_tokens=True))
    return out


def translation_quality(
    fp32: StepGraphs, int8: StepGraphs, setup: TranslationSetup, dev: Sequence[tuple[str, str]]
) -> dict[str, Any]:
    """BLEU of fp32 and int8 greedy translations of a dev sample; raises QualityGateError past the gate."""
    import sacrebleu

    if len(dev) < MIN_DEV_SENTENCES:
        raise ValueError(f"the BLEU gate needs at least {MIN_DEV_SENTENCES} dev pairs, got {len(dev)}")

    sources, references = [s for s, _ in dev], [r for _, r in dev]
    bleu_fp32 = sacrebleu.corpus_bleu(translate(fp32, setup, sources), [references]).score
    bleu_int8 = sacrebleu.corpus_bleu(translate(int8, setup, sources), [references]).score
    figures = {"dev_sentences": len(dev), "bleu_fp32": bleu_fp32, "bleu_int8": bleu_int8}
    if bleu_fp32 - bleu_int8 > MAX_BLEU_DROP:
        raise QualityGateError("BLEU", bleu_fp32, bleu_int8, f"within {MAX_BLEU_DROP} point")
    return figures
