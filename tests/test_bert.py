"""models/bert.py: head shapes, padding, configs, BERT's masking, NSP pairs and the pretraining loss."""

from __future__ import annotations

import random

import pytest
import torch

from seqserve.models.bert import (
    IGNORE_INDEX,
    IS_NEXT,
    NOT_NEXT,
    Bert,
    BertConfig,
    BertConfigError,
    InputTooLong,
    NSPDataError,
    make_nsp_pairs,
    mask_tokens,
    pretraining_loss,
    sentence_embedding,
)
from seqserve.models.checkpoint import load_checkpoint, save_checkpoint

TINY = BertConfig(
    vocab_size=50,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    max_position_embeddings=24,
)
MASK_ID, CLS_ID, SEP_ID, PAD_ID = 4, 2, 3, 0


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_bert() -> Bert:
    torch.manual_seed(0)
    return Bert(TINY).eval()


def _batch(B: int = 3, S: int = 7) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(5, TINY.vocab_size, (B, S), generator=g)
    attention_mask = torch.ones(B, S, dtype=torch.long)
    token_type_ids = torch.zeros(B, S, dtype=torch.long)
    token_type_ids[:, S // 2 :] = 1
    return input_ids, attention_mask, token_type_ids


# --- model --------------------------------------------------------------------------------------------------------


def test_every_head_has_its_shape(tiny_bert: Bert) -> None:
    out = tiny_bert(*_batch(B=3, S=7))
    assert out.sequence_output.shape == (3, 7, 32)
    assert out.pooled_output.shape == (3, 32)
    assert out.mlm_logits.shape == (3, 7, 50)
    assert out.nsp_logits.shape == (3, 2)


def test_encoder_without_heads_returns_none_for_them() -> None:
    model = Bert(BertConfig(**{**TINY.to_dict(), "with_heads": False})).eval()
    out = model(*_batch())
    assert out.mlm_logits is None and out.nsp_logits is None
    assert out.pooled_output.shape == (3, 32)
    assert not any(name.startswith(("mlm.", "nsp.")) for name in model.state_dict())


def test_encoder_without_pooler_returns_none_for_pooled_output() -> None:
    model = Bert(BertConfig(**{**TINY.to_dict(), "with_heads": False, "with_pooler": False})).eval()
    out = model(*_batch())
    assert out.pooled_output is None
    assert out.sequence_output.shape == (3, 7, 32)


@torch.no_grad()
def test_padding_never_changes_real_token_outputs(tiny_bert: Bert) -> None:
    input_ids, attention_mask, token_type_ids = _batch(B=1, S=6)
    alone = tiny_bert(input_ids, attention_mask, token_type_ids)
    # The same sentence padded by 5 positions holding arbitrary ids and segments.
    padded_ids = torch.cat([input_ids, torch.randint(0, 50, (1, 5))], dim=1)
    padded_mask = torch.cat([attention_mask, torch.zeros(1, 5, dtype=torch.long)], dim=1)
    padded_types = torch.cat([token_type_ids, torch.ones(1, 5, dtype=torch.long)], dim=1)
    padded = tiny_bert(padded_ids, padded_mask, padded_types)
    torch.testing.assert_close(padded.sequence_output[:, :6], alone.sequence_output, atol=1e-6, rtol=0)
    torch.testing.assert_close(padded.mlm_logits[:, :6], alone.mlm_logits, atol=1e-6, rtol=0)
    torch.testing.assert_close(padded.nsp_logits, alone.nsp_logits, atol=1e-6, rtol=0)


@torch.no_grad()
def test_segment_ids_change_the_output(tiny_bert: Bert) -> None:
    input_ids, attention_mask, token_type_ids = _batch()
    a = tiny_bert(input_ids, attention_mask, token_type_ids).sequence_output
    b = tiny_bert(input_ids, attention_mask, torch.zeros_like(token_type_ids)).sequence_output
    assert (a - b).abs().max() > 1e-3


def test_mlm_decoder_is_tied_to_word_embeddings(tiny_bert: Bert) -> None:
    assert tiny_bert.mlm.decoder.weight is tiny_bert.embeddings.word.weight


def test_dropout_is_inactive_in_eval_mode(tiny_bert: Bert) -> None:
    batch = _batch()
    with torch.no_grad():
        torch.testing.assert_close(tiny_bert(*batch).mlm_logits, tiny_bert(*batch).mlm_logits, atol=0, rtol=0)


def test_sequence_longer_than_positions_raises_input_too_long(tiny_bert: Bert) -> None:
    with pytest.raises(InputTooLong) as e:
        tiny_bert(torch.ones(1, 25, dtype=torch.long))
    assert (e.value.tokens, e.value.limit) == (25, 24)


def test_config_round_trips_through_dict() -> None:
    assert BertConfig.from_dict(TINY.to_dict()) == TINY


def test_config_with_heads_not_dividing_hidden_raises() -> None:
    with pytest.raises(BertConfigError, match="hidden_size=30.*num_attention_heads=4"):
        BertConfig(hidden_size=30, num_attention_heads=4)


def test_config_from_dict_refuses_unknown_fields() -> None:
    with pytest.raises(BertConfigError, match="hiden_size"):
        BertConfig.from_dict({"hiden_size": 32})


@torch.no_grad()
def test_checkpoint_round_trip_keeps_outputs_and_tying(tiny_bert: Bert, tmp_path) -> None:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    tokenizer = Tokenizer(WordLevel({"[PAD]": 0, "[UNK]": 1}, unk_token="[UNK]"))
    save_checkpoint(tmp_path / "ckpt", tiny_bert, {"text": tokenizer}, {"mlm_accuracy": 0.5})
    loaded = load_checkpoint(tmp_path / "ckpt")
    assert loaded.family == "bert" and loaded.config == TINY
    assert loaded.model.mlm.decoder.weight is loaded.model.embeddings.word.weight
    batch = _batch()
    torch.testing.assert_close(loaded.model(*batch).mlm_logits, tiny_bert(*batch).mlm_logits, atol=0, rtol=0)


def test_mean_pooling_ignores_padding(tiny_bert: Bert) -> None:
    config = BertConfig(**{**TINY.to_dict(), "pooling": "mean", "normalize_embeddings": True})
    input_ids, attention_mask, token_type_ids = _batch(B=1, S=6)
    attention_mask[0, 4:] = 0
    with torch.no_grad():
        out = tiny_bert(input_ids, attention_mask, token_type_ids)
        short = tiny_bert(input_ids[:, :4], attention_mask[:, :4], token_type_ids[:, :4])
    embedding = sentence_embedding(out, attention_mask, config)
    expected = torch.nn.functional.normalize(short.sequence_output.mean(dim=1), dim=-1)
    torch.testing.assert_close(embedding, expected, atol=1e-6, rtol=0)


# --- masking ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def masked_sample() -> dict[str, torch.Tensor]:
    # 1000 x 256 tokens; the first and last two positions of each row are special ([CLS] ... [SEP] [PAD]).
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(5, 1000, (1000, 256), generator=g)
    input_ids[:, 0], input_ids[:, -2], input_ids[:, -1] = CLS_ID, SEP_ID, PAD_ID
    special = torch.zeros_like(input_ids, dtype=torch.bool)
    special[:, [0, -2, -1]] = True
    masked, labels = mask_tokens(input_ids, special, vocab_size=1000, mask_id=MASK_ID, generator=g)
    return {"input_ids": input_ids, "special": special, "masked": masked, "labels": labels}


def test_mask_tokens_chooses_fifteen_percent_of_ordinary_tokens(masked_sample) -> None:
    chosen = masked_sample["labels"] != IGNORE_INDEX
    share = chosen.sum().item() / (~masked_sample["special"]).sum().item()
    assert abs(share - 0.15) < 0.005


def test_mask_tokens_splits_chosen_80_10_10(masked_sample) -> None:
    chosen = masked_sample["labels"] != IGNORE_INDEX
    original, masked = masked_sample["input_ids"][chosen], masked_sample["masked"][chosen]
    n = chosen.sum().item()
    as_mask = (masked == MASK_ID).sum().item() / n
    kept = (masked == original).sum().item() / n
    replaced = ((masked != original) & (masked != MASK_ID)).sum().item() / n
    assert abs(as_mask - 0.8) < 0.01
    # A random replacement draws the original id 1 time in 1000: "kept" is 10% plus that sliver.
    assert abs(kept - 0.1) < 0.01
    assert abs(replaced - 0.1) < 0.01


def test_mask_tokens_never_masks_special_tokens(masked_sample) -> None:
    special = masked_sample["special"]
    assert torch.equal(masked_sample["masked"][special], masked_sample["input_ids"][special])
    assert (masked_sample["labels"][special] == IGNORE_INDEX).all()


def test_mask_tokens_labels_hold_original_ids_only_where_chosen(masked_sample) -> None:
    labels, input_ids, masked = masked_sample["labels"], masked_sample["input_ids"], masked_sample["masked"]
    chosen = labels != IGNORE_INDEX
    assert torch.equal(labels[chosen], input_ids[chosen])
    assert torch.equal(masked[~chosen], input_ids[~chosen])


def test_mask_tokens_is_repeatable_with_a_seeded_generator() -> None:
    ids = torch.randint(5, 100, (8, 16), generator=torch.Generator().manual_seed(3))
    special = torch.zeros_like(ids, dtype=torch.bool)
    a = mask_tokens(ids, special, 100, MASK_ID, torch.Generator().manual_seed(7))
    b = mask_tokens(ids, special, 100, MASK_ID, torch.Generator().manual_seed(7))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# --- next-sentence pairs ------------------------------------------------------------------------------------------


def _documents(n_docs: int = 40, n_sentences: int = 11) -> list[list[str]]:
    return [[f"doc{d} sentence{i}" for i in range(n_sentences)] for d in range(n_docs)]


def test_nsp_pairs_are_half_true_next_half_random() -> None:
    pairs = make_nsp_pairs(_documents(), random.Random(0))
    assert len(pairs) == 40 * 10
    assert sum(p.label == IS_NEXT for p in pairs) == sum(p.label == NOT_NEXT for p in pairs) == 200


def test_nsp_true_pairs_are_consecutive_and_random_pairs_are_not() -> None:
    for pair in make_nsp_pairs(_documents(), random.Random(1)):
        doc_a, i = pair.first.split()
        doc_b, j = pair.second.split()
        follows = doc_a == doc_b and int(j.removeprefix("sentence")) == int(i.removeprefix("sentence")) + 1
        assert follows == (pair.label == IS_NEXT)


def test_nsp_pairs_from_a_single_document_take_non_adjacent_sentences() -> None:
    pairs = make_nsp_pairs(_documents(n_docs=1, n_sentences=9), random.Random(2))
    negatives = [p for p in pairs if p.label == NOT_NEXT]
    assert len(negatives) == 4
    for pair in negatives:
        i, j = (int(s.split("sentence")[1]) for s in (pair.first, pair.second))
        assert j not in (i, i + 1)


def test_nsp_pairs_need_a_document_of_two_sentences() -> None:
    with pytest.raises(NSPDataError, match="3 given"):
        make_nsp_pairs([["one"], ["two"], []], random.Random(0))


# --- loss ---------------------------------------------------------------------------------------------------------


def test_pretraining_loss_is_mlm_plus_nsp_over_chosen_positions(tiny_bert: Bert) -> None:
    input_ids, attention_mask, token_type_ids = _batch()
    with torch.no_grad():
        out = tiny_bert(input_ids, attention_mask, token_type_ids)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[0, 2], labels[2, 5] = 7, 9
    nsp_labels = torch.tensor([IS_NEXT, NOT_NEXT, IS_NEXT])
    loss = pretraining_loss(out, labels, nsp_labels)
    log_probs = out.mlm_logits.log_softmax(-1)
    expected_mlm = -(log_probs[0, 2, 7] + log_probs[2, 5, 9]) / 2
    expected_nsp = torch.nn.functional.cross_entropy(out.nsp_logits, nsp_labels)
    torch.testing.assert_close(loss.mlm, expected_mlm)
    torch.testing.assert_close(loss.total, expected_mlm + expected_nsp)


def test_pretraining_loss_is_finite_when_nothing_was_chosen(tiny_bert: Bert) -> None:
    input_ids, attention_mask, token_type_ids = _batch()
    out = tiny_bert(input_ids, attention_mask, token_type_ids)
    loss = pretraining_loss(out, torch.full_like(input_ids, IGNORE_INDEX), torch.zeros(3, dtype=torch.long))
    assert loss.mlm.item() == 0.0 and torch.isfinite(loss.total)


# --- onnxruntime's BERT optimizer ---------------------------------------------------------------------------------


class _EncoderOutputs(torch.nn.Module):
    """The tensors an export names, as a tuple (the TorchScript exporter does not take NamedTuple outputs with None)."""

    def __init__(self, model: Bert) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids):
        out = self.model(input_ids, attention_mask, token_type_ids)
        return out.sequence_output, out.pooled_output, out.mlm_logits, out.nsp_logits


