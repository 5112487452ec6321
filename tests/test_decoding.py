"""Reference greedy decoding (models/decoding.py), generic over the translator surface."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from seqserve.models.decoding import greedy_decode
from seqserve.models.rnn import RNNConfig, RNNTranslator

PAD, BOS, EOS, V = 0, 1, 2, 12


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


class CopyTranslator:
    """A translator whose right answer is known: it emits its source tokens in order, then EOS forever.

    Its only state is the step position, batch-first like every translator's."""

    def __init__(self) -> None:
        self.steps = 0

    def encode(self, src_ids: Tensor, src_pad_mask: Tensor) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
        return (src_ids,), (torch.zeros(src_ids.shape[0], dtype=torch.long),)

    def decode_step(
        self, prev_ids: Tensor, memory: tuple[Tensor, ...], src_pad_mask: Tensor, state: tuple[Tensor, ...]
    ) -> tuple[Tensor, tuple[Tensor, ...]]:
        self.steps += 1
        (src,), (position,) = memory, state
        index = position.clamp(max=src.shape[1] - 1)[:, None]  # (B, 1)
        real = (position < src.shape[1]) & ~src_pad_mask.gather(1, index).squeeze(1)  # (B,)
        token = torch.where(real, src.gather(1, index).squeeze(1), torch.full_like(position, EOS))  # (B,)
        log_probs = torch.log_softmax(10.0 * torch.nn.functional.one_hot(token, V).float(), dim=-1)  # (B, V)
        return log_probs, (position + 1,)


def source(rows: list[list[int]]) -> tuple[Tensor, Tensor]:
    S = max(len(r) for r in rows)
    src = torch.tensor([r + [PAD] * (S - len(r)) for r in rows])
    return src, src == PAD


def tiny_rnn(**overrides) -> RNNTranslator:
    torch.manual_seed(0)
    config = RNNConfig(src_vocab_size=V, tgt_vocab_size=V, emb_dim=8, hidden_size=16, **overrides)
    return RNNTranslator(config).eval()


def test_greedy_keeps_eos_and_pads_rows_after_it() -> None:
    src, pad_mask = source([[5, 6, 7, 8], [9, 10], [4, 11, 3]])
    out = greedy_decode(CopyTranslator(), src, pad_mask, max_len=10, bos_id=BOS, eos_id=EOS, pad_id=PAD)
    assert out.tolist() == [[5, 6, 7, 8, EOS], [9, 10, EOS, PAD, PAD], [4, 11, 3, EOS, PAD]]


def test_greedy_stops_once_every_row_has_produced_eos() -> None:
    model = CopyTranslator()
    src, pad_mask = source([[5, 6], [9, 10, 4]])
    out = greedy_decode(model, src, pad_mask, max_len=50, bos_id=BOS, eos_id=EOS, pad_id=PAD)
    assert out.shape == (2, 4)  # the longest row's 3 tokens and its EOS
    assert model.steps == 4


def test_greedy_stops_at_max_len_when_no_row_ends() -> None:
    src, pad_mask = source([[5, 6, 7, 8, 9], [9, 10, 4, 3, 5]])
    out = greedy_decode(CopyTranslator(), src, pad_mask, max_len=3, bos_id=BOS, eos_id=EOS, pad_id=PAD)
    assert out.tolist() == [[5, 6, 7], [9, 10, 4]]


def test_greedy_on_an_rnn_stops_at_eos_when_eos_is_most_likely() -> None:
    model = tiny_rnn()
    with torch.no_grad():
        model.generator.bias[EOS] = 100.0
    src, pad_mask = source([[5, 6, 7, EOS], [9, EOS]])
    out = greedy_decode(model, src, pad_mask, max_len=20, bos_id=BOS, eos_id=EOS)
    assert out.tolist() == [[EOS], [EOS]]


def test_greedy_tokens_are_the_argmax_of_teacher_forcing_on_them() -> None:
    model = tiny_rnn(cell="gru", bidirectional=True, attention="additive")
    with torch.no_grad():
        model.generator.bias[EOS] = -100.0  # no row ends, so every position is a real greedy choice
    src, pad_mask = source([[5, 6, 7, 8, EOS], [9, 10, EOS]])
    out = greedy_decode(model, src, pad_mask, max_len=6, bos_id=BOS, eos_id=EOS)
    tgt_in = torch.cat([torch.full((2, 1), BOS), out[:, :-1]], dim=1)  # (B, T): <s> y[:-1]
    with torch.no_grad():
        forced = model(src, pad_mask, tgt_in).argmax(-1)  # (B, T)
    assert out.shape == (2, 6)
    assert torch.equal(forced, out)


def test_greedy_pads_with_the_models_pad_id_by_default() -> None:
    src, pad_mask = source([[5, 6, 7], [9]])
    model = CopyTranslator()
    model.config = RNNConfig(src_vocab_size=V, tgt_vocab_size=V, pad_id=11, bos_id=BOS, eos_id=EOS)
    out = greedy_decode(model, src, pad_mask, max_len=10, bos_id=BOS, eos_id=EOS)
    assert out[1].tolist() == [9, EOS, 11, 11]
