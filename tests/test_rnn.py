"""The RNN translator (models/rnn.py): cells against their equations, padding, step/teacher-forcing parity, export."""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import Tensor, nn

from seqserve.models.rnn import (
    ARCHS,
    SCORES,
    Attention,
    GRUCell,
    LSTMCell,
    RecurrentLayer,
    RNNConfig,
    RNNConfigError,
    RNNTranslator,
    SequenceTooLong,
)

SRC_V, TGT_V, E, H = 23, 19, 8, 16
PAD = 0


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def make_model(arch: str = "lstm", attention: str = "general", peephole: bool = False, **overrides) -> RNNTranslator:
    torch.manual_seed(0)
    fields = dict(src_vocab_size=SRC_V, tgt_vocab_size=TGT_V, emb_dim=E, hidden_size=H, num_layers=2,
                  attention=attention, peephole=peephole)  # fmt: skip
    fields.update(overrides)
    return RNNTranslator(RNNConfig.from_arch(arch, **fields)).eval()


def make_batch(lengths: list[int], seed: int = 0, tgt_len: int = 5) -> tuple[Tensor, Tensor, Tensor]:
    """Right-padded source ids, their pad mask (True at padding), and teacher-forcing target input."""
    g = torch.Generator().manual_seed(seed)
    S = max(lengths)
    src = torch.randint(4, SRC_V, (len(lengths), S), generator=g)
    pad_mask = torch.arange(S)[None, :] >= torch.tensor(lengths)[:, None]  # (B, S)
    tgt_in = torch.randint(4, TGT_V, (len(lengths), tgt_len), generator=g)
    tgt_in[:, 0] = 1
    return src.masked_fill(pad_mask, PAD), pad_mask, tgt_in


# Every (arch, peephole) the config allows; attention varies with the arch so all four scores are covered.
VARIANTS = [
    (arch, peephole, SCORES[i % len(SCORES)])
    for i, (arch, peephole) in enumerate(
        (a, p) for a, p in itertools.product(ARCHS, (False, True)) if not (p and ARCHS[a][0] == "gru")
    )
]
ALL_COMBINATIONS = [
    (arch, score, peephole)
    for arch, score, peephole in itertools.product(ARCHS, SCORES, (False, True))
    if not (peephole and ARCHS[arch][0] == "gru")
]


# --- config ---------------------------------------------------------------------------------------------------------


def test_config_round_trips_through_dict() -> None:
    config = RNNConfig.from_arch("birnn-lstm", src_vocab_size=10, tgt_vocab_size=11, attention="additive",
                                 peephole=True)
    assert RNNConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("arch", list(ARCHS))
def test_arch_name_round_trips(arch: str) -> None:
    assert RNNConfig.from_arch(arch, src_vocab_size=5, tgt_vocab_size=5).arch == arch


def test_peephole_with_gru_is_rejected() -> None:
    with pytest.raises(RNNConfigError, match="peephole"):
        RNNConfig(src_vocab_size=5, tgt_vocab_size=5, cell="gru", peephole=True)


def test_tied_embeddings_need_equal_sizes_and_share_the_weight() -> None:
    with pytest.raises(RNNConfigError, match="emb_dim=8 hidden_size=16"):
        RNNConfig(src_vocab_size=5, tgt_vocab_size=5, emb_dim=8, hidden_size=16, tie_embeddings=True)
    model = make_model(emb_dim=H, tie_embeddings=True)
    assert model.generator.weight is model.tgt_embedding.weight


def test_unknown_config_field_is_rejected() -> None:
    with pytest.raises(RNNConfigError, match="hidden"):
        RNNConfig.from_dict({"src_vocab_size": 5, "tgt_vocab_size": 5, "hidden": 3})


# --- cells ----------------------------------------------------------------------------------------------------------


