"""BERT export: one model.onnx with every output, optimised with fused attention, equal to PyTorch."""

from __future__ import annotations

import numpy as np
import onnx
import torch

from seqserve.models.checkpoint import load_checkpoint
from seqserve.server.repository import ModelRepository, load_model

from conftest import tiny_documents

torch.set_num_threads(1)


def _feeds(tokenizer, inputs) -> dict[str, np.ndarray]:
    tokenizer.enable_padding(pad_id=tokenizer.token_to_id("[PAD]"), pad_token="[PAD]")
    encodings = tokenizer.encode_batch(inputs)
    return {
        "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
        "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64),
    }


def test_bert_outputs_match_torch_on_texts_and_pairs(tiny_repository, tiny_checkpoints):
    loaded = load_model(ModelRepository(tiny_repository).version_dir("tiny-bert"))
    model = load_checkpoint(tiny_checkpoints["bert"]).model
    docs = tiny_documents()
    for inputs in ([docs[0][0], docs[1][2] + " " + docs[1][3], docs[2][1]], [(docs[3][0], docs[3][1])] * 2):
        feeds = _feeds(loaded.tokenizers["text"], inputs)
        assert feeds["attention_mask"].min() == 0 or len({len(x) for x in inputs}) == 1
        outputs = loaded.sessions["model"].run(None, feeds)
        with torch.no_grad():
            reference = model(*(torch.from_numpy(feeds[n]) for n in ("input_ids", "attention_mask", "token_type_ids")))
        assert loaded.manifest.outputs == ("sequence_output", "pooled_output", "mlm_logits", "nsp_logits")
        for name, ours in zip(loaded.manifest.outputs, outputs):
            np.testing.assert_allclose(ours, getattr(reference, name).numpy(), atol=1e-4, err_msg=name)


def test_bert_export_records_parity_at_several_shapes(tiny_repository):
    manifest = ModelRepository(tiny_repository).manifest("tiny-bert")
    assert manifest.parity["max_abs_diff"] <= manifest.parity["tolerance"]
    assert len({tuple(c) for c in manifest.parity["cases"]}) >= 3
    assert set(manifest.parity["per_output"]) == {"sequence_output", "pooled_output", "mlm_logits", "nsp_logits"}


def test_bert_graph_has_fused_attention(tiny_repository, tiny_checkpoints):
    manifest = ModelRepository(tiny_repository).manifest("tiny-bert")
    layers = load_checkpoint(tiny_checkpoints["bert"]).config.num_hidden_layers
    graph = onnx.load(str(tiny_repository / "tiny-bert" / "1" / "model.onnx"))
    ops = [node.op_type for node in graph.graph.node]
    assert ops.count("Attention") == layers == manifest.raw["optimization"]["model.onnx"]["Attention"]


def test_bert_manifest_names_tokens_limits_and_pooling(tiny_repository, tiny_checkpoints):
    manifest = ModelRepository(tiny_repository).manifest("tiny-bert")
    ckpt = load_checkpoint(tiny_checkpoints["bert"])
    tok = ckpt.tokenizers["text"]
    assert manifest.special_tokens == {name: tok.token_to_id(f"[{name.upper()}]")
                                       for name in ("pad", "unk", "cls", "sep", "mask")}  # fmt: skip
    assert manifest.limits == {"max_tokens": ckpt.config.max_position_embeddings}
    assert manifest.pooling == ckpt.config.pooling
    assert manifest.tokenizers == {"text": "tokenizer.json"}
    assert [s.name for s in manifest.graphs["model"].inputs] == ["input_ids", "attention_mask", "token_type_ids"]
    assert all(s.shape == ("batch", "seq") and s.dtype == "int64" for s in manifest.graphs["model"].inputs)


def test_split_mlm_head_gives_the_same_logits_from_its_own_graph(tiny_checkpoints, tmp_path):
    from seqserve.export import export_checkpoint

    loaded = load_model(export_checkpoint(tiny_checkpoints["bert"], tmp_path, "split", split_mlm=True))
    assert set(loaded.sessions) == {"model", "mlm"}
    assert "mlm_logits" not in loaded.manifest.graphs["model"].output_names
    assert loaded.manifest.outputs == ("sequence_output", "pooled_output", "mlm_logits", "nsp_logits")
    feeds = _feeds(loaded.tokenizers["text"], [" ".join(doc[:2]) for doc in tiny_documents()[:3]])
    (sequence,) = loaded.sessions["model"].run(["sequence_output"], feeds)
    (mlm_logits,) = loaded.sessions["mlm"].run(None, {"sequence_output": sequence})
    model = load_checkpoint(tiny_checkpoints["bert"]).model
    with torch.no_grad():
        reference = model(*(torch.from_numpy(feeds[n]) for n in ("input_ids", "attention_mask", "token_type_ids")))
    np.testing.assert_allclose(mlm_logits, reference.mlm_logits.numpy(), atol=1e-4)
