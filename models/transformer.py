"""Transformer translator (Vaswani et al., 2017) with a stateless, exportable incremental-decoding surface.

Read leaves first: positional encoding -> multi-head attention -> feed-forward -> encoder layer -> decoder layer ->
config -> model. Attention is written out (not nn.MultiheadAttention) so that we own the key/value cache and the
exported graph keeps the MatMul/Softmax pattern onnxruntime's transformer optimizer recognises.

The surface (docs/design.md):
    encode(src_ids, src_pad_mask) -> (memory, state)      memory: cross_key_i, cross_value_i per decoder layer,
                                                          state: self_key_i, self_value_i with 0 cached positions
    decode_step(prev_ids, memory, src_pad_mask, state, cache_pad_mask=None) -> (log_probs, new_state)
                                                          one position appended to each cache; with cache_pad_mask
                                                          (B, P) True at cached positions a row must not see (it
                                                          joined the batch later), rows decode at their own positions
    forward(src_ids, src_pad_mask, tgt_in_ids) -> logits  teacher forcing: the same decoder over T positions at once

Letters: B batch, S source length, T target positions computed in this call, P cached (past) positions,
H model width (d_model), F feed-forward width, V vocabulary, nh heads, hs head size (H = nh * hs), L layers.
Masks are named by meaning: `src_pad_mask` is True at padding, `causal_mask` is True where attention is allowed.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

logger = logging.getLogger(__name__)


class TransformerConfigError(ValueError):
    """A TransformerConfig whose numbers or options do not fit together."""


class InputTooLong(ValueError):
    """A source or target longer than the model's positional encoding covers."""

    def __init__(self, tokens: int, limit: int, side: str) -> None:
        super().__init__(f"{side} of {tokens} tokens is longer than max_positions={limit}")
        self.tokens = tokens
        self.limit = limit
        self.side = side


ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,  # exact (erf) GELU
    "swish": F.silu,  # Marian/OPUS-MT's activation
}
POSITIONAL_ENCODINGS = ("sinusoidal", "sinusoidal_halves", "learned")


def _exporting() -> bool:
    """True while torch traces the model for ONNX, where Python checks on shapes must not become guards."""
    return torch.onnx.is_in_onnx_export() or torch.jit.is_tracing() or torch.compiler.is_compiling()


def _attention_bias(allowed: Tensor, dtype: torch.dtype) -> Tensor:
    """0 where attention is allowed, the most negative float elsewhere: softmax gives blocked keys exactly 0 weight,
    and (unlike -inf) a row with every key blocked stays finite instead of becoming NaN. Written (1 - allowed) * min,
    the form onnxruntime's attention fusion recognises as a padding mask."""
    return (1.0 - allowed.to(dtype)) * torch.finfo(dtype).min


def causal_mask(length: int, device: torch.device | None = None) -> Tensor:
    """(T, T) bool, True where query position i may attend key position j, i.e. j <= i."""
    return torch.ones(length, length, dtype=torch.bool, device=device).tril()


# --- positional encoding ------------------------------------------------------------------------------------------