def test_peephole_cell_matches_its_equations() -> None:
    torch.manual_seed(1)
    cell = LSTMCell(5, H, peephole=True).double()
    # Split torch's stacked (i, f, g, o) weights into the textbook matrices.
    W_i, W_f, W_c, W_o = cell.weight_ih.detach().chunk(4)
    U_i, U_f, U_c, U_o = cell.weight_hh.detach().chunk(4)
    b_i, b_f, b_c, b_o = (cell.bias_ih + cell.bias_hh).detach().chunk(4)
    p_i, p_f, p_o = cell.peephole.detach()
    σ = torch.sigmoid
    xs = torch.randn(6, 3, 5, dtype=torch.float64)  # (steps, B, I)
    h_ref = c_ref = torch.zeros(3, H, dtype=torch.float64)
    h, c = h_ref, c_ref
    for x in xs:
        i = σ(x @ W_i.T + h_ref @ U_i.T + p_i * c_ref + b_i)
        f = σ(x @ W_f.T + h_ref @ U_f.T + p_f * c_ref + b_f)
        c_ref = f * c_ref + i * torch.tanh(x @ W_c.T + h_ref @ U_c.T + b_c)
        o = σ(x @ W_o.T + h_ref @ U_o.T + p_o * c_ref + b_o)
        h_ref = o * torch.tanh(c_ref)
        with torch.no_grad():
            h, c = cell(x, (h, c))
        torch.testing.assert_close(c, c_ref, atol=1e-6, rtol=0)
        torch.testing.assert_close(h, h_ref, atol=1e-6, rtol=0)


def test_lstm_cell_without_peephole_equals_torch_lstm_cell() -> None:
    torch.manual_seed(2)
    ours, theirs = LSTMCell(5, H), nn.LSTMCell(5, H)
    theirs.load_state_dict(ours.state_dict())
    x, h, c = torch.randn(3, 5), torch.randn(3, H), torch.randn(3, H)
    for a, b in zip(ours(x, (h, c)), theirs(x, (h, c))):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_gru_cell_equals_torch_gru_cell() -> None:
    torch.manual_seed(3)
    ours, theirs = GRUCell(5, H), nn.GRUCell(5, H)
    theirs.load_state_dict(ours.state_dict())
    x, h = torch.randn(3, 5), torch.randn(3, H)
    torch.testing.assert_close(ours(x, h), theirs(x, h), atol=1e-6, rtol=0)


# --- encoder and padding --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_fused_packed_layer_equals_unrolled_masked_layer(cell: str) -> None:
    torch.manual_seed(4)
    layer = RecurrentLayer(cell, 5, H, bidirectional=True, peephole=False)
    lengths = torch.tensor([6, 2, 4])
    valid = torch.arange(6)[None, :] < lengths[:, None]
    x = torch.randn(3, 6, 5)
    with torch.no_grad():
        packed, unrolled = layer.forward_packed(x, lengths), layer.forward_unrolled(x, valid)
    for a, b in zip(packed, unrolled):
        if a is not None:
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


@pytest.mark.parametrize("arch,peephole,score", VARIANTS)
def test_padding_never_reaches_a_real_position(arch: str, peephole: bool, score: str) -> None:
    """A row padded inside a batch encodes exactly as the same row alone (the BiRNN's backward pass included)."""
    model = make_model(arch, score, peephole)
    src, pad_mask, _ = make_batch([7, 3, 5])
    with torch.no_grad():
        batch_memory, batch_state = model.encode(src, pad_mask)
        alone_memory, alone_state = model.encode(src[1:2, :3], pad_mask[1:2, :3])
    torch.testing.assert_close(batch_memory[0][1:2, :3], alone_memory[0], atol=1e-6, rtol=0)
    assert batch_memory[0][1, 3:].abs().max() == 0  # memory at padding is zero
    for a, b in zip(batch_state, alone_state):
        torch.testing.assert_close(a[1:2], b, atol=1e-6, rtol=0)


@pytest.mark.parametrize("arch,peephole,score", VARIANTS)
def test_pad_token_ids_do_not_change_the_output(arch: str, peephole: bool, score: str) -> None:
    model = make_model(arch, score, peephole)
    src, pad_mask, tgt_in = make_batch([6, 2, 4])
    other = src.masked_scatter(pad_mask, torch.randint(4, SRC_V, (int(pad_mask.sum()),)))
    assert not torch.equal(other, src)
    with torch.no_grad():
        torch.testing.assert_close(model(src, pad_mask, tgt_in), model(other, pad_mask, tgt_in), atol=0, rtol=0)


@pytest.mark.parametrize("score", SCORES)
def test_attention_gives_padding_exactly_zero_weight(score: str) -> None:
    torch.manual_seed(5)
    attention = Attention(score, H, 2 * H)
    memory_bank = torch.randn(2, 5, 2 * H)
    pad_mask = torch.tensor([[False, False, True, True, True], [False, False, False, False, True]])
    with torch.no_grad():
        context, weights = attention(torch.randn(2, H), attention.keys(memory_bank), memory_bank, pad_mask)
    assert weights[pad_mask].abs().max() == 0
    torch.testing.assert_close(weights.sum(-1), torch.ones(2))
    assert (weights[~pad_mask] > 0).all()
    assert context.shape == (2, 2 * H)


