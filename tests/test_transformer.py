"""models/transformer.py: shapes, masks, cached decoding against teacher forcing, positional encoding, config, export."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import Tensor, nn

from seqserve.models.checkpoint import load_checkpoint, save_checkpoint
from seqserve.models.decoding import greedy_decode
from seqserve.models.transformer import (
    InputTooLong,
    TransformerConfig,
    TransformerConfigError,
    TransformerTranslator,
    sinusoidal_table,
)

SRC_V, TGT_V = 23, 19
TINY = dict(
    src_vocab_size=SRC_V,
    tgt_vocab_size=TGT_V,
    d_model=32,
    n_heads=2,
    n_encoder_layers=2,
    n_decoder_layers=2,
    d_ff=64,
    dropout=0.1,  # the models are put in eval mode; a non-zero rate checks that eval really disables it
    max_positions=32,
    max_src_len=32,
    max_tgt_len=32,
)
NORMS = pytest.mark.parametrize("normalize_before", [False, True], ids=["post-norm", "pre-norm"])
nh, hs = 2, 16


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _model(**overrides) -> TransformerTranslator:
    torch.manual_seed(0)
    model = TransformerTranslator(TransformerConfig(**{**TINY, **overrides})).eval()
    if model.final_logits_bias is not None:  # zeros at init: make it matter
        with torch.no_grad():
            model.final_logits_bias.normal_()
    return model


def _batch(B: int = 3, S: int = 7, T: int = 6, seed: int = 1) -> tuple[Tensor, Tensor, Tensor]:
    """Sources with different amounts of padding (row 0 none), and target inputs starting with BOS."""
    g = torch.Generator().manual_seed(seed)
    src_ids = torch.randint(4, SRC_V, (B, S), generator=g)  # (B, S)
    lengths = torch.tensor([S - 2 * b for b in range(B)]).clamp(min=1)  # (B,)
    src_pad_mask = torch.arange(S)[None, :] >= lengths[:, None]  # (B, S) True at padding
    src_ids = src_ids.masked_fill(src_pad_mask, 0)
    tgt_in_ids = torch.randint(4, TGT_V, (B, T), generator=g)  # (B, T)
    tgt_in_ids[:, 0] = 1
    return src_ids, src_pad_mask, tgt_in_ids


def _decode_all(model: TransformerTranslator, src_ids: Tensor, src_pad_mask: Tensor, tgt_in_ids: Tensor) -> Tensor:
    """log_probs (B, T, V) from feeding tgt_in_ids one step at a time through decode_step."""
    memory, state = model.encode(src_ids, src_pad_mask)
    steps = []
    for t in range(tgt_in_ids.shape[1]):
        log_probs, state = model.decode_step(tgt_in_ids[:, t], memory, src_pad_mask, state)
        steps.append(log_probs)
    return torch.stack(steps, dim=1)


# --- shapes -------------------------------------------------------------------------------------------------------


@NORMS
def test_encode_returns_cross_keys_values_and_empty_self_caches(normalize_before: bool) -> None:
    model = _model(normalize_before=normalize_before)
    src_ids, src_pad_mask, _ = _batch(B=3, S=7)
    memory, state = model.encode(src_ids, src_pad_mask)
    assert [tuple(m.shape) for m in memory] == [(3, nh, 7, hs)] * 4
    assert [tuple(s.shape) for s in state] == [(3, nh, 0, hs)] * 4
    assert all(s.dtype == torch.float32 for s in (*memory, *state))


@NORMS
def test_decode_step_returns_log_probs_and_caches_one_position_longer(normalize_before: bool) -> None:
    model = _model(normalize_before=normalize_before)
    src_ids, src_pad_mask, tgt_in_ids = _batch(B=3, S=7)
    memory, state = model.encode(src_ids, src_pad_mask)
    for t in range(3):
        log_probs, state = model.decode_step(tgt_in_ids[:, t], memory, src_pad_mask, state)
        assert log_probs.shape == (3, TGT_V)
        assert [tuple(s.shape) for s in state] == [(3, nh, t + 1, hs)] * 4
    assert torch.allclose(log_probs.exp().sum(-1), torch.ones(3), atol=1e-5)


@NORMS
def test_forward_returns_logits_per_target_position(normalize_before: bool) -> None:
    model = _model(normalize_before=normalize_before)
    src_ids, src_pad_mask, tgt_in_ids = _batch(B=3, S=7, T=5)
    assert model(src_ids, src_pad_mask, tgt_in_ids).shape == (3, 5, TGT_V)


def test_memory_and_state_names_follow_the_design_contract() -> None:
    model = _model()
    assert model.memory_names() == ["cross_key_0", "cross_value_0", "cross_key_1", "cross_value_1"]
    assert model.state_names() == ["self_key_0", "self_value_0", "self_key_1", "self_value_1"]


# --- masks --------------------------------------------------------------------------------------------------------


@NORMS
def test_padded_source_positions_are_never_attended(normalize_before: bool) -> None:
    model = _model(normalize_before=normalize_before)
    src_ids, src_pad_mask, tgt_in_ids = _batch()
    assert src_pad_mask.any()
    other = src_ids.clone()
    other[src_pad_mask] = torch.randint(4, SRC_V, (int(src_pad_mask.sum()),), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        torch.testing.assert_close(model(other, src_pad_mask, tgt_in_ids), model(src_ids, src_pad_mask, tgt_in_ids))
        torch.testing.assert_close(
            _decode_all(model, other, src_pad_mask, tgt_in_ids), _decode_all(model, src_ids, src_pad_mask, tgt_in_ids)
        )


@NORMS
def test_changing_a_later_target_token_leaves_earlier_logits_unchanged(normalize_before: bool) -> None:
    model = _model(normalize_before=normalize_before)
    src_ids, src_pad_mask, tgt_in_ids = _batch(T=6)
    changed = tgt_in_ids.clone()
    changed[:, 4] = (changed[:, 4] + 1) % TGT_V
    with torch.no_grad():
        before, after = model(src_ids, src_pad_mask, tgt_in_ids), model(src_ids, src_pad_mask, changed)
    torch.testing.assert_close(after[:, :4], before[:, :4])
    assert (after[:, 4:] - before[:, 4:]).abs().max() > 1e-3  # the change is visible from its own position on


# --- cached decoding ----------------------------------------------------------------------------------------------

VARIANTS = {
    "post-norm": {},
    "pre-norm": {"normalize_before": True},
    "marian-like": {
        "positional_encoding": "sinusoidal_halves",
        "activation": "swish",
        "final_logits_bias": True,
        "share_embeddings": True,
        "tgt_vocab_size": SRC_V,
        "decoder_start_id": 0,
    },
    "learned-positions-gelu-unscaled": {
        "positional_encoding": "learned",
        "activation": "gelu",
        "scale_embedding": False,
        "tie_output_embedding": False,
        "normalize_before": True,
    },
}


@pytest.mark.parametrize("overrides", VARIANTS.values(), ids=VARIANTS.keys())
def test_step_by_step_decoding_equals_teacher_forcing(overrides: dict) -> None:
    model = _model(**overrides)
    src_ids, src_pad_mask, tgt_in_ids = _batch(T=8)
    with torch.no_grad():
        teacher_forced = torch.log_softmax(model(src_ids, src_pad_mask, tgt_in_ids), dim=-1)  # (B, T, V)
        stepwise = _decode_all(model, src_ids, src_pad_mask, tgt_in_ids)  # (B, T, V)
    assert (stepwise - teacher_forced).abs().max() < 1e-5


def test_decoding_one_batch_does_not_disturb_another() -> None:
    # No state on the module: interleaving two decodings gives what each gives alone.
    model = _model()
    a, b = _batch(seed=1), _batch(B=2, S=5, seed=2)
    with torch.no_grad():
        alone_a, alone_b = _decode_all(model, *a), _decode_all(model, *b)
        (mem_a, st_a), (mem_b, st_b) = model.encode(a[0], a[1]), model.encode(b[0], b[1])
        steps_a, steps_b = [], []
        for t in range(a[2].shape[1]):
            lp_a, st_a = model.decode_step(a[2][:, t], mem_a, a[1], st_a)
            lp_b, st_b = model.decode_step(b[2][:, t], mem_b, b[1], st_b)
            steps_a.append(lp_a)
            steps_b.append(lp_b)
    torch.testing.assert_close(torch.stack(steps_a, 1), alone_a)
    torch.testing.assert_close(torch.stack(steps_b, 1), alone_b)


def test_greedy_decode_output_is_the_argmax_of_teacher_forcing_on_itself() -> None:
    model = _model()
    src_ids, src_pad_mask, _ = _batch()
    tokens = greedy_decode(model, src_ids, src_pad_mask, max_len=6, bos_id=1, eos_id=2)  # (B, T)
    tgt_in_ids = torch.cat([torch.ones(tokens.shape[0], 1, dtype=torch.long), tokens[:, :-1]], dim=1)
    with torch.no_grad():
        argmax = model(src_ids, src_pad_mask, tgt_in_ids).argmax(-1)  # (B, T)
    # Positions after a row's EOS are padding in `tokens`, so compare up to and including each row's EOS.
    ended = (tokens == 2).long().cumsum(1)
    live = (ended == 0) | ((ended == 1) & (tokens == 2))
    assert tokens.shape[1] >= 1
    assert torch.equal(argmax[live], tokens[live])


# --- positional encoding ------------------------------------------------------------------------------------------


def test_sinusoidal_encoding_matches_the_formula() -> None:
    table = sinusoidal_table(20, 8)
    for pos in (0, 1, 7, 19):
        for i in range(4):
            angle = pos / 10000 ** (2 * i / 8)
            assert table[pos, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-6)
            assert table[pos, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)


def test_sinusoidal_halves_layout_puts_sines_first_then_cosines() -> None:
    interleaved, halves = sinusoidal_table(20, 8), sinusoidal_table(20, 8, layout="halves")
    torch.testing.assert_close(halves[:, :4], interleaved[:, 0::2])
    torch.testing.assert_close(halves[:, 4:], interleaved[:, 1::2])


# --- config and weights -------------------------------------------------------------------------------------------


def test_config_round_trips_through_a_dict() -> None:
    config = TransformerConfig(**TINY, normalize_before=True, activation="gelu")
    assert TransformerConfig.from_dict(config.to_dict()) == config
    assert config.decoder_start_id == config.bos_id


@pytest.mark.parametrize(
    "overrides, words",
    [
        ({"n_heads": 3}, "d_model=32 is not divisible by n_heads=3"),
        ({"share_embeddings": True}, "src_vocab_size=23 and tgt_vocab_size=19"),
        ({"activation": "tanh"}, "activation='tanh'"),
        ({"max_positions": 16}, "max_positions=16"),
    ],
    ids=["heads", "joint-vocabulary", "activation", "positions"],
)
def test_config_rejects_inconsistent_numbers_naming_them(overrides: dict, words: str) -> None:
    with pytest.raises(TransformerConfigError, match=words.replace("(", r"\(")):
        TransformerConfig(**{**TINY, **overrides})


def test_source_longer_than_the_positional_encoding_raises_input_too_long() -> None:
    model = _model()
    src_ids = torch.full((1, 40), 5)
    with pytest.raises(InputTooLong) as error:
        model.encode(src_ids, torch.zeros(1, 40, dtype=torch.bool))
    assert (error.value.tokens, error.value.limit, error.value.side) == (40, 32, "source")


def test_share_embeddings_ties_source_target_and_output_matrices() -> None:
    model = _model(share_embeddings=True, tgt_vocab_size=SRC_V)
    assert model.src_embed.weight is model.tgt_embed.weight is model.output.weight


def test_checkpoint_round_trip_gives_the_same_logits(tmp_path: Path) -> None:
    model = _model(final_logits_bias=True, positional_encoding="learned")
    src_ids, src_pad_mask, tgt_in_ids = _batch()
    save_checkpoint(tmp_path / "ckpt", model, tokenizers={})
    loaded = load_checkpoint(tmp_path / "ckpt").model
    assert loaded.config == model.config
    with torch.no_grad():
        torch.testing.assert_close(loaded(src_ids, src_pad_mask, tgt_in_ids), model(src_ids, src_pad_mask, tgt_in_ids))


# --- ONNX ---------------------------------------------------------------------------------------------------------


class _Encoder(nn.Module):
    def __init__(self, model: TransformerTranslator) -> None:
        super().__init__()
        self.model = model

    def forward(self, src_ids: Tensor, src_pad_mask: Tensor) -> tuple[Tensor, ...]:
        memory, state = self.model.encode(src_ids, src_pad_mask)
        return (*memory, *state)


class _DecoderStep(nn.Module):
    def __init__(self, model: TransformerTranslator) -> None:
        super().__init__()
        self.model = model
        self.n_memory = len(model.memory_names())

    def forward(self, prev_ids: Tensor, src_pad_mask: Tensor, *tensors: Tensor) -> tuple[Tensor, ...]:
        memory, state = tensors[: self.n_memory], tensors[self.n_memory :]
        log_probs, new_state = self.model.decode_step(prev_ids, memory, src_pad_mask, state)
        return (log_probs, *new_state)


def test_onnx_export_runs_from_an_empty_cache_at_other_batch_and_lengths(tmp_path: Path) -> None:
    model = _model(normalize_before=True)
    memory_names, state_names = model.memory_names(), model.state_names()
    src_ids, src_pad_mask, _ = _batch(B=2, S=5)
    memory, _ = model.encode(src_ids, src_pad_mask)
    past = tuple(torch.randn(2, nh, 3, hs) for _ in state_names)  # a non-empty example cache: P stays symbolic
    src_axes = {0: "batch", 1: "src_len"}
    memory_axes = {name: {0: "batch", 2: "src_len"} for name in memory_names}
    # Wrappers in eval mode: the exporter restores the wrapper's mode afterwards, recursively, into the model too.
    with torch.no_grad():
        torch.onnx.export(
            _Encoder(model).eval(), (src_ids, src_pad_mask), str(tmp_path / "encoder.onnx"),
            input_names=["src_ids", "src_pad_mask"], output_names=memory_names + state_names,
            dynamic_axes={"src_ids": src_axes, "src_pad_mask": src_axes, **memory_axes}, opset_version=17, dynamo=False,
        )  # fmt: skip
        torch.onnx.export(
            _DecoderStep(model).eval(), (src_ids[:, 0], src_pad_mask, *memory, *past), str(tmp_path / "decoder.onnx"),
            input_names=["prev_ids", "src_pad_mask", *memory_names, *state_names],
            output_names=["log_probs", *(f"new_{name}" for name in state_names)],
            dynamic_axes={"prev_ids": {0: "batch"}, "src_pad_mask": src_axes, **memory_axes,
                          **{name: {0: "batch", 2: "past_len"} for name in state_names},
                          **{f"new_{name}": {0: "batch", 2: "new_len"} for name in state_names}},
            opset_version=17, dynamo=False,
        )  # fmt: skip
    encoder = ort.InferenceSession(str(tmp_path / "encoder.onnx"), providers=["CPUExecutionProvider"])
    decoder = ort.InferenceSession(str(tmp_path / "decoder.onnx"), providers=["CPUExecutionProvider"])

    src_ids, src_pad_mask, tgt_in_ids = _batch(B=4, S=9, T=5, seed=3)  # other batch and source length
    outputs = encoder.run(None, {"src_ids": src_ids.numpy(), "src_pad_mask": src_pad_mask.numpy()})
    onnx_memory, onnx_state = outputs[: len(memory_names)], outputs[len(memory_names) :]
    assert [s.shape for s in onnx_state] == [(4, nh, 0, hs)] * 4
    with torch.no_grad():
        expected = _decode_all(model, src_ids, src_pad_mask, tgt_in_ids)  # (B, T, V)
    for t in range(tgt_in_ids.shape[1]):
        log_probs, *onnx_state = decoder.run(None, {
            "prev_ids": tgt_in_ids[:, t].numpy(), "src_pad_mask": src_pad_mask.numpy(),
            **dict(zip(memory_names, onnx_memory)), **dict(zip(state_names, onnx_state)),
        })  # fmt: skip
        np.testing.assert_allclose(log_probs, expected[:, t].numpy(), atol=1e-4)
    assert onnx_state[0].shape == (4, nh, 5, hs)
    assert not model.training


@pytest.mark.parametrize("positional_encoding", ["sinusoidal", "learned"])
def test_a_row_with_a_masked_cache_prefix_decodes_as_it_does_alone(positional_encoding):
    """A sentence joining a running batch: its cache padded in front (cache_pad_mask) to the batch's length."""
    model = _model(positional_encoding=positional_encoding)
    g = torch.Generator().manual_seed(5)
    src = torch.randint(4, TINY["src_vocab_size"], (2, 6), generator=g)
    pad = torch.zeros(2, 6, dtype=torch.bool)
    pad[1, 4:] = True
    tokens = torch.randint(4, TINY["tgt_vocab_size"], (2, 5), generator=g)
    with torch.no_grad():
        memory, state = model.encode(src, pad)
        # Alone: row 1 decodes its tokens from an empty cache.
        alone_memory, alone_state = model.encode(src[1:], pad[1:])
        alone = []
        for t in range(3):
            log_probs, alone_state = model.decode_step(tokens[1:, t], alone_memory, pad[1:], alone_state)
            alone.append(log_probs[0])
        # Together: row 0 has taken two steps when row 1 joins; row 1's cache is masked at those two positions.
        first = tuple(m[:1] for m in memory)
        row0_state = tuple(s[:1] for s in state)
        for t in range(2):
            _, row0_state = model.decode_step(tokens[:1, t], first, pad[:1], row0_state)
        joined = tuple(torch.cat([a, torch.zeros_like(a)]) for a in row0_state)  # (2, nh, 2, hs): row 1 all padding
        cache_mask = torch.tensor([[False, False], [True, True]])
        together = []
        for t in range(3):
            prev = torch.stack([tokens[0, 2 + t], tokens[1, t]])
            log_probs, joined = model.decode_step(prev, memory, pad, joined, cache_pad_mask=cache_mask)
            together.append(log_probs[1])
            cache_mask = torch.cat([cache_mask, torch.zeros(2, 1, dtype=torch.bool)], dim=1)
    for a, b in zip(alone, together):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=0)