def sinusoidal_table(n_positions: int, dim: int, layout: str = "interleaved") -> Tensor:
    """PE(pos, 2i) = sin(pos / 10000^(2i/H)), PE(pos, 2i+1) = cos(pos / 10000^(2i/H)): (n_positions, H) float32.

    layout "interleaved" is the paper's (sin at even, cos at odd dimensions); "halves" puts all the sines first and
    the cosines after them (Marian/OPUS-MT, fairseq), the same numbers in another order.
    """
    if dim % 2:
        raise TransformerConfigError(f"a sinusoidal positional encoding needs an even width, not d_model={dim}")
    position = torch.arange(n_positions, dtype=torch.float64)[:, None]  # (P, 1)
    inv_freq = torch.pow(10000.0, -torch.arange(0, dim, 2, dtype=torch.float64) / dim)  # (H/2,)
    angles = position * inv_freq  # (P, H/2)
    table = torch.empty(n_positions, dim, dtype=torch.float64)  # (P, H)
    if layout == "interleaved":
        table[:, 0::2] = torch.sin(angles)
        table[:, 1::2] = torch.cos(angles)
    elif layout == "halves":
        table[:, : dim // 2] = torch.sin(angles)
        table[:, dim // 2 :] = torch.cos(angles)
    else:
        raise TransformerConfigError(f"sinusoidal layout {layout!r} is not 'interleaved' or 'halves'")
    return table.float()


class PositionalEncoding(nn.Module):
    """Position vectors for positions start .. start+T-1: a fixed sinusoid table or learned embeddings."""

    def __init__(self, kind: str, n_positions: int, dim: int) -> None:
        super().__init__()
        if kind == "learned":
            self.table = nn.Parameter(torch.empty(n_positions, dim))
            nn.init.normal_(self.table, std=dim**-0.5)
        else:
            layout = "halves" if kind == "sinusoidal_halves" else "interleaved"
            # Derived from the formula, so not saved with the weights.
            self.register_buffer("table", sinusoidal_table(n_positions, dim, layout), persistent=False)

    def forward(self, start: int | Tensor, length: int | Tensor) -> Tensor:
        # A slice with traced bounds, so the start (the cache length) stays dynamic in an exported graph.
        return self.table[start : start + length]  # (T, H)


# --- attention and feed-forward -----------------------------------------------------------------------------------


def _attend(q: Tensor, key: Tensor, value: Tensor, bias: Tensor | None, n_heads: int, dropout: nn.Module) -> Tensor:
    """q (B, T, H) projected queries; key, value (B, nh, K, hs); bias broadcastable to (B, nh, T, K) or None
    -> the heads' softmax(q k^T / sqrt(hs) + bias) v, merged back to (B, T, H)."""
    B, T, H = q.shape
    head_size = H // n_heads
    q = q.view(B, T, n_heads, head_size).transpose(1, 2)  # (B, nh, T, hs)
    scores = torch.matmul(q, key.transpose(-1, -2)) / math.sqrt(head_size)  # (B, nh, T, K)
    if bias is not None:
        scores = scores + bias  # (B, nh, T, K)
    probs = dropout(torch.softmax(scores, dim=-1))  # (B, nh, T, K)
    context = torch.matmul(probs, value)  # (B, nh, T, hs)
    return context.transpose(1, 2).reshape(B, T, H)  # (B, T, H)


class _OnnxAttention(torch.autograd.Function):
    """Export-only: `_attend` for one query position as one com.microsoft MultiHeadAttention node (onnxruntime's
    fused kernel) in place of ~10 reshape/transpose/matmul/softmax nodes. Keys and values go in per head
    (B, nh, K, hs), the layout of our caches, and the bias as its attention_bias (B, 1, 1, K). The decoder step graph
    runs 2 x L of them a token (docs/benchmarks.md)."""

    @staticmethod
    def forward(ctx: Any, n_heads: int, head_size: int, q: Tensor, key: Tensor, value: Tensor, *bias: Tensor) -> Tensor:
        return _attend(q, key, value, bias[0] if bias else None, n_heads, nn.Identity())

    @staticmethod
    def symbolic(g: Any, n_heads: int, head_size: int, q: Any, key: Any, value: Any, *bias: Any) -> Any:
        absent = g.op("prim::Constant")  # an omitted optional input: the exporter writes it as ""
        absent.setType(torch._C.OptionalType.ofTensor())
        # Inputs: query, key, value, then (projection bias, key_padding_mask: absent) attention_bias.
        inputs = [q, key, value, *((absent, absent, bias[0]) if bias else ())]
        out = g.op("com.microsoft::MultiHeadAttention", *inputs, num_heads_i=n_heads,
                   scale_f=1.0 / math.sqrt(head_size))  # fmt: skip
        out.setType(q.type())  # (B, T, H) like the query
        return out


class MultiHeadAttention(nn.Module):
    """softmax(Q K^T / sqrt(hs) + bias) V over nh heads, then an output projection.

    Keys and values are projected by `project_kv`, separately from the attention itself, so that the decoder projects
    the encoder output once (cross-attention memory) and its own input one position a step (the self-attention cache).
    Exported with one query position (the decoder step), the attention itself becomes onnxruntime's fused
    MultiHeadAttention node (`_OnnxAttention`).
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.head_size = d_model // n_heads
        self.query = nn.Linear(d_model, d_model)
        self.key = nn.Linear(d_model, d_model)
        self.value = nn.Linear(d_model, d_model)
        self.out = nn.Linear(d_model, d_model)
        self.dropout = nn.Dropout(dropout)

    def _split_heads(self, x: Tensor) -> Tensor:
        B, L, _ = x.shape
        return x.view(B, L, self.n_heads, self.head_size).transpose(1, 2)  # (B, nh, L, hs)

    def project_kv(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x (B, L, H) -> keys, values (B, nh, L, hs)."""
        return self._split_heads(self.key(x)), self._split_heads(self.value(x))

    def forward(self, x: Tensor, key: Tensor, value: Tensor, bias: Tensor | None) -> Tensor:
        """x (B, T, H) queries; key, value (B, nh, K, hs); bias broadcastable to (B, nh, T, K) or None."""
        q = self.query(x)  # (B, T, H)
        if x.shape[1] == 1 and torch.onnx.is_in_onnx_export() and torch.jit.is_tracing():
            extra = () if bias is None else (bias,)
            context = _OnnxAttention.apply(self.n_heads, self.head_size, q, key, value, *extra)  # (B, T, H)
        else:
            context = _attend(q, key, value, bias, self.n_heads, self.dropout)  # (B, T, H)
        return self.out(context)  # (B, T, H)


class FeedForward(nn.Module):
    """Position-wise feed-forward: H -> F -> H with the configured activation."""

    def __init__(self, d_model: int, d_ff: int, activation: str) -> None:
        super().__init__()
        self.up = nn.Linear(d_model, d_ff)
        self.down = nn.Linear(d_ff, d_model)
        self.activation = ACTIVATIONS[activation]

    def forward(self, x: Tensor) -> Tensor:
        return self.down(self.activation(self.up(x)))  # (B, T, F) -> (B, T, H)


class _Residual(nn.Module):
    """The Add & Norm around a sublayer: post-norm LN(x + f(x)) as in the paper, or pre-norm x + f(LN(x))."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.normalize_before = config.normalize_before
        self.norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)

    def sublayer_input(self, x: Tensor) -> Tensor:
        return self.norm(x) if self.normalize_before else x

    def add(self, x: Tensor, sublayer_output: Tensor) -> Tensor:
        # Sublayer output first: onnxruntime's attention fusion looks for the output projection's Add on the first
        # Add input it finds, and the embedding sum feeding the first layer is an Add too.
        x = self.dropout(sublayer_output) + x  # (B, T, H)
        return x if self.normalize_before else self.norm(x)


# --- layers -------------------------------------------------------------------------------------------------------


class EncoderLayer(nn.Module):
    """Self-attention over the source, then the feed-forward, each inside Add & Norm."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.self_attn = MultiHeadAttention(config.d_model, config.n_heads, config.attention_dropout)
        self.self_attn_residual = _Residual(config)
        self.ffn = FeedForward(config.d_model, config.d_ff, config.activation)
        self.ffn_residual = _Residual(config)

    def forward(self, x: Tensor, pad_bias: Tensor) -> Tensor:
        """x (B, S, H); pad_bias (B, 1, 1, S)."""
        h = self.self_attn_residual.sublayer_input(x)  # (B, S, H)
        x = self.self_attn_residual.add(x, self.self_attn(h, *self.self_attn.project_kv(h), pad_bias))
        h = self.ffn_residual.sublayer_input(x)
        return self.ffn_residual.add(x, self.ffn(h))  # (B, S, H)


class DecoderLayer(nn.Module):
    """Causally masked self-attention (with a key/value cache), cross-attention over the source, feed-forward."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.self_attn = MultiHeadAttention(config.d_model, config.n_heads, config.attention_dropout)
        self.self_attn_residual = _Residual(config)
        self.cross_attn = MultiHeadAttention(config.d_model, config.n_heads, config.attention_dropout)
        self.cross_attn_residual = _Residual(config)
        self.ffn = FeedForward(config.d_model, config.d_ff, config.activation)
        self.ffn_residual = _Residual(config)

    def forward(
        self,
        x: Tensor,
        past_key: Tensor,
        past_value: Tensor,
        cross_key: Tensor,
        cross_value: Tensor,
        self_bias: Tensor | None,
        cross_bias: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """x (B, T, H) the new positions; past_key/value (B, nh, P, hs); cross_key/value (B, nh, S, hs);
        self_bias broadcastable to (B, nh, T, P+T) or None when every cached position is visible; cross_bias
        (B, 1, 1, S). Returns x (B, T, H) and the self-attention cache extended to (B, nh, P+T, hs)."""
        h = self.self_attn_residual.sublayer_input(x)  # (B, T, H)
        new_key, new_value = self.self_attn.project_kv(h)  # (B, nh, T, hs)
        key = torch.cat([past_key, new_key], dim=2)  # (B, nh, P+T, hs)
        value = torch.cat([past_value, new_value], dim=2)  # (B, nh, P+T, hs)
        x = self.self_attn_residual.add(x, self.self_attn(h, key, value, self_bias))
        h = self.cross_attn_residual.sublayer_input(x)
        x = self.cross_attn_residual.add(x, self.cross_attn(h, cross_key, cross_value, cross_bias))
        h = self.ffn_residual.sublayer_input(x)
        return self.ffn_residual.add(x, self.ffn(h)), key, value


# --- config and model ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TransformerConfig:
    """Sizes and options of a Transformer translator; saved with checkpoints and export manifests."""

    src_vocab_size: int
    tgt_vocab_size: int
    d_model: int = 512
    n_heads: int = 8
    n_encoder_layers: int = 6
    n_decoder_layers: int = 6
    d_ff: int = 2048
    dropout: float = 0.1  # embeddings and every sublayer output
    attention_dropout: float = 0.0  # attention probabilities
    max_positions: int = 512  # positions the encoding covers, on each side
    positional_encoding: str = "sinusoidal"  # sinusoidal (paper layout) | sinusoidal_halves (Marian) | learned
    scale_embedding: bool = True  # multiply token embeddings by sqrt(d_model), as in the paper
    normalize_before: bool = False  # pre-norm (x + f(LN(x)), final LayerNorms) instead of the paper's post-norm
    activation: str = "relu"  # relu | gelu | swish
    share_embeddings: bool = False  # one matrix for source, target and output: needs a joint vocabulary
    tie_output_embedding: bool = True  # output projection = target embedding matrix
    final_logits_bias: bool = False  # a learned (V,) bias added to the logits (Marian)
    layer_norm_eps: float = 1e-5
    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    decoder_start_id: int | None = None  # first decoder input; None means bos_id (Marian starts with pad)
    max_src_len: int = 256  # serving limits, written into the export manifest
    max_tgt_len: int = 256

    def __post_init__(self) -> None:
        if self.decoder_start_id is None:
            object.__setattr__(self, "decoder_start_id", self.bos_id)
        if self.d_model % self.n_heads:
            raise TransformerConfigError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.n_encoder_layers < 1 or self.n_decoder_layers < 1:
            raise TransformerConfigError(
                f"need at least one layer on each side, got n_encoder_layers={self.n_encoder_layers}, "
                f"n_decoder_layers={self.n_decoder_layers}"
            )
        if self.activation not in ACTIVATIONS:
            raise TransformerConfigError(f"activation={self.activation!r} is not one of {sorted(ACTIVATIONS)}")
        if self.positional_encoding not in POSITIONAL_ENCODINGS:
            raise TransformerConfigError(
                f"positional_encoding={self.positional_encoding!r} is not one of {list(POSITIONAL_ENCODINGS)}"
            )
        if self.positional_encoding != "learned" and self.d_model % 2:
            raise TransformerConfigError(f"a sinusoidal positional encoding needs an even d_model, not {self.d_model}")
        if self.share_embeddings and self.src_vocab_size != self.tgt_vocab_size:
            raise TransformerConfigError(
                f"share_embeddings needs a joint vocabulary, but src_vocab_size={self.src_vocab_size} "
                f"and tgt_vocab_size={self.tgt_vocab_size}"
            )
        if self.share_embeddings and not self.tie_output_embedding:
            raise TransformerConfigError("share_embeddings ties the output projection too: tie_output_embedding=False")
        for name in ("pad_id", "bos_id", "eos_id", "decoder_start_id"):
            value = getattr(self, name)
            if not 0 <= value < min(self.src_vocab_size, self.tgt_vocab_size):
                raise TransformerConfigError(
                    f"{name}={value} is outside the vocabularies ({self.src_vocab_size}, {self.tgt_vocab_size})"
                )
        longest = max(self.max_src_len, self.max_tgt_len)
        if self.max_positions < longest:
            raise TransformerConfigError(
                f"max_positions={self.max_positions} is shorter than max_src_len={self.max_src_len} "
                f"or max_tgt_len={self.max_tgt_len}"
            )
        for name in ("dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise TransformerConfigError(f"{name}={getattr(self, name)} is not in [0, 1)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TransformerConfig:
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields)
        if unknown:
            raise TransformerConfigError(f"TransformerConfig has no field(s) {unknown}")
        return cls(**data)


class TransformerTranslator(nn.Module):
    """Encoder-decoder Transformer. Holds weights only: decoding state is passed in and returned."""

    # decode_step takes a cache_pad_mask, so sentences can join a running batch (export/graphs.py feeds it).
    masks_cache = True

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.config = config
        H = config.d_model
        self.src_embed = nn.Embedding(config.src_vocab_size, H, padding_idx=config.pad_id)
        self.tgt_embed = self.src_embed if config.share_embeddings else nn.Embedding(
            config.tgt_vocab_size, H, padding_idx=config.pad_id
        )
        self.embed_scale = math.sqrt(H) if config.scale_embedding else 1.0
        self.src_positions = PositionalEncoding(config.positional_encoding, config.max_positions, H)
        self.tgt_positions = PositionalEncoding(config.positional_encoding, config.max_positions, H)
        self.dropout = nn.Dropout(config.dropout)
        self.encoder_layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.n_encoder_layers))
        self.decoder_layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.n_decoder_layers))
        # Pre-norm leaves the residual stream un-normalised: one LayerNorm closes each stack.
        self.encoder_norm = nn.LayerNorm(H, eps=config.layer_norm_eps) if config.normalize_before else None
        self.decoder_norm = nn.LayerNorm(H, eps=config.layer_norm_eps) if config.normalize_before else None
        self.output = nn.Linear(H, config.tgt_vocab_size, bias=False)
        self.final_logits_bias = nn.Parameter(torch.zeros(config.tgt_vocab_size)) if config.final_logits_bias else None
        self._init_weights()
        if config.tie_output_embedding:
            self.output.weight = self.tgt_embed.weight

    def _init_weights(self) -> None:
        # Xavier for projections (the Annotated Transformer); N(0, H^-1/2) embeddings, so that after the sqrt(H)
        # scale a token vector has unit variance, and a tied output projection starts with small logits.
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=self.config.d_model**-0.5)
                with torch.no_grad():
                    module.weight[self.config.pad_id].zero_()

    # --- names of the memory and state tensors (ONNX input/output names) ---

    def memory_names(self) -> list[str]:
        return [f"cross_{kind}_{i}" for i in range(self.config.n_decoder_layers) for kind in ("key", "value")]

    def state_names(self) -> list[str]:
        return [f"self_{kind}_{i}" for i in range(self.config.n_decoder_layers) for kind in ("key", "value")]

    # --- the surface ---

    def encode(self, src_ids: Tensor, src_pad_mask: Tensor) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
        """src_ids (B, S) long, src_pad_mask (B, S) bool True at padding ->
        (memory: cross_key_i, cross_value_i (B, nh, S, hs) for each decoder layer,
         state: self_key_i, self_value_i (B, nh, 0, hs), the empty self-attention caches)."""
        S = src_ids.shape[1]
        if not _exporting() and S > self.config.max_positions:
            raise InputTooLong(tokens=int(S), limit=self.config.max_positions, side="source")
        x = self.src_embed(src_ids) * self.embed_scale + self.src_positions(0, S)  # (B, S, H)
        x = self.dropout(x)
        pad_bias = _attention_bias((~src_pad_mask)[:, None, None, :], x.dtype)  # (B, 1, 1, S)
        for layer in self.encoder_layers:
            x = layer(x, pad_bias)  # (B, S, H)
        if self.encoder_norm is not None:
            x = self.encoder_norm(x)
        memory: list[Tensor] = []
        for layer in self.decoder_layers:
            memory.extend(layer.cross_attn.project_kv(x))  # 2 x (B, nh, S, hs)
        # Empty slices of a cross key: batch, heads, head size and dtype right by construction, and static in an
        # exported graph. One tensor per state name (not one shared object), so each becomes its own graph output.
        state = tuple(memory[0][:, :, :0] for _ in self.state_names())  # (B, nh, 0, hs) each
        return tuple(memory), state

    def decode_step(
        self,
        prev_ids: Tensor,
        memory: tuple[Tensor, ...],
        src_pad_mask: Tensor,
        state: tuple[Tensor, ...],
        cache_pad_mask: Tensor | None = None,
    ) -> tuple[Tensor, tuple[Tensor, ...]]:
        """prev_ids (B,) the tokens chosen last step -> (log_probs (B, V), state with one more cached position).

        cache_pad_mask (B, P), True at cached positions that are not the row's own: a sentence that joined a running
        batch has its cache padded in front to the batch's length. Each row then attends to its own positions only
        and is at position (its own cached positions), so it decodes as it would alone."""
        # The new token attends to every (own) cached position and itself: no causal mask is needed for one position.
        if cache_pad_mask is None:
            x, new_state = self._decode(prev_ids[:, None], memory, src_pad_mask, state, self_bias=None)  # (B, 1, H)
        else:
            new = cache_pad_mask.new_ones((cache_pad_mask.shape[0], 1))  # (B, 1): the position being decoded
            allowed = torch.cat([~cache_pad_mask, new], dim=1)  # (B, P+1)
            self_bias = _attention_bias(allowed[:, None, None, :], self.src_embed.weight.dtype)  # (B, 1, 1, P+1)
            # (B,) each row's own cached positions; summed over `allowed`, never over a zero-length axis (step 0 has
            # P = 0, and onnxruntime's CUDA ReduceSum refuses an empty axis)
            positions = allowed.sum(dim=1) - 1
            x, new_state = self._decode(prev_ids[:, None], memory, src_pad_mask, state, self_bias, positions)
        logits = self._logits(x[:, 0])  # (B, V)
        return torch.log_softmax(logits, dim=-1), new_state

    def forward(self, src_ids: Tensor, src_pad_mask: Tensor, tgt_in_ids: Tensor) -> Tensor:
        """Teacher forcing: src_ids, src_pad_mask (B, S), tgt_in_ids (B, T) -> logits (B, T, V)."""
        memory, state = self.encode(src_ids, src_pad_mask)
        T = tgt_in_ids.shape[1]
        allowed = causal_mask(T, device=tgt_in_ids.device)  # (T, T)
        self_bias = _attention_bias(allowed, self.src_embed.weight.dtype)[None, None]  # (1, 1, T, T)
        x, _ = self._decode(tgt_in_ids, memory, src_pad_mask, state, self_bias=self_bias)  # (B, T, H)
        return self._logits(x)  # (B, T, V)

    # --- shared by forward and decode_step ---

    def _decode(
        self,
        tgt_ids: Tensor,
        memory: tuple[Tensor, ...],
        src_pad_mask: Tensor,
        state: tuple[Tensor, ...],
        self_bias: Tensor | None,
        positions: Tensor | None = None,
    ) -> tuple[Tensor, tuple[Tensor, ...]]:
        """tgt_ids (B, T) at positions P .. P+T-1, where P is the cache length, or (T = 1) at each row's own
        `positions` (B,) -> (B, T, H) and the extended caches."""
        T = tgt_ids.shape[1]
        past = state[0].shape[2]  # P, read from the tensor so it stays a dynamic dimension in ONNX
        if not _exporting():
            last = past + T if positions is None else (int(positions.max()) + 1 if positions.numel() else 0)
            if last > self.config.max_positions:
                raise InputTooLong(tokens=last, limit=self.config.max_positions, side="target")
        if positions is None:
            position_vectors = self.tgt_positions(past, T)  # (T, H)
        else:
            position_vectors = self.tgt_positions.table[positions][:, None, :]  # (B, 1, H)
        x = self.tgt_embed(tgt_ids) * self.embed_scale + position_vectors  # (B, T, H)
        x = self.dropout(x)
        cross_bias = _attention_bias((~src_pad_mask)[:, None, None, :], x.dtype)  # (B, 1, 1, S)
        new_state: list[Tensor] = []
        for i, layer in enumerate(self.decoder_layers):
            x, key, value = layer(
                x, state[2 * i], state[2 * i + 1], memory[2 * i], memory[2 * i + 1], self_bias, cross_bias
            )  # (B, T, H), (B, nh, P+T, hs) x 2
            new_state.extend((key, value))
        if self.decoder_norm is not None:
            x = self.decoder_norm(x)
        return x, tuple(new_state)

    def _logits(self, x: Tensor) -> Tensor:
        logits = self.output(x)  # (..., V)
        if self.final_logits_bias is not None:
            logits = logits + self.final_logits_bias
        return logits