# --- the surface ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch,score,peephole", ALL_COMBINATIONS)
def test_shapes_of_every_surface_tensor(arch: str, score: str, peephole: bool) -> None:
    model = make_model(arch, score, peephole)
    B, S, T, L, Hm = 3, 6, 5, 2, H * (2 if arch.startswith("birnn") else 1)
    src, pad_mask, tgt_in = make_batch([6, 2, 4], tgt_len=T)
    with torch.no_grad():
        logits = model(src, pad_mask, tgt_in)
        memory, state = model.encode(src, pad_mask)
        log_probs, new_state = model.decode_step(tgt_in[:, 0], memory, pad_mask, state)
    assert logits.shape == (B, T, TGT_V)
    assert log_probs.shape == (B, TGT_V)
    assert len(memory) == len(model.memory_names()) and len(state) == len(model.state_names())
    expected_memory = {"memory_bank": (B, S, Hm), "memory_keys": (B, S, H)}
    for name, tensor in zip(model.memory_names(), memory):
        assert tensor.shape == expected_memory[name], name
    expected_state = {"h": (B, L, H), "c": (B, L, H), "input_feed": (B, H)}
    for name, before, after in zip(model.state_names(), state, new_state):
        assert before.shape == after.shape == expected_state[name], name
    assert model.state_names()[:2] == (("h", "c") if arch.endswith("lstm") else ("h", "input_feed"))


def test_without_input_feeding_the_state_has_no_input_feed() -> None:
    model = make_model("gru", input_feeding=False)
    src, pad_mask, tgt_in = make_batch([4, 3])
    with torch.no_grad():
        memory, state = model.encode(src, pad_mask)
        log_probs, _ = model.decode_step(tgt_in[:, 0], memory, pad_mask, state)
    assert model.state_names() == ("h",) and len(state) == 1
    assert torch.isfinite(log_probs).all()


@pytest.mark.parametrize("arch,peephole,score", VARIANTS)
def test_step_by_step_decoding_equals_teacher_forcing(arch: str, peephole: bool, score: str) -> None:
    model = make_model(arch, score, peephole)
    src, pad_mask, tgt_in = make_batch([6, 2, 4], tgt_len=6)
    with torch.no_grad():
        forced = torch.log_softmax(model(src, pad_mask, tgt_in), dim=-1)  # (B, T, V)
        memory, state = model.encode(src, pad_mask)
        steps = []
        for t in range(tgt_in.shape[1]):
            log_probs, state = model.decode_step(tgt_in[:, t], memory, pad_mask, state)
            steps.append(log_probs)
    torch.testing.assert_close(torch.stack(steps, dim=1), forced, atol=1e-5, rtol=0)


def test_source_longer_than_the_limit_is_refused_with_its_length() -> None:
    model = make_model(max_src_len=4)
    src, pad_mask, tgt_in = make_batch([6, 2])
    with pytest.raises(SequenceTooLong, match="6 tokens, the limit is 4") as info:
        model.encode(src, pad_mask)
    assert (info.value.length, info.value.limit) == (6, 4)


def test_dropout_is_active_in_training_and_off_in_eval() -> None:
    model = make_model(dropout=0.3)
    src, pad_mask, tgt_in = make_batch([6, 2])
    model.train()
    torch.manual_seed(0)
    first = model(src, pad_mask, tgt_in)
    second = model(src, pad_mask, tgt_in)
    assert not torch.allclose(first, second)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(src, pad_mask, tgt_in), model(src, pad_mask, tgt_in), atol=0, rtol=0)


def test_gradients_reach_every_parameter() -> None:
    model = make_model("birnn-lstm", "additive", peephole=True).train()
    src, pad_mask, tgt_in = make_batch([6, 2, 4])
    model(src, pad_mask, tgt_in).logsumexp(-1).sum().backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or p.grad.abs().max() == 0]
    assert missing == []


# --- ONNX -----------------------------------------------------------------------------------------------------------


class _Encode(nn.Module):
    def __init__(self, model: RNNTranslator) -> None:
        super().__init__()
        self.model = model

    def forward(self, src_ids: Tensor, src_pad_mask: Tensor) -> tuple[Tensor, ...]:
        memory, state = self.model.encode(src_ids, src_pad_mask)
        return (*memory, *state)


