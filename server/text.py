"""Server-side tokenization with the repository's tokenizer.json files: limits, rejection or truncation.

Translators: the source tokenizer's post-processor appends `</s>`, so `encode(text).ids` is the encoder input; output
ids are turned back into text with the target tokenizer. BERT: `[CLS] A [SEP]` or `[CLS] A [SEP] B [SEP]` with
token type ids 0/1. A truncating copy of each tokenizer is made once at load (mutating a shared tokenizer per
request would not be thread-safe).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from tokenizers import Tokenizer

from seqserve.server.errors import InputTooLong, TextTooLong, TooManyTexts
from seqserve.server.config import Limits


@dataclass(frozen=True)
class Encoded:
    """One tokenized input: ids (special tokens included) and token type ids."""

    ids: list[int]
    type_ids: list[int]
    truncated_from: int = 0  # original token count when truncated, else 0

    def __len__(self) -> int:
        return len(self.ids)


def token_limit(limits: dict, keys: Sequence[str], default: int) -> int:
    """The first of `keys` set in a manifest's limits (or config), else `default`."""
    for key in keys:
        if limits.get(key):
            return int(limits[key])
    return default


def check_count(n: int, limits: Limits) -> None:
    if n > limits.max_texts:
        raise TooManyTexts(n, limits.max_texts)


def check_chars(texts: list[str], limits: Limits, offset: int = 0) -> None:
    for i, text in enumerate(texts):
        if len(text) > limits.max_chars_per_text:
            raise TextTooLong(len(text), limits.max_chars_per_text, offset + i)


class TextCodec:
    """Tokenizes requests for one model under its token limit; `truncate=False` rejects with InputTooLong."""

    def __init__(self, tokenizer: Tokenizer, limit: int, decoder: Tokenizer | None = None):
        self.tokenizer = tokenizer
        self.limit = limit
        self.decoder = decoder or tokenizer
        self._truncating = Tokenizer.from_str(tokenizer.to_str())
        self._truncating.no_padding()
        self._truncating.enable_truncation(max_length=limit)
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()

    def encode(self, text: str, pair: str | None = None, truncate: bool = False, index: int = 0) -> Encoded:
        enc = self.tokenizer.encode(text, pair) if pair is not None else self.tokenizer.encode(text)
        if len(enc.ids) <= self.limit:
            return Encoded(list(enc.ids), list(enc.type_ids))
        if not truncate:
            raise InputTooLong(len(enc.ids), self.limit, index)
        cut = self._truncating.encode(text, pair) if pair is not None else self._truncating.encode(text)
        return Encoded(list(cut.ids), list(cut.type_ids), truncated_from=len(enc.ids))

    def decode(self, ids: list[int]) -> str:
        return self.decoder.decode(ids, skip_special_tokens=True)

    def token(self, token_id: int) -> str:
        return self.decoder.id_to_token(int(token_id)) or ""


def pad_batch(rows: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad id lists into (B, L) int64 and the (B, L) pad mask (True at padding)."""
    longest = max((len(r) for r in rows), default=0)
    ids = np.full((len(rows), longest), pad_id, dtype=np.int64)  # (B, L)
    pad_mask = np.ones((len(rows), longest), dtype=bool)  # (B, L)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
        pad_mask[i, : len(row)] = False
    return ids, pad_mask
