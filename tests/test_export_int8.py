"""int8 exports: quantized graphs gated on task quality (embedding cosine, NSP accuracy, BLEU)."""

from __future__ import annotations

import onnx
import pytest
import torch

from seqserve.export import export_checkpoint
from seqserve.export.graphs import export_bert, export_translator
from seqserve.export.parity import StepGraphs, open_session
from seqserve.export.quantize import (
    MAX_BLEU_DROP,
    MAX_NSP_ACCURACY_DROP,
    MIN_EMBEDDING_COSINE,
    MIN_MLM_LOGITS_COSINE,
    MIN_MLM_TOP1_AGREEMENT,
    QualityGateError,
    TranslationSetup,
    bert_quality,
    mlm_agreement,
    translation_quality,
)
from seqserve.models.checkpoint import build_model, load_checkpoint
from seqserve.server.repository import ModelRepository, load_model

from conftest import tiny_dev_pairs, tiny_documents

torch.set_num_threads(1)


def _op_types(path) -> set[str]:
    return {node.op_type for node in onnx.load(str(path)).graph.node}


def test_int8_lstm_passes_its_bleu_gate(tiny_repository):
    manifest = ModelRepository(tiny_repository).manifest("tiny-lstm-int8")
    quality = manifest.quality
    assert manifest.quantization == "int8"
    assert quality["dev_sentences"] == len(tiny_dev_pairs())
    assert quality["bleu_fp32"] > 10  # a gate on a model that translates, not on noise
    assert quality["bleu_fp32"] - quality["bleu_int8"] <= MAX_BLEU_DROP
    assert "MatMulInteger" in _op_types(tiny_repository / "tiny-lstm-int8" / "1" / "decoder.onnx")


def test_int8_lstm_greedy_loop_runs_the_int8_step_graph(tiny_repository):
    """greedy.onnx of an int8 export loops over the int8 decoder and is gated against it, not the fp32 one."""
    manifest = ModelRepository(tiny_repository).manifest("tiny-lstm-int8")
    assert "greedy" in manifest.graphs
    record = manifest.raw["greedy_loop_parity"]
    assert record["greedy_tokens_equal"] is True and record["max_abs_diff"] <= record["tolerance"]
    loop = onnx.load(str(tiny_repository / "tiny-lstm-int8" / "1" / "greedy.onnx"))
    [node] = [n for n in loop.graph.node if n.op_type == "Loop"]
    body = next(a.g for a in node.attribute if a.name == "body")
    assert "MatMulInteger" in {n.op_type for n in body.node}


def test_int8_optimized_transformer_passes_its_bleu_gate(tiny_checkpoints, tmp_path):
    path = export_checkpoint(tiny_checkpoints["transformer"], tmp_path, "t8", quantize="int8", dev=tiny_dev_pairs())
    manifest = load_model(path).manifest
    assert manifest.raw["optimization"]["encoder.onnx"]  # fused (com.microsoft) ops were quantized too
    assert manifest.quality["bleu_fp32"] > 10
    assert manifest.quality["bleu_fp32"] - manifest.quality["bleu_int8"] <= MAX_BLEU_DROP
    assert "MatMulInteger" in _op_types(path / "decoder.onnx")


def test_int8_bert_passes_its_embedding_and_nsp_gates(tiny_repository):
    manifest = ModelRepository(tiny_repository).manifest("tiny-bert-int8")
    quality = manifest.quality
    assert manifest.quantization == "int8"
    assert quality["embedding_cosine_min"] >= MIN_EMBEDDING_COSINE
    assert quality["nsp_pairs"] > 100
    assert quality["nsp_accuracy_fp32"] - quality["nsp_accuracy_int8"] <= MAX_NSP_ACCURACY_DROP
    ops = _op_types(tiny_repository / "tiny-bert-int8" / "1" / "model.onnx")
    assert {"MatMulInteger", "DynamicQuantizeLinear"} <= ops


def test_int8_models_load_and_run_through_the_loader(tiny_repository):
    for name in ("tiny-lstm-int8", "tiny-bert-int8"):
        loaded = ModelRepository(tiny_repository).load(name)
        assert loaded.sessions and loaded.manifest.parity["max_abs_diff"] <= loaded.manifest.parity["tolerance"]


