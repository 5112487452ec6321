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
from seqserve.export.pipeline import ExportError, export_hf_bert, export_model

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
    Options are those of export_hf_marian or export_hf_bert; one the chosen exporter lacks, when set, raises
    ExportError (unset ones, as the command line passes them, are dropped)."""
    from seqserve.models.hf_marian import is_marian_dir

    def drop(reason: str, **keys: str) -> None:
        for key, option in keys.items():
            value = options.pop(key, None)
            if value:
                raise ExportError(f"{option} does not apply to {hf_dir}: {reason}")

    if is_marian_dir(hf_dir):
        drop("a MarianMT translator is not a BERT", sample_documents="--sample (sample_documents=)",
             split_mlm="--split-mlm (split_mlm=)")  # fmt: skip
        return export_hf_marian(hf_dir, repository, name, **options)
    drop("it is a BERT; a dev sample feeds a MarianMT translator's BLEU gate", dev="--dev (dev=)")
    drop("it is a BERT; only a MarianMT translator has a maximum output length", max_len="max_len=")
    return export_hf_bert(hf_dir, repository, name, **options)