def test_onnxruntime_bert_optimizer_fuses_attention_of_every_layer(tiny_bert: Bert, tmp_path) -> None:
    import warnings

    import numpy as np
    import onnxruntime
    from onnxruntime.transformers import optimizer

    names = ["input_ids", "attention_mask", "token_type_ids"]
    outputs = ["sequence_output", "pooled_output", "mlm_logits", "nsp_logits"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(
            _EncoderOutputs(tiny_bert).eval(), _batch(B=2, S=5), str(tmp_path / "bert.onnx"), dynamo=False,
            opset_version=17, input_names=names, output_names=outputs,
            dynamic_axes={n: {0: "batch", 1: "seq"} for n in names + ["sequence_output", "mlm_logits"]}
            | {"pooled_output": {0: "batch"}, "nsp_logits": {0: "batch"}},
        )
    tiny_bert.eval()  # export restores the wrapper's training flag onto the model; keep the fixture in eval
    optimized = optimizer.optimize_model(str(tmp_path / "bert.onnx"), model_type="bert", num_heads=2, hidden_size=32)
    fused = optimized.get_fused_operator_statistics()
    assert fused["Attention"] == TINY.num_hidden_layers
    assert fused["SkipLayerNormalization"] == 2 * TINY.num_hidden_layers
    optimized.save_model_to_file(str(tmp_path / "bert.opt.onnx"))

    session = onnxruntime.InferenceSession(str(tmp_path / "bert.opt.onnx"), providers=["CPUExecutionProvider"])
    input_ids, attention_mask, token_type_ids = _batch(B=3, S=9)
    attention_mask[0, 6:] = 0
    feeds = dict(zip(names, (t.numpy() for t in (input_ids, attention_mask, token_type_ids))))
    got = dict(zip(outputs, session.run(outputs, feeds)))
    with torch.no_grad():
        expected = tiny_bert(input_ids, attention_mask, token_type_ids)
    real = attention_mask.bool().numpy()
    np.testing.assert_allclose(got["sequence_output"][real], expected.sequence_output.numpy()[real], atol=1e-4)
    np.testing.assert_allclose(got["nsp_logits"], expected.nsp_logits.numpy(), atol=1e-4)
    np.testing.assert_allclose(got["mlm_logits"][real], expected.mlm_logits.numpy()[real], atol=1e-4)


# --- learning -----------------------------------------------------------------------------------------------------

_CLS, _SEP, _MASK, _FIRST_WORD, _WORDS = 1, 2, 3, 5, 20


def _counting_documents(rng: random.Random, n: int) -> list[list[str]]:
    """Documents of 4-word sentences counting on mod 20: the next sentence starts where the last one stopped."""
    documents = []
    for _ in range(n):
        start = rng.randrange(_WORDS)
        documents.append(
            [" ".join(str((start + 4 * i + j) % _WORDS + _FIRST_WORD) for j in range(4)) for i in range(6)]
        )
    return documents


def _encode_pairs(pairs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    input_ids = torch.tensor(
        [[_CLS, *map(int, p.first.split()), _SEP, *map(int, p.second.split()), _SEP] for p in pairs]
    )
    token_type_ids = torch.tensor([[0] * 6 + [1] * 5 for _ in pairs])  # [CLS] A [SEP] | B [SEP]
    return input_ids, token_type_ids, torch.tensor([p.label for p in pairs])


def test_bert_learns_mlm_and_nsp_of_a_synthetic_corpus_well_above_chance() -> None:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=_FIRST_WORD + _WORDS, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    model = Bert(config)
    optimizer = torch.optim.Adam(model.parameters(), lr=4e-3)
    rng, generator = random.Random(0), torch.Generator().manual_seed(0)
    for _ in range(300):
        input_ids, token_type_ids, nsp_labels = _encode_pairs(make_nsp_pairs(_counting_documents(rng, 8), rng))
        masked, labels = mask_tokens(input_ids, input_ids < _FIRST_WORD, config.vocab_size, _MASK, generator)
        loss = pretraining_loss(model(masked, torch.ones_like(input_ids), token_type_ids), labels, nsp_labels)
        optimizer.zero_grad()
        loss.total.backward()
        optimizer.step()

    model.eval()
    held_out = random.Random(99)
    input_ids, token_type_ids, nsp_labels = _encode_pairs(make_nsp_pairs(_counting_documents(held_out, 100), held_out))
    masked, labels = mask_tokens(input_ids, input_ids < _FIRST_WORD, config.vocab_size, _MASK, generator)
    with torch.no_grad():
        out = model(masked, torch.ones_like(input_ids), token_type_ids)
    chosen = labels != IGNORE_INDEX
    mlm_accuracy = (out.mlm_logits.argmax(-1)[chosen] == labels[chosen]).float().mean().item()
    nsp_accuracy = (out.nsp_logits.argmax(-1) == nsp_labels).float().mean().item()
    assert mlm_accuracy > 0.5  # chance: 1 in 20 words
    assert nsp_accuracy > 0.65  # chance: 0.5 on 500 balanced pairs
