"""BERT: embeddings, post-norm Transformer encoder, pooler, masked-LM and next-sentence heads, pretraining data.

Leaves first: embeddings -> self-attention -> feed-forward -> layer -> heads -> config -> model -> pretraining data.
The layout follows Hugging Face's modeling_bert.py (post-norm layers, exact GELU, the attention mask as an additive
bias) so imported checkpoints (models/hf.py) give the same numbers, and onnxruntime's BERT optimizer recognises the
exported attention and fuses it.

Letters: B batch, S sequence length, H hidden, I intermediate (feed-forward) size, V vocabulary, nh heads,
hs head size (H = nh * hs), N number of masked positions.
"""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IGNORE_INDEX = -100  # label of positions the masked-LM loss skips (torch's cross_entropy default)
IS_NEXT, NOT_NEXT = 0, 1  # next-sentence labels, as in the original BERT and Hugging Face


class BertConfigError(ValueError):
    """A BertConfig whose numbers do not fit together."""


class InputTooLong(ValueError):
    """A sequence longer than the learned position embeddings."""

    def __init__(self, tokens: int, limit: int) -> None:
        super().__init__(f"sequence of {tokens} tokens is longer than max_position_embeddings={limit}")
        self.tokens = tokens
        self.limit = limit


class NSPDataError(ValueError):
    """Documents from which next-sentence pairs cannot be drawn."""


_ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),  # exact (erf) GELU, Hugging Face's "gelu"
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


# --- encoder ------------------------------------------------------------------------------------------------------


class BertEmbeddings(nn.Module):
    """Token + segment + learned position embeddings, then LayerNorm and dropout."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.word = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.segment = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        # A slice of a constant rather than arange(S): the form onnxruntime's embedding fusion expects.
        self.register_buffer(
            "position_ids", torch.arange(config.max_position_embeddings).unsqueeze(0), persistent=False
        )  # (1, max_positions)

    def forward(self, input_ids: Tensor, token_type_ids: Tensor) -> Tensor:
        positions = self.position_ids[:, : input_ids.shape[1]]  # (1, S)
        x = self.word(input_ids) + self.segment(token_type_ids) + self.position(positions)  # (B, S, H)
        return self.dropout(self.norm(x))


class BertSelfAttention(nn.Module):
    """Multi-head scaled dot-product self-attention; padding enters as an additive bias on the scores."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_size = config.hidden_size // config.num_attention_heads
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)
        self.out = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout = nn.Dropout(config.attention_probs_dropout_prob)

    def _split_heads(self, x: Tensor) -> Tensor:
        B, S, _ = x.shape
        return x.view(B, S, self.num_heads, self.head_size).permute(0, 2, 1, 3)  # (B, nh, S, hs)

    def forward(self, x: Tensor, attention_bias: Tensor) -> Tensor:
        """x (B, S, H), attention_bias (B, 1, 1, S): 0 where attention is allowed, a huge negative at padding."""
        B, S, H = x.shape
        q = self._split_heads(self.query(x))  # (B, nh, S, hs)
        k = self._split_heads(self.key(x))  # (B, nh, S, hs)
        v = self._split_heads(self.value(x))  # (B, nh, S, hs)
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_size)  # (B, nh, S, S)
        scores = scores + attention_bias  # (B, nh, S, S)
        probs = self.dropout(torch.softmax(scores, dim=-1))  # (B, nh, S, S)
        context = torch.matmul(probs, v)  # (B, nh, S, hs)
        context = context.permute(0, 2, 1, 3).contiguous().view(B, S, H)  # (B, S, H)
        return self.out(context)  # (B, S, H)


class BertFeedForward(nn.Module):
    """Position-wise feed-forward: H -> I -> H with the configured activation."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.up = nn.Linear(config.hidden_size, config.intermediate_size)
        self.down = nn.Linear(config.intermediate_size, config.hidden_size)
        self.activation = _ACTIVATIONS[config.hidden_act]

    def forward(self, x: Tensor) -> Tensor:
        return self.down(self.activation(self.up(x)))  # (B, S, I) -> (B, S, H)


class BertLayer(nn.Module):
    """One encoder layer, post-norm: x = LN(x + Attn(x)); x = LN(x + FFN(x))."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.attention = BertSelfAttention(config)
        self.attention_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.ffn = BertFeedForward(config)
        self.ffn_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x: Tensor, attention_bias: Tensor) -> Tensor:
        x = self.attention_norm(x + self.dropout(self.attention(x, attention_bias)))  # (B, S, H)
        return self.ffn_norm(x + self.dropout(self.ffn(x)))  # (B, S, H)


# --- heads --------------------------------------------------------------------------------------------------------