class _DecodeStep(nn.Module):
    def __init__(self, model: RNNTranslator) -> None:
        super().__init__()
        self.model, self.n_memory = model, len(model.memory_names())

    def forward(self, prev_ids: Tensor, src_pad_mask: Tensor, *tensors: Tensor) -> tuple[Tensor, ...]:
        memory, state = tensors[: self.n_memory], tensors[self.n_memory :]
        log_probs, new_state = self.model.decode_step(prev_ids, memory, src_pad_mask, state)
        return (log_probs, *new_state)


@pytest.mark.parametrize(
    "arch,score,peephole,layers",
    [("birnn-lstm", "additive", True, 2), ("gru", "dot", False, 2), ("lstm", "general", False, 1),
     ("gru", "scaled_dot", False, 3)],
)  # fmt: skip
def test_encode_and_decode_step_export_with_dynamic_batch_and_length(
    tmp_path, arch: str, score: str, peephole: bool, layers: int
) -> None:
    """torch.onnx.export(dynamo=False) of both, then onnxruntime at another batch size and length than traced."""
    model = make_model(arch, score, peephole, num_layers=layers)
    memory_names, state_names = list(model.memory_names()), list(model.state_names())
    src, pad_mask, tgt_in = make_batch([4, 2])
    with torch.no_grad():
        memory, state = model.encode(src, pad_mask)
    source_axes = {0: "batch", 1: "src_len"}
    enc_axes = {"src_ids": source_axes, "src_pad_mask": source_axes}
    enc_axes |= {n: source_axes for n in memory_names} | {n: {0: "batch"} for n in state_names}
    dec_axes = {"prev_ids": {0: "batch"}, "src_pad_mask": source_axes, "log_probs": {0: "batch"}}
    dec_axes |= {n: source_axes for n in memory_names} | {n: {0: "batch"} for n in state_names}
    dec_axes |= {f"new_{n}": {0: "batch"} for n in state_names}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(_Encode(model), (src, pad_mask), str(tmp_path / "encoder.onnx"), dynamo=False,
                          opset_version=17, input_names=["src_ids", "src_pad_mask"],
                          output_names=memory_names + state_names, dynamic_axes=enc_axes)  # fmt: skip
        torch.onnx.export(_DecodeStep(model), (tgt_in[:, 0], pad_mask, *memory, *state), str(tmp_path / "decoder.onnx"),
                          dynamo=False, opset_version=17, input_names=["prev_ids", "src_pad_mask", *memory_names,
                          *state_names], output_names=["log_probs", *[f"new_{n}" for n in state_names]],
                          dynamic_axes=dec_axes)  # fmt: skip
    encoder = ort.InferenceSession(str(tmp_path / "encoder.onnx"), providers=["CPUExecutionProvider"])
    decoder = ort.InferenceSession(str(tmp_path / "decoder.onnx"), providers=["CPUExecutionProvider"])
    # Each encoder layer is one recurrent node: the graph does not depend on the traced source length.
    nodes = onnx.load(str(tmp_path / "encoder.onnx")).graph.node
    recurrent = [n.op_type for n in nodes if n.op_type in ("LSTM", "GRU")]
    assert recurrent == [ARCHS[arch][0].upper()] * model.config.num_layers
    src, pad_mask, tgt_in = make_batch([9, 3, 6, 1], seed=7)  # other batch and length than traced
    encoded = encoder.run(None, {"src_ids": src.numpy(), "src_pad_mask": pad_mask.numpy()})
    with torch.no_grad():
        memory, state = model.encode(src, pad_mask)
        log_probs, new_state = model.decode_step(tgt_in[:, 1], memory, pad_mask, state)
    for ours, theirs in zip(encoded, (*memory, *state)):
        np.testing.assert_allclose(ours, theirs.numpy(), atol=1e-5, rtol=0)
    feeds = {"prev_ids": tgt_in[:, 1].numpy(), "src_pad_mask": pad_mask.numpy()}
    feeds |= dict(zip(memory_names + state_names, encoded))
    for ours, theirs in zip(decoder.run(None, feeds), (log_probs, *new_state)):
        np.testing.assert_allclose(ours, theirs.numpy(), atol=1e-5, rtol=0)
    # Each decoder layer is one recurrent node too (models/rnn._OnnxCellStack), with few shape nodes around them.
    ops = [n.op_type for n in onnx.load(str(tmp_path / "decoder.onnx")).graph.node]
    assert [op for op in ops if op in ("LSTM", "GRU")] == [ARCHS[arch][0].upper()] * layers
    assert "Sigmoid" not in ops
