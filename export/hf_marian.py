"""export_hf_marian / export_hf: a local Hugging Face MarianMT (or BERT) directory -> a new repository version.

MarianMT goes through models/hf_marian.py (our TransformerTranslator with Marian's options, tokenizer.json files
converted from the SentencePiece models) and then the same export_model as every checkpoint: graphs, parity,
optional int8 with its BLEU gate, manifest. `export_hf` picks the importer from config.json's model_type.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Sequence

from seqserve.export.parity import DEFAULT_TOLERANCE
from seqserve.export.pipeline import export_hf_bert, export_model

log = logging.getLogger(__name__)


def export_hf_marian(
    hf_dir: str | os.PathLike,
    repository: str | os.PathLike,
    name: str,
    version: int | None = None,
    quantize: str | None = None,
    optimize: bool = True,
    force: bool = False,
    tolerance: float = DEFAULT_TOLERANCE,
    device: str = "cpu",
    dev: Sequence[tuple[str, str]] | None = None,
    max_len: int = 256,
) -> Path:
    """A local MarianMT directory -> REPO/NAME/VERSION (task translation, architecture transformer); returns the
    version folder. `dev` (source, reference) pairs are needed with quantize="int8" (the BLEU gate)."""
    from seqserve.models.hf_marian import load_hf_marian

    imported = load_hf_marian(hf_dir, max_len=max_len)
    return export_model(
        imported.model, "transformer", imported.tokenizers, {"imported": imported.info}, repository, name,
        version=version, quantize=quantize, optimize=optimize, force=force, tolerance=tolerance, device=device,
        dev=dev,
    )  # fmt: skip


def export_hf(hf_dir: str | os.PathLike, repository: str | os.PathLike, name: str, **options: Any) -> Path:
    """A local Hugging Face directory, MarianMT or BERT (by config.json's model_type), into the repository.
    Options are those of export_hf_marian or export_hf_bert; ones the chosen exporter lacks are refused."""
    from seqserve.models.hf_marian import is_marian_dir

    if is_marian_dir(hf_dir):
        options.pop("sample_documents", None)
        options.pop("split_mlm", None)
        return export_hf_marian(hf_dir, repository, name, **options)
    options.pop("dev", None)
    return export_hf_bert(hf_dir, repository, name, **options)