def test_embedding_gate_refuses_a_model_that_is_not_the_same(tiny_repository, tiny_checkpoints, tmp_path):
    ckpt = load_checkpoint(tiny_checkpoints["bert"])
    torch.manual_seed(5)
    _, other = build_model("bert", ckpt.config.to_dict())  # same shapes, different weights
    exported = export_bert(other.eval(), tmp_path)
    fp32 = load_model(ModelRepository(tiny_repository).version_dir("tiny-bert")).sessions["model"]
    with pytest.raises(QualityGateError, match="embedding cosine"):
        bert_quality(fp32, open_session(exported.path), ckpt.tokenizers["text"], ckpt.config.pooling, True, 64,
                     tiny_documents())  # fmt: skip


def test_a_sample_with_nothing_to_mask_is_a_gate_error_not_a_crash(tiny_repository, tiny_checkpoints):
    repo = ModelRepository(tiny_repository)
    fp32, int8 = (load_model(repo.version_dir(name)).sessions["model"] for name in ("tiny-bert", "tiny-bert-int8"))
    tokenizer = load_checkpoint(tiny_checkpoints["bert"]).tokenizers["text"]
    with pytest.raises(QualityGateError, match="no token to mask"):
        mlm_agreement(fp32, int8, tokenizer, ["", ""])


def test_bleu_gate_refuses_an_untrained_translator(tiny_repository, tiny_checkpoints, tmp_path):
    ckpt = load_checkpoint(tiny_checkpoints["lstm"])
    torch.manual_seed(5)
    _, untrained = build_model("rnn", ckpt.config.to_dict())
    enc, dec = export_translator(untrained.eval(), tmp_path)
    names = tuple(untrained.memory_names()), tuple(untrained.state_names())
    loaded = load_model(ModelRepository(tiny_repository).version_dir("tiny-lstm"))
    good = StepGraphs(loaded.sessions["encoder"], loaded.sessions["decoder"], *names)
    bad = StepGraphs(open_session(enc.path), open_session(dec.path), *names)
    config = ckpt.config
    setup = TranslationSetup(ckpt.tokenizers["source"], ckpt.tokenizers["target"], config.bos_id, config.eos_id,
                             config.pad_id, config.max_src_len, 20)  # fmt: skip
    with pytest.raises(QualityGateError, match="BLEU"):
        translation_quality(good, bad, setup, tiny_dev_pairs()[:30])


def test_int8_figures_are_among_the_metrics_and_parity_says_it_is_fp32s(tiny_repository):
    """ListModels lists numeric `metrics`: an int8 version shows its gates' figures there, as quality_*."""
    for name, figure in (("tiny-lstm-int8", "bleu_int8"), ("tiny-bert-int8", "mlm_top1_agreement")):
        manifest = ModelRepository(tiny_repository).manifest(name)
        assert manifest.metrics[f"quality_{figure}"] == manifest.quality[figure]
        assert manifest.parity["precision"] == "fp32"  # measured on the graphs before quantization


def test_int8_bert_gates_its_masked_lm_head(tiny_repository):
    quality = ModelRepository(tiny_repository).manifest("tiny-bert-int8").quality
    assert quality["mlm_masked_positions"] > 100
    assert quality["mlm_logits_cosine_min"] >= MIN_MLM_LOGITS_COSINE
    assert quality["mlm_top1_agreement"] >= MIN_MLM_TOP1_AGREEMENT


def test_mlm_gate_refuses_a_head_that_is_not_the_same(tiny_repository, tiny_checkpoints, tmp_path):
    """Same encoder (so embeddings and NSP pass), a split MLM head from other weights: the MLM gate refuses."""
    from seqserve.export.graphs import export_mlm_head

    ckpt = load_checkpoint(tiny_checkpoints["bert"])
    torch.manual_seed(5)
    _, other = build_model("bert", ckpt.config.to_dict())
    fp32 = load_model(ModelRepository(tiny_repository).version_dir("tiny-bert")).sessions["model"]
    own_mlm = open_session(export_mlm_head(ckpt.model, tmp_path, "own.onnx").path)
    other_mlm = open_session(export_mlm_head(other.eval(), tmp_path, "other.onnx").path)
    figures = bert_quality(fp32, fp32, ckpt.tokenizers["text"], ckpt.config.pooling, True, 64, tiny_documents(),
                           fp32_mlm=own_mlm, int8_mlm=own_mlm)  # fmt: skip
    assert figures["mlm_top1_agreement"] == 1.0
    with pytest.raises(QualityGateError, match="masked-LM"):
        bert_quality(fp32, fp32, ckpt.tokenizers["text"], ckpt.config.pooling, True, 64, tiny_documents(),
                     fp32_mlm=own_mlm, int8_mlm=other_mlm)  # fmt: skip
