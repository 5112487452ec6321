"""Reference decoding in torch, generic over any translator with the stateless surface of docs/design.md.

Letters: B batch, S source length, T decoded length, V vocabulary.

This is the yardstick the exported graphs and the server's numpy decoding are checked against, so it stays the
plainest possible loop: encode once, then feed the argmax back one step at a time.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor


class Translator(Protocol):
    def encode(self, src_ids: Tensor, src_pad_mask: Tensor) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]: ...

    def decode_step(
        self, prev_ids: Tensor, memory: tuple[Tensor, ...], src_pad_mask: Tensor, state: tuple[Tensor, ...]
    ) -> tuple[Tensor, tuple[Tensor, ...]]: ...


@torch.no_grad()
def greedy_decode(
    model: Translator,
    src_ids: Tensor,
    src_pad_mask: Tensor,
    max_len: int,
    bos_id: int,
    eos_id: int,
    pad_id: int | None = None,
) -> Tensor:
    """Greedy decoding -> token ids (B, T<=max_len): each row ends with its EOS (kept) and is padded after it.

    Stops when every row has produced EOS or after `max_len` tokens. `pad_id` defaults to the model's
    `config.pad_id` (0 when the model has none).
    """
    if pad_id is None:
        pad_id = getattr(getattr(model, "config", None), "pad_id", 0)
    B = src_ids.shape[0]
    # 1. Encode the source once.
    memory, state = model.encode(src_ids, src_pad_mask)
    # 2. Step: feed the previous token, take the argmax; finished rows emit padding.
    prev = torch.full((B,), bos_id, dtype=torch.long, device=src_ids.device)  # (B,)
    finished = torch.zeros(B, dtype=torch.bool, device=src_ids.device)  # (B,)
    tokens: list[Tensor] = []
    for _ in range(max_len):
        log_probs, state = model.decode_step(prev, memory, src_pad_mask, state)  # (B, V)
        next_ids = log_probs.argmax(dim=-1).masked_fill(finished, pad_id)  # (B,)
        tokens.append(next_ids)
        finished = finished | (next_ids == eos_id)
        prev = next_ids
        # 3. Stop once every row has ended.
        if bool(finished.all()):
            break
    if not tokens:
        return torch.empty(B, 0, dtype=torch.long, device=src_ids.device)
    return torch.stack(tokens, dim=1)  # (B, T)
