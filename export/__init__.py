"""seqserve.export: checkpoints and Hugging Face BERTs to ONNX graphs in the model repository.

``export_checkpoint`` and ``export_hf_bert`` import torch; they are loaded on first use so that
``seqserve.export.writer`` (the repository writer) stays importable without torch.
"""

from __future__ import annotations

from typing import Any

__all__ = ["export_checkpoint", "export_hf_bert"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from seqserve.export import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'seqserve.export' has no attribute {name!r}")
