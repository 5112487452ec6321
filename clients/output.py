"""How `seqserve-client` prints results: plain text for a terminal, or one JSON object per line (--json)."""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Iterable, Sequence, TextIO

import numpy as np

from seqserve.clients.types import Hypothesis, ModelInfo, TokenCandidate, Translation


# The table shows the quality metrics only (training internals stay in --json): names ending with these.
QUALITY_METRICS = ("bleu", "chrf", "accuracy", "exact_match")


def json_line(stream: TextIO, record: dict[str, Any]) -> None:
    stream.write(json.dumps(record, ensure_ascii=False) + "\n")


def embeddings(stream: TextIO, texts: Sequence[str], vectors: np.ndarray, as_json: bool) -> None:
    """Text: one line of space-separated values per input. JSON: {"text", "embedding"}."""
    for text, vector in zip(texts, vectors):
        if as_json:
            json_line(stream, {"text": text, "embedding": [float(v) for v in vector]})
        else:
            stream.write(" ".join(f"{v:.6g}" for v in vector) + "\n")


def translations(stream: TextIO, texts: Sequence[str], results: Sequence[Translation], as_json: bool) -> None:
    """Text: the best translation per line, or with several hypotheses "rank<TAB>score<TAB>text" and a blank line."""
    for text, result in zip(texts, results):
        if as_json:
            json_line(
                stream,
                {
                    "source": text,
                    "translation": result.text,
                    "source_tokens": result.source_tokens,
                    "hypotheses": [_hypothesis(h) for h in result.hypotheses],
                    "model": _model(result),
                },
            )
        elif len(result.hypotheses) > 1:
            for rank, hypothesis in enumerate(result.hypotheses, 1):
                stream.write(f"{rank}\t{hypothesis.score:.4f}\t{hypothesis.text}\n")
            stream.write("\n")
        else:
            stream.write(result.text + "\n")


def next_sentence(stream: TextIO, pairs: Sequence[tuple[str, str]], scores: Sequence[float], as_json: bool) -> None:
    """Text: the probability that B follows A, one per pair. JSON: {"first", "second", "is_next_probability"}."""
    for (first, second), score in zip(pairs, scores):
        if as_json:
            json_line(stream, {"first": first, "second": second, "is_next_probability": score})
        else:
            stream.write(f"{score:.4f}\n")


def fill_mask(
    stream: TextIO, texts: Sequence[str], results: Sequence[Sequence[Sequence[TokenCandidate]]], as_json: bool
) -> None:
    """Text: per input, each mask's candidates "token (probability)", masks separated by " | "."""
    for text, masks in zip(texts, results):
        if as_json:
            candidates = [[dataclasses.asdict(c) for c in mask] for mask in masks]
            json_line(stream, {"text": text, "masks": candidates})
        else:
            stream.write(" | ".join(" ".join(f"{c.token} ({c.probability:.3f})" for c in m) for m in masks) + "\n")


def models(stream: TextIO, infos: Iterable[ModelInfo], as_json: bool) -> None:
    """Text: a table of name, version, state, task, architecture, capabilities, quantization, quality metrics."""
    rows = list(infos)
    if as_json:
        for info in rows:
            json_line(stream, model_record(info))
        return
    table = [("NAME", "VERSION", "STATE", "TASK", "ARCHITECTURE", "CAPABILITIES", "QUANT", "METRICS")]
    for info in rows:
        state = info.state if not info.reason else f"{info.state} ({info.reason})"
        metrics = " ".join(f"{k}={v:.4g}" for k, v in sorted(info.metrics.items()) if k.endswith(QUALITY_METRICS))
        table.append(
            (info.name, str(info.version), state, info.task or "-", info.architecture or "-",
             ",".join(info.capabilities) or "-", info.quantization or "-", metrics or "-")
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]) - 1)]
    for row in table:
        stream.write("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1] + "\n")


def model_record(info: ModelInfo) -> dict[str, Any]:
    return dataclasses.asdict(info)  # tuples become JSON lists


def _hypothesis(hypothesis: Hypothesis) -> dict[str, Any]:
    return dataclasses.asdict(hypothesis)


def _model(result: Translation) -> dict[str, Any] | None:
    return None if result.model is None else {"name": result.model.name, "version": result.model.version}