def test_multi_head_attention_equals_torch_attention_with_padding_and_causal_masks() -> None:
    """The textbook scaled dot-product attention: ours against torch's nn.MultiheadAttention (weights copied) with a
    key padding mask, and against F.scaled_dot_product_attention with the causal mask."""
    import torch.nn.functional as F

    from seqserve.models.transformer import MultiHeadAttention, _attention_bias, causal_mask

    torch.manual_seed(0)
    hidden, heads, batch, length, keys = 16, 4, 2, 5, 7
    ours = MultiHeadAttention(hidden, heads, 0.0).double().eval()
    theirs = nn.MultiheadAttention(hidden, heads, batch_first=True).double().eval()
    x = torch.randn(batch, length, hidden, dtype=torch.float64)
    memory = torch.randn(batch, keys, hidden, dtype=torch.float64)
    padding = torch.tensor([[False] * 7, [False] * 4 + [True] * 3])  # True: a padded key
    with torch.no_grad():
        theirs.in_proj_weight.copy_(torch.cat([ours.query.weight, ours.key.weight, ours.value.weight]))
        theirs.in_proj_bias.copy_(torch.cat([ours.query.bias, ours.key.bias, ours.value.bias]))
        theirs.out_proj.weight.copy_(ours.out.weight)
        theirs.out_proj.bias.copy_(ours.out.bias)
        cross = ours(x, *ours.project_kv(memory), _attention_bias((~padding)[:, None, None, :], torch.float64))
        expected, _ = theirs(x, memory, memory, key_padding_mask=padding)
        torch.testing.assert_close(cross, expected, rtol=0, atol=1e-12)

        causal = ours(x, *ours.project_kv(x), _attention_bias(causal_mask(length), torch.float64)[None, None])
        q = ours.query(x).view(batch, length, heads, hidden // heads).transpose(1, 2)
        k, v = ours.project_kv(x)
        reference = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        expected = ours.out(reference.transpose(1, 2).reshape(batch, length, hidden))
        torch.testing.assert_close(causal, expected, rtol=0, atol=1e-12)