class BertPooler(nn.Module):
    """dense + tanh over the [CLS] position: the input of the next-sentence head."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, sequence_output: Tensor) -> Tensor:
        return torch.tanh(self.dense(sequence_output[:, 0]))  # (B, H)


class BertMLMHead(nn.Module):
    """Masked-LM head: transform (dense, activation, LayerNorm), then a decoder tied to the word embeddings + bias."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.transform = nn.Linear(config.hidden_size, config.hidden_size)
        self.activation = _ACTIVATIONS[config.hidden_act]
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size)  # weight tied by Bert when configured

    def forward(self, sequence_output: Tensor) -> Tensor:
        x = self.norm(self.activation(self.transform(sequence_output)))  # (B, S, H)
        return self.decoder(x)  # (B, S, V)


# --- config and model ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BertConfig:
    """The fields of a Hugging Face BertConfig that change the computation, plus what seqserve records for serving."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    initializer_range: float = 0.02
    pad_token_id: int = 0
    tie_word_embeddings: bool = True
    with_pooler: bool = True  # False for encoders saved without the pooler (pooled_output is then None)
    with_heads: bool = True  # False for sentence-embedding encoders without MLM/NSP weights
    pooling: str = "cls"  # sentence embedding: "cls" = sequence_output[:, 0], "mean" = masked mean over real tokens
    normalize_embeddings: bool = False  # L2-normalise the sentence embedding (sentence-transformers' Normalize)

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise BertConfigError(
                f"hidden_size={self.hidden_size} is not divisible by num_attention_heads={self.num_attention_heads}"
            )
        if self.hidden_act not in _ACTIVATIONS:
            raise BertConfigError(f"hidden_act={self.hidden_act!r} is not one of {sorted(_ACTIVATIONS)}")
        if self.pooling not in ("cls", "mean"):
            raise BertConfigError(f"pooling={self.pooling!r} is not 'cls' or 'mean'")
        if self.with_heads and not self.with_pooler:
            raise BertConfigError("with_heads=True needs with_pooler=True: the NSP head reads the pooled output")
        if not 0 <= self.pad_token_id < self.vocab_size:
            raise BertConfigError(f"pad_token_id={self.pad_token_id} is outside vocab_size={self.vocab_size}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BertConfig:
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields)
        if unknown:
            raise BertConfigError(f"BertConfig has no field(s) {unknown}")
        return cls(**data)


class BertOutput(NamedTuple):
    sequence_output: Tensor  # (B, S, H) last layer's hidden states
    pooled_output: Tensor | None  # (B, H) pooler over [CLS]; None when config.with_pooler is False
    mlm_logits: Tensor | None  # (B, S, V); None when config.with_heads is False
    nsp_logits: Tensor | None  # (B, 2), index IS_NEXT / NOT_NEXT; None when config.with_heads is False


class Bert(nn.Module):
    """BERT encoder with optional pooler, masked-LM and next-sentence heads."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.layers = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))
        self.pooler = BertPooler(config) if config.with_pooler else None
        self.mlm = BertMLMHead(config) if config.with_heads else None
        self.nsp = nn.Linear(config.hidden_size, 2) if config.with_heads else None
        self.apply(self._init_weights)
        if self.mlm is not None and config.tie_word_embeddings:
            self.mlm.decoder.weight = self.embeddings.word.weight

    def _init_weights(self, module: nn.Module) -> None:
        # BERT's initialisation: N(0, 0.02) weights, zero biases, unit LayerNorm.
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.config.initializer_range)
        if isinstance(module, nn.Linear):
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.Embedding) and module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()
        if isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, token_type_ids: Tensor | None = None
    ) -> BertOutput:
        """input_ids (B, S); attention_mask (B, S) 1 at real tokens, 0 at padding; token_type_ids (B, S) 0/1."""
        if not torch.onnx.is_in_onnx_export() and input_ids.shape[1] > self.config.max_position_embeddings:
            raise InputTooLong(tokens=int(input_ids.shape[1]), limit=self.config.max_position_embeddings)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = self.embeddings(input_ids, token_type_ids)  # (B, S, H)
        # 0 where attention is allowed, the most negative float at padding: softmax gives padding exactly 0 weight.
        dtype = x.dtype
        attention_bias = (1.0 - attention_mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min  # (B, 1, 1, S)
        for layer in self.layers:
            x = layer(x, attention_bias)  # (B, S, H)
        pooled = self.pooler(x) if self.pooler is not None else None  # (B, H)
        mlm_logits = self.mlm(x) if self.mlm is not None else None  # (B, S, V)
        nsp_logits = self.nsp(pooled) if self.nsp is not None else None  # (B, 2)
        return BertOutput(x, pooled, mlm_logits, nsp_logits)


def sentence_embedding(output: BertOutput, attention_mask: Tensor, config: BertConfig) -> Tensor:
    """The sentence embedding the config names (cls or masked mean, optionally L2-normalised): (B, H)."""
    if config.pooling == "mean":
        mask = attention_mask.unsqueeze(-1).to(output.sequence_output.dtype)  # (B, S, 1)
        summed = (output.sequence_output * mask).sum(dim=1)  # (B, H)
        embedding = summed / mask.sum(dim=1).clamp(min=1e-9)  # (B, H)
    else:
        embedding = output.sequence_output[:, 0]  # (B, H)
    return F.normalize(embedding, p=2, dim=-1) if config.normalize_embeddings else embedding


# --- pretraining data and loss ------------------------------------------------------------------------------------


def mask_tokens(
    input_ids: Tensor,
    special_mask: Tensor,
    vocab_size: int,
    mask_id: int,
    generator: torch.Generator | None = None,
    prob: float = 0.15,
) -> tuple[Tensor, Tensor]:
    """BERT's masking: choose `prob` of the non-special tokens; of those 80% -> [MASK], 10% -> random, 10% kept.

    input_ids (B, S) long; special_mask (B, S) bool, True at [CLS]/[SEP]/[PAD] and other tokens never to choose.
    Returns (masked input_ids (B, S), labels (B, S)): labels hold the original id at chosen positions, IGNORE_INDEX
    elsewhere.
    """
    if not 0.0 < prob < 1.0:
        raise ValueError(f"masking prob={prob} is not in (0, 1)")
    device = input_ids.device

    def coin(p: float) -> Tensor:  # (B, S) bool, True with probability p, from the one generator
        return torch.bernoulli(torch.full(input_ids.shape, p, device=device), generator=generator).bool()

    chosen = coin(prob) & ~special_mask  # (B, S)
    labels = input_ids.masked_fill(~chosen, IGNORE_INDEX)  # (B, S)
    to_mask = chosen & coin(0.8)  # (B, S)
    # Half of the remaining 20% become a random token; the other half stay as they are.
    to_random = chosen & ~to_mask & coin(0.5)  # (B, S)
    random_ids = torch.randint(
        vocab_size, input_ids.shape, generator=generator, dtype=input_ids.dtype, device=device
    )  # (B, S)
    masked = input_ids.masked_fill(to_mask, mask_id)  # (B, S)
    masked = torch.where(to_random, random_ids, masked)  # (B, S)
    return masked, labels


class NSPPair(NamedTuple):
    first: str  # segment A
    second: str  # segment B
    label: int  # IS_NEXT (0) when B follows A in its document, NOT_NEXT (1) when B is a random sentence


def make_nsp_pairs(documents: list[list[str]], rng: random.Random) -> list[NSPPair]:
    """One pair per adjacent sentence pair of every document; exactly half (rounded down) keep the true next sentence,
    the others take a random sentence from another document (or a non-adjacent one when there is a single document).
    """
    starts = [(d, i) for d, sentences in enumerate(documents) for i in range(len(sentences) - 1)]
    if not starts:
        raise NSPDataError(f"no document of the {len(documents)} given has two sentences")
    labels = [IS_NEXT] * (len(starts) // 2) + [NOT_NEXT] * (len(starts) - len(starts) // 2)
    rng.shuffle(labels)
    others = [d for d, sentences in enumerate(documents) if sentences]
    pairs = []
    for (d, i), label in zip(starts, labels):
        sentences = documents[d]
        if label == IS_NEXT:
            pairs.append(NSPPair(sentences[i], sentences[i + 1], IS_NEXT))
            continue
        candidates = [o for o in others if o != d]
        if candidates:
            other = documents[rng.choice(candidates)]
            second = other[rng.randrange(len(other))]
        else:
            positions = [j for j in range(len(sentences)) if j not in (i, i + 1)]
            if not positions:
                raise NSPDataError(
                    f"a single document of {len(sentences)} sentences has no random sentence for a negative pair"
                )
            second = sentences[rng.choice(positions)]
        pairs.append(NSPPair(sentences[i], second, NOT_NEXT))
    return pairs


class PretrainingLoss(NamedTuple):
    total: Tensor  # mlm + nsp, scalar
    mlm: Tensor  # mean cross-entropy over the chosen positions, scalar
    nsp: Tensor  # mean cross-entropy over the batch, scalar


def pretraining_loss(output: BertOutput, mlm_labels: Tensor, nsp_labels: Tensor) -> PretrainingLoss:
    """Joint BERT loss. mlm_labels (B, S) with IGNORE_INDEX at unchosen positions; nsp_labels (B,) IS_NEXT/NOT_NEXT."""
    if output.mlm_logits is None or output.nsp_logits is None:
        raise BertConfigError("pretraining_loss needs a model built with with_heads=True")
    V = output.mlm_logits.shape[-1]
    chosen = (mlm_labels != IGNORE_INDEX).sum()
    # Sum then divide by max(count, 1): a batch where nothing was chosen gives 0, not NaN.
    mlm = F.cross_entropy(
        output.mlm_logits.reshape(-1, V), mlm_labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    ) / chosen.clamp(min=1)  # (B*S, V) against (B*S,)
    nsp = F.cross_entropy(output.nsp_logits, nsp_labels)  # (B, 2) against (B,)
    return PretrainingLoss(mlm + nsp, mlm, nsp)
