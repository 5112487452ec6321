"""RNN translator: (Bi)LSTM/GRU encoder, attentional LSTM/GRU decoder with input feeding (Luong et al., 2015).

Read leaves first: cell equations -> recurrent encoder layer -> encoder -> attention -> config -> translator.

Letters: B batch, S source length, T target length, E embedding size, H hidden size (decoder and each encoder
direction), D encoder directions (1 or 2), Hm = D*H memory size, K key size, L layers, V vocabulary.

Padding is on the right and `src_pad_mask` is True at padding. The encoder never lets padding change a real
position's state (the backward direction of a BiRNN starts at each row's last real token), memory at padding is zero,
and attention gives padding exactly zero weight. The model keeps no decoding state: `encode` returns it and
`decode_step` takes and returns it, all tensors batch-first (axis 0 is the batch).

ONNX: under `torch.onnx.export(..., dynamo=False)` each encoder layer becomes one ONNX `LSTM`/`GRU` node with
`sequence_lens` (and peephole input `P`), so the graph keeps dynamic batch and source length; in `decode_step` each
decoder layer becomes one such node over a one-step sequence (`_OnnxCellStack`), the rest is plain tensor ops.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

logger = logging.getLogger(__name__)

CELLS = ("lstm", "gru")
SCORES = ("dot", "general", "additive", "scaled_dot")
# architecture name -> (cell, bidirectional)
ARCHS: dict[str, tuple[str, bool]] = {
    "lstm": ("lstm", False),
    "gru": ("gru", False),
    "birnn-lstm": ("lstm", True),
    "birnn-gru": ("gru", True),
}


class RNNConfigError(ValueError):
    """An RNNConfig field holds a value the model cannot be built with."""


class SequenceTooLong(ValueError):
    """A source or target sequence is longer than the configured limit."""

    def __init__(self, side: str, length: int, limit: int) -> None:
        super().__init__(f"{side} sequence has {length} tokens, the limit is {limit}")
        self.side, self.length, self.limit = side, length, limit


# ---------------------------------------------------------------------------------------------------------------
# Cells, written from their equations. Gate order in the weights is torch's: LSTM (i, f, g, o), GRU (r, z, n).
# ---------------------------------------------------------------------------------------------------------------


def lstm_cell_step(
    x: Tensor, h: Tensor, c: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor, b_hh: Tensor, peephole: Tensor | None
) -> tuple[Tensor, Tensor]:
    """One LSTM step; with `peephole` (3, H) rows (p_i, p_f, p_o) the gates also see the cell state."""
    gates = F.linear(x, w_ih, b_ih) + F.linear(h, w_hh, b_hh)  # (B, 4H)
    gi, gf, gg, go = gates.chunk(4, dim=-1)  # each (B, H)
    if peephole is not None:
        gi = gi + peephole[0] * c  # i sees c_{t-1}
        gf = gf + peephole[1] * c  # f sees c_{t-1}
    c_new = torch.sigmoid(gf) * c + torch.sigmoid(gi) * torch.tanh(gg)
    if peephole is not None:
        go = go + peephole[2] * c_new  # o sees c_t
    h_new = torch.sigmoid(go) * torch.tanh(c_new)
    return h_new, c_new


def gru_cell_step(x: Tensor, h: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor, b_hh: Tensor) -> Tensor:
    """One GRU step (torch's formulation: the reset gate applies after the recurrent linear map)."""
    xr, xz, xn = F.linear(x, w_ih, b_ih).chunk(3, dim=-1)  # each (B, H)
    hr, hz, hn = F.linear(h, w_hh, b_hh).chunk(3, dim=-1)  # each (B, H)
    r = torch.sigmoid(xr + hr)
    z = torch.sigmoid(xz + hz)
    n = torch.tanh(xn + r * hn)
    return (1 - z) * n + z * h


def _init_uniform(module: nn.Module, hidden_size: int) -> None:
    bound = 1.0 / math.sqrt(hidden_size)
    for p in module.parameters():
        nn.init.uniform_(p, -bound, bound)


class LSTMCell(nn.Module):
    """LSTM cell with optional diagonal peephole weights (p_i, p_f see c_{t-1}; p_o sees c_t)."""

    def __init__(self, input_size: int, hidden_size: int, peephole: bool = False) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.weight_ih = nn.Parameter(torch.empty(4 * hidden_size, input_size))
        self.weight_hh = nn.Parameter(torch.empty(4 * hidden_size, hidden_size))
        self.bias_ih = nn.Parameter(torch.empty(4 * hidden_size))
        self.bias_hh = nn.Parameter(torch.empty(4 * hidden_size))
        self.peephole = nn.Parameter(torch.empty(3, hidden_size)) if peephole else None
        _init_uniform(self, hidden_size)

    def forward(self, x: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        h, c = state
        return lstm_cell_step(x, h, c, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh, self.peephole)


class GRUCell(nn.Module):
    """GRU cell (same parameters and equations as torch.nn.GRUCell)."""

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.weight_ih = nn.Parameter(torch.empty(3 * hidden_size, input_size))
        self.weight_hh = nn.Parameter(torch.empty(3 * hidden_size, hidden_size))
        self.bias_ih = nn.Parameter(torch.empty(3 * hidden_size))
        self.bias_hh = nn.Parameter(torch.empty(3 * hidden_size))
        _init_uniform(self, hidden_size)

    def forward(self, x: Tensor, h: Tensor) -> Tensor:
        return gru_cell_step(x, h, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)


# torch's gate order (LSTM i f g o, GRU r z n) -> ONNX's (LSTM i o f c, GRU z r h), as chunk indices
ONNX_GATE_ORDER = {"lstm": [0, 3, 1, 2], "gru": [1, 0, 2]}


def _reorder_gates(t: Tensor, order: list[int]) -> Tensor:
    """Stacked gate weights or biases (nH, ...) in torch's gate order -> ONNX's."""
    chunks = t.chunk(len(order), dim=0)
    return torch.cat([chunks[k] for k in order], dim=0)


def _onnx_weights(cell: nn.Module, kind: str) -> tuple[Tensor, Tensor, Tensor]:
    """A cell's torch weights as a one-direction ONNX LSTM/GRU node wants them: W (1, nH, I), R (1, nH, H),
    B (1, 2nH)."""
    order = ONNX_GATE_ORDER[kind]
    bias = torch.cat([_reorder_gates(cell.bias_ih, order), _reorder_gates(cell.bias_hh, order)])
    return _reorder_gates(cell.weight_ih, order)[None], _reorder_gates(cell.weight_hh, order)[None], bias[None]


def _onnx_cell_inputs(cell: nn.Module, kind: str) -> tuple[Tensor | None, ...]:
    """W, R, B and the peephole P (i, o, f order; None without) of one decoder cell's ONNX node."""
    peephole = getattr(cell, "peephole", None)
    return (*_onnx_weights(cell, kind), None if peephole is None else peephole[[0, 2, 1]].reshape(1, -1))


class _OnnxCellStack(torch.autograd.Function):
    """Export-only: one decoder step of the whole cell stack as one ONNX LSTM/GRU node a layer (over a sequence of
    length 1), in place of the ~20 nodes a layer of the written-out gate equations. The state travels batch-first
    (B, L, H); inside, it is cut once into the (1, B, H) slices the nodes take, and each layer's output Y_h (1, B, H)
    is the next layer's input as it is, so a step has a handful of shape nodes instead of ~12 a layer (each costs
    about a microsecond, and the step runs once a token). Only reached while the TorchScript exporter traces; the eager
    forward returns zeros of the outputs' shapes: (new h, new c, the top layer's h (B, H)); for a GRU c is h."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, h: Tensor, c: Tensor, cell: str, *weights: Tensor | None) -> tuple[Tensor, ...]:
        return torch.zeros_like(h), torch.zeros_like(c), h.new_zeros(h.shape[0], h.shape[2])

    @staticmethod
    def symbolic(g: Any, x: Any, h: Any, c: Any, cell: str, *weights: Any) -> Any:
        layers = len(weights) // 4
        sizes = [w.type().sizes() for w in weights[::4]]
        if not all(sizes):
            raise RuntimeError("the exporter lost the decoder cells' weight shapes")
        gates = 4 if cell == "lstm" else 3
        axis0 = g.op("Constant", value_t=torch.tensor([0]))  # the time (and direction) axis of the nodes' tensors
        no_lengths = g.op("prim::Constant")  # every sequence is one step long: sequence_lens omitted
        no_lengths.setType(torch._C.OptionalType.ofTensor())

        def per_layer(state: Any) -> list[Any]:  # (B, L, H) -> L x (1, B, H)
            by_layer = g.op("Transpose", state, perm_i=[1, 0, 2])
            if layers == 1:
                return [by_layer]
            ones = g.op("Constant", value_t=torch.ones(layers, dtype=torch.int64))
            return list(g.op("Split", by_layer, ones, axis_i=0, outputs=layers))

        def stacked(states: list[Any]) -> Any:  # L x (1, B, H) -> (B, L, H)
            by_layer = states[0] if layers == 1 else g.op("Concat", *states, axis_i=0)
            return g.op("Transpose", by_layer, perm_i=[1, 0, 2])

        hs = per_layer(h)
        cs = per_layer(c) if cell == "lstm" else [None] * layers
        step = g.op("Unsqueeze", x, axis0)  # (1, B, I): one time step
        new_h, new_c = [], []
        for i in range(layers):
            w, r, b, p = weights[4 * i : 4 * i + 4]
            hidden = sizes[i][1] // gates
            if cell == "gru":
                _, h_n = g.op("GRU", step, w, r, b, no_lengths, hs[i], hidden_size_i=hidden, linear_before_reset_i=1,
                              outputs=2)  # fmt: skip
            else:
                inputs = [step, w, r, b, no_lengths, hs[i], cs[i]] + ([p] if not _is_none(p) else [])
                _, h_n, c_n = g.op("LSTM", *inputs, hidden_size_i=hidden, outputs=3)
                new_c.append(c_n)
            new_h.append(h_n)
            step = h_n  # (1, B, H): the next layer's one-step input
        h_out = stacked(new_h)
        return h_out, stacked(new_c) if cell == "lstm" else h_out, g.op("Squeeze", step, axis0)


def _is_none(value: Any) -> bool:
    return value is None or (hasattr(value, "node") and value.node().mustBeNone())


# ---------------------------------------------------------------------------------------------------------------
# Encoder
# ---------------------------------------------------------------------------------------------------------------


class _OnnxRecurrence(torch.autograd.Function):
    """Export-only op: one ONNX LSTM/GRU node with sequence_lens (ONNX layout, time-major).

    Only reached while `torch.onnx.export(..., dynamo=False)` traces the model: the node computes the values, so the
    eager forward just returns zeros of the node's output shapes.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, seq_lens: Tensor, w: Tensor, r: Tensor, b: Tensor, p: Tensor, h0: Tensor,
                cell: str, hidden_size: int, num_directions: int, peephole: bool) -> tuple[Tensor, ...]:  # fmt: skip
        S, B = x.shape[0], x.shape[1]
        final = x.new_zeros(num_directions, B, hidden_size)  # (D, B, H)
        y = x.new_zeros(S, num_directions, B, hidden_size)  # (S, D, B, H)
        return (y, final) if cell == "gru" else (y, final, final.clone())

    @staticmethod
    def symbolic(g: Any, x: Any, seq_lens: Any, w: Any, r: Any, b: Any, p: Any, h0: Any,
                 cell: str, hidden_size: int, num_directions: int, peephole: bool) -> Any:  # fmt: skip
        direction = "bidirectional" if num_directions == 2 else "forward"
        if cell == "gru":
            return g.op("GRU", x, w, r, b, seq_lens, h0, direction_s=direction, hidden_size_i=hidden_size,
                        linear_before_reset_i=1, outputs=2)  # fmt: skip
        inputs = [x, w, r, b, seq_lens, h0, h0] + ([p] if peephole else [])
        return g.op("LSTM", *inputs, direction_s=direction, hidden_size_i=hidden_size, outputs=3)


class RecurrentLayer(nn.Module):
    """One encoder layer, one or two directions, over right-padded input; padding never changes real states.

    Weights live in a one-layer torch nn.LSTM/nn.GRU (fused kernel over a packed sequence when there are no
    peepholes); with peepholes the same weights run through `lstm_cell_step` unrolled over time.
    """

    def __init__(self, cell: str, input_size: int, hidden_size: int, bidirectional: bool, peephole: bool) -> None:
        super().__init__()
        self.cell, self.hidden_size = cell, hidden_size
        self.num_directions = 2 if bidirectional else 1
        rnn_cls = nn.LSTM if cell == "lstm" else nn.GRU
        self.rnn = rnn_cls(input_size, hidden_size, batch_first=True, bidirectional=bidirectional)
        self.peephole = nn.Parameter(torch.empty(self.num_directions, 3, hidden_size)) if peephole else None
        _init_uniform(self, hidden_size)

    def _weights(self, d: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        sfx = "_l0_reverse" if d == 1 else "_l0"
        return tuple(getattr(self.rnn, name + sfx) for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))

    def forward(self, x: Tensor, lengths: Tensor, valid: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """x (B,S,I), lengths (B,), valid (B,S) True at real tokens -> out (B,S,D*H), h_n (B,D,H), c_n (B,D,H)|None."""
        # TorchScript-based export traces (dynamo=False); torch.export-based export would trace the zeros instead.
        if torch.onnx.is_in_onnx_export() and torch.jit.is_tracing():
            return self.forward_onnx(x, lengths)
        if self.peephole is None:
            return self.forward_packed(x, lengths)
        return self.forward_unrolled(x, valid)

    def forward_packed(self, x: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """torch's fused kernel on a packed sequence (no peepholes)."""
        S = x.shape[1]
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, final = self.rnn(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=S)  # (B, S, D*H), zero at padding
        h_n, c_n = final if self.cell == "lstm" else (final, None)  # (D, B, H)
        return out, h_n.transpose(0, 1), None if c_n is None else c_n.transpose(0, 1)

    def forward_unrolled(self, x: Tensor, valid: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """Step by step; at padding the state is carried over unchanged, so the backward pass starts at zero state
        on each row's last real token."""
        B, S, H = x.shape[0], x.shape[1], self.hidden_size
        outs, hs, cs = [], [], []
        for d in range(self.num_directions):
            w_ih, w_hh, b_ih, b_hh = self._weights(d)
            h = x.new_zeros(B, H)
            c = x.new_zeros(B, H)
            ys: list[Tensor] = [x] * S  # placeholders, every slot is overwritten
            for t in range(S) if d == 0 else range(S - 1, -1, -1):
                keep = valid[:, t, None]  # (B, 1)
                if self.cell == "lstm":
                    p = None if self.peephole is None else self.peephole[d]
                    h_new, c_new = lstm_cell_step(x[:, t], h, c, w_ih, w_hh, b_ih, b_hh, p)
                    c = torch.where(keep, c_new, c)
                else:
                    h_new = gru_cell_step(x[:, t], h, w_ih, w_hh, b_ih, b_hh)
                h = torch.where(keep, h_new, h)
                ys[t] = h * keep
            outs.append(torch.stack(ys, dim=1))  # (B, S, H)
            hs.append(h)
            cs.append(c)
        out = torch.cat(outs, dim=-1)  # (B, S, D*H)
        h_n = torch.stack(hs, dim=1)  # (B, D, H)
        return out, h_n, torch.stack(cs, dim=1) if self.cell == "lstm" else None

    def forward_onnx(self, x: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """The export path: ONNX weights (gate order LSTM iofc, GRU zrh) feeding one LSTM/GRU node."""
        B, H, D = x.shape[0], self.hidden_size, self.num_directions
        order = ONNX_GATE_ORDER[self.cell]
        ws, rs, bs = [], [], []
        for d in range(D):
            w_ih, w_hh, b_ih, b_hh = self._weights(d)
            ws.append(_reorder_gates(w_ih, order))
            rs.append(_reorder_gates(w_hh, order))
            bs.append(torch.cat([_reorder_gates(b_ih, order), _reorder_gates(b_hh, order)]))
        w, r, b = torch.stack(ws), torch.stack(rs), torch.stack(bs)  # (D, nH, I), (D, nH, H), (D, 2nH)
        # peephole (D, 3, H) rows i, f, o -> ONNX P (D, 3H) in order i, o, f; an unused placeholder without peepholes
        p = h0 = x.new_zeros(D, B, H)
        if self.peephole is not None:
            p = self.peephole[:, [0, 2, 1]].reshape(D, 3 * H)
        outs = _OnnxRecurrence.apply(
            x.transpose(0, 1), lengths.to(torch.int32), w, r, b, p, h0, self.cell, H, D, self.peephole is not None
        )
        y = outs[0].permute(2, 0, 1, 3).reshape(B, -1, D * H)  # (S, D, B, H) -> (B, S, D*H)
        h_n = outs[1].transpose(0, 1)  # (B, D, H)
        return y, h_n, outs[2].transpose(0, 1) if self.cell == "lstm" else None


class Encoder(nn.Module):
    """Embedding + stacked recurrent layers; returns the top layer's states and every layer's final (h, c)."""

    def __init__(self, cfg: "RNNConfig") -> None:
        super().__init__()
        D = 2 if cfg.bidirectional else 1
        self.embedding = nn.Embedding(cfg.src_vocab_size, cfg.emb_dim, padding_idx=cfg.pad_id)
        self.layers = nn.ModuleList(
            RecurrentLayer(cfg.cell, cfg.emb_dim if i == 0 else D * cfg.hidden_size, cfg.hidden_size,
                           cfg.bidirectional, cfg.peephole)  # fmt: skip
            for i in range(cfg.num_layers)
        )
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, src_ids: Tensor, src_pad_mask: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """-> memory_bank (B,S,Hm), h_n (B,L,D,H), c_n (B,L,D,H) | None."""
        S = src_ids.shape[1]
        # Every row keeps at least one position (an all-padding row would have no state at all).
        lengths = (~src_pad_mask).sum(dim=1).clamp(min=1)  # (B,)
        valid = torch.arange(S, device=src_ids.device)[None, :] < lengths[:, None]  # (B, S)
        x = self.dropout(self.embedding(src_ids))  # (B, S, E)
        hs, cs = [], []
        for i, layer in enumerate(self.layers):
            if i > 0:
                x = self.dropout(x)
            x, h_n, c_n = layer(x, lengths, valid)  # (B, S, D*H), (B, D, H)
            hs.append(h_n)
            cs.append(c_n)
        c = None if cs[0] is None else torch.stack(cs, dim=1)
        return x, torch.stack(hs, dim=1), c  # (B, S, Hm), (B, L, D, H)


# ---------------------------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------------------------


class Attention(nn.Module):
    """score(q, k) in {dot, general: qᵀWk, additive: vᵀtanh(W_q q + W_k k), scaled_dot: q·k/√H}, softmax over
    real source positions only. The key side of the score is computed once per source by `keys`."""

    def __init__(self, score: str, query_size: int, memory_size: int) -> None:
        super().__init__()
        self.score, self.query_size, self.memory_size = score, query_size, memory_size
        self.key_proj: nn.Linear | None = None
        self.query_proj: nn.Linear | None = None
        self.v: nn.Linear | None = None
        if score == "general" or (score in ("dot", "scaled_dot") and memory_size != query_size):
            # general: qᵀ W k = q · (W k). A BiRNN memory is wider than the query, so dot scores use a learned
            # projection of the keys to the query size.
            self.key_proj = nn.Linear(memory_size, query_size, bias=False)
        elif score == "additive":
            self.key_proj = nn.Linear(memory_size, query_size, bias=True)
            self.query_proj = nn.Linear(query_size, query_size, bias=False)
            self.v = nn.Linear(query_size, 1, bias=False)

    @property
    def has_keys(self) -> bool:
        """Whether keys differ from the memory bank (and so travel as their own memory tensor)."""
        return self.key_proj is not None

    def keys(self, memory_bank: Tensor) -> Tensor:
        """(B,S,Hm) -> (B,S,K)."""
        return memory_bank if self.key_proj is None else self.key_proj(memory_bank)

    def forward(self, query: Tensor, keys: Tensor, memory_bank: Tensor, src_pad_mask: Tensor) -> tuple[Tensor, Tensor]:
        """query (B,H), keys (B,S,K), memory_bank (B,S,Hm) -> context (B,Hm), weights (B,S)."""
        if self.score == "additive":
            hidden = torch.tanh(keys + self.query_proj(query)[:, None, :])  # (B, S, H)
            scores = self.v(hidden).squeeze(-1)  # (B, S)
        else:
            # Multiply-and-sum rather than bmm: a one-row matmul per batch item is ~3x slower on CPU.
            scores = (keys * query[:, None, :]).sum(dim=-1)  # (B,S,H) * (B,1,H) -> (B, S)
            if self.score == "scaled_dot":
                scores = scores / math.sqrt(self.query_size)
        # The dtype's minimum (not -inf) gives padding exactly zero weight and an all-padding row no NaN.
        scores = scores.masked_fill(src_pad_mask, torch.finfo(scores.dtype).min)
        weights = torch.softmax(scores, dim=-1)  # (B, S)
        context = (weights[:, :, None] * memory_bank).sum(dim=1)  # (B,S,1) * (B,S,Hm) -> (B, Hm)
        return context, weights


# ---------------------------------------------------------------------------------------------------------------
# Config and translator
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RNNConfig:
    src_vocab_size: int
    tgt_vocab_size: int
    cell: str = "lstm"  # lstm | gru
    bidirectional: bool = False
    num_layers: int = 1
    emb_dim: int = 64
    hidden_size: int = 64
    attention: str = "general"  # dot | general | additive | scaled_dot
    peephole: bool = False  # LSTM only
    input_feeding: bool = True
    dropout: float = 0.0
    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    max_src_len: int = 256
    max_tgt_len: int = 256
    tie_embeddings: bool = False  # target embedding shares the output projection (needs emb_dim == hidden_size)

    def __post_init__(self) -> None:
        if self.cell not in CELLS:
            raise RNNConfigError(f"cell {self.cell!r} is not one of {CELLS}")
        if self.attention not in SCORES:
            raise RNNConfigError(f"attention {self.attention!r} is not one of {SCORES}")
        if self.peephole and self.cell != "lstm":
            raise RNNConfigError(f"peephole connections need cell 'lstm', not {self.cell!r}")
        for name in ("src_vocab_size", "tgt_vocab_size", "num_layers", "emb_dim", "hidden_size",
                     "max_src_len", "max_tgt_len"):  # fmt: skip
            if getattr(self, name) < 1:
                raise RNNConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise RNNConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.tie_embeddings and self.emb_dim != self.hidden_size:
            raise RNNConfigError(
                "tie_embeddings needs emb_dim == hidden_size, "
                f"got emb_dim={self.emb_dim} hidden_size={self.hidden_size}"
            )

    @property
    def arch(self) -> str:
        """Architecture name: lstm | gru | birnn-lstm | birnn-gru."""
        return f"birnn-{self.cell}" if self.bidirectional else self.cell

    @classmethod
    def from_arch(cls, arch: str, **fields: Any) -> "RNNConfig":
        """A config for an architecture name (sets `cell` and `bidirectional`)."""
        if arch not in ARCHS:
            raise RNNConfigError(f"architecture {arch!r} is not one of {tuple(ARCHS)}")
        cell, bidirectional = ARCHS[arch]
        return cls(cell=cell, bidirectional=bidirectional, **fields)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RNNConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise RNNConfigError(f"RNNConfig has no field(s) {unknown}")
        return cls(**data)


class RNNTranslator(nn.Module):
    """Attentional encoder-decoder. Stateless surface: `encode`, `decode_step`, `forward` (teacher forcing)."""

    def __init__(self, config: RNNConfig) -> None:
        super().__init__()
        self.config = cfg = config
        H, D = cfg.hidden_size, 2 if cfg.bidirectional else 1
        self.encoder = Encoder(cfg)
        if cfg.bidirectional:  # (fwd; bwd) final states -> decoder size, per layer
            self.bridge_h = nn.ModuleList(nn.Linear(D * H, H) for _ in range(cfg.num_layers))
            if cfg.cell == "lstm":
                self.bridge_c = nn.ModuleList(nn.Linear(D * H, H) for _ in range(cfg.num_layers))
        self.tgt_embedding = nn.Embedding(cfg.tgt_vocab_size, cfg.emb_dim, padding_idx=cfg.pad_id)
        in0 = cfg.emb_dim + (H if cfg.input_feeding else 0)
        self.decoder_cells = nn.ModuleList(
            LSTMCell(in0 if i == 0 else H, H, cfg.peephole) if cfg.cell == "lstm" else GRUCell(in0 if i == 0 else H, H)
            for i in range(cfg.num_layers)
        )
        self.attention = Attention(cfg.attention, H, D * H)
        self.attn_out = nn.Linear(D * H + H, H, bias=False)  # h̃ = tanh(W_c [c_t; h_t])
        self.generator = nn.Linear(H, cfg.tgt_vocab_size)
        if cfg.tie_embeddings:
            self.generator.weight = self.tgt_embedding.weight
        self.dropout = nn.Dropout(cfg.dropout)

    # -- names of the tensors that cross the encode/decode_step boundary (ONNX input/output names) --

    def memory_names(self) -> tuple[str, ...]:
        return ("memory_bank", "memory_keys") if self.attention.has_keys else ("memory_bank",)

    def state_names(self) -> tuple[str, ...]:
        names = ("h", "c") if self.config.cell == "lstm" else ("h",)
        return names + (("input_feed",) if self.config.input_feeding else ())

    # -- the surface --

    def encode(self, src_ids: Tensor, src_pad_mask: Tensor) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
        """src_ids (B,S), src_pad_mask (B,S) True at padding -> (memory, initial state), both batch-first."""
        cfg = self.config
        if not torch.onnx.is_in_onnx_export() and src_ids.shape[1] > cfg.max_src_len:
            raise SequenceTooLong("source", src_ids.shape[1], cfg.max_src_len)
        memory_bank, h_n, c_n = self.encoder(src_ids, src_pad_mask)  # (B,S,Hm), (B,L,D,H)
        B = h_n.shape[0]
        h = self._bridge(h_n, getattr(self, "bridge_h", None))  # (B, L, H)
        state: tuple[Tensor, ...] = (h,)
        if cfg.cell == "lstm":
            state += (self._bridge(c_n, getattr(self, "bridge_c", None)),)
        if cfg.input_feeding:
            state += (memory_bank.new_zeros(B, cfg.hidden_size),)
        memory = (memory_bank, self.attention.keys(memory_bank)) if self.attention.has_keys else (memory_bank,)
        return memory, state

    def _bridge(self, final: Tensor, bridges: nn.ModuleList | None) -> Tensor:
        """(B,L,D,H) -> (B,L,H)."""
        if bridges is None:
            return final[:, :, 0]  # one direction: already the decoder's size
        B, L = final.shape[0], final.shape[1]
        flat = final.reshape(B, L, -1)  # (B, L, D*H): forward then backward
        return torch.stack([torch.tanh(bridge(flat[:, i])) for i, bridge in enumerate(bridges)], dim=1)

    def _step(
        self, prev_ids: Tensor, memory: tuple[Tensor, ...], src_pad_mask: Tensor, state: tuple[Tensor, ...]
    ) -> tuple[Tensor, tuple[Tensor, ...]]:
        """One decoder step -> attentional hidden h̃ (B,H) before dropout, new state."""
        cfg = self.config
        memory_bank = memory[0]
        keys = memory[1] if self.attention.has_keys else memory_bank
        h = state[0]  # (B, L, H)
        c = state[1] if cfg.cell == "lstm" else None
        x = self.dropout(self.tgt_embedding(prev_ids))  # (B, E)
        if cfg.input_feeding:
            x = torch.cat([x, state[-1]], dim=-1)  # (B, E+H)
        if torch.onnx.is_in_onnx_export() and torch.jit.is_tracing():  # dropout is off in an exported model
            weights = [t for cell in self.decoder_cells for t in _onnx_cell_inputs(cell, cfg.cell)]
            h_new, c_new, x = _OnnxCellStack.apply(x, h, h if c is None else c, cfg.cell, *weights)
        else:
            hs, cs = [], []
            for i, cell in enumerate(self.decoder_cells):
                if i > 0:
                    x = self.dropout(x)
                if c is not None:
                    h_i, c_i = cell(x, (h[:, i], c[:, i]))
                    cs.append(c_i)
                else:
                    h_i = cell(x, h[:, i])
                hs.append(h_i)
                x = h_i  # (B, H)
            h_new, c_new = torch.stack(hs, dim=1), torch.stack(cs, dim=1) if c is not None else None  # (B, L, H)
        context, _ = self.attention(x, keys, memory_bank, src_pad_mask)  # (B, Hm)
        attn_h = torch.tanh(self.attn_out(torch.cat([context, x], dim=-1)))  # (B, Hm+H) -> (B, H)
        new_state: tuple[Tensor, ...] = (h_new,)
        if c is not None:
            new_state += (c_new,)
        if cfg.input_feeding:
            new_state += (attn_h,)
        return attn_h, new_state

    def decode_step(
        self, prev_ids: Tensor, memory: tuple[Tensor, ...], src_pad_mask: Tensor, state: tuple[Tensor, ...]
    ) -> tuple[Tensor, tuple[Tensor, ...]]:
        """prev_ids (B,) -> log_probs (B,V), new state."""
        attn_h, new_state = self._step(prev_ids, memory, src_pad_mask, state)
        return torch.log_softmax(self.generator(self.dropout(attn_h)), dim=-1), new_state

    def forward(self, src_ids: Tensor, src_pad_mask: Tensor, tgt_in_ids: Tensor) -> Tensor:
        """Teacher forcing: the same steps as `decode_step`, one per target position -> logits (B,T,V)."""
        if tgt_in_ids.shape[1] > self.config.max_tgt_len:
            raise SequenceTooLong("target", tgt_in_ids.shape[1], self.config.max_tgt_len)
        memory, state = self.encode(src_ids, src_pad_mask)
        outs = []
        for t in range(tgt_in_ids.shape[1]):
            attn_h, state = self._step(tgt_in_ids[:, t], memory, src_pad_mask, state)
            outs.append(attn_h)
        return self.generator(self.dropout(torch.stack(outs, dim=1)))  # (B, T, H) -> (B, T, V)
