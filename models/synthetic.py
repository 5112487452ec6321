"""Synthetic tasks and tiny checkpoints: reversal of letter sequences, topic documents, translators/BERTs in seconds.

Tests, fixtures and benchmarks of every part build on these; ``models/train.py`` holds the training they call.
"""

from __future__ import annotations

import dataclasses
import os
import random
from pathlib import Path
from typing import Any

from seqserve.models.train import TrainConfig, train_bert, train_translator

SYMBOLS = "abcdefghijklmnopqrstuvwxyz"
NUMBER_WORDS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve")
TOPICS = ("river", "market", "castle", "forest", "harbor", "desert", "garden", "temple")


def reversal_pairs(n: int, seed: int, symbols: int = 8, min_len: int = 3, max_len: int = 8) -> list[tuple[str, str]]:
    """``n`` pairs ``"a c b" -> "b c a"`` over the first ``symbols`` letters, lengths ``min_len..max_len``."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        seq = [rng.choice(SYMBOLS[:symbols]) for _ in range(rng.randint(min_len, max_len))]
        pairs.append((" ".join(seq), " ".join(reversed(seq))))
    return pairs


def synthetic_documents(n: int, seed: int, sentences: int = 6, fillers: int = 3) -> list[list[str]]:
    """Documents where next sentences are learnable: every sentence names its document's topic and counts up
    ("harbor three ..."), and its filler words come from that topic's own small word list."""
    rng = random.Random(seed)
    words = {t: [f"{t[:3]}{c}" for c in "aeiou"] for t in TOPICS}
    documents = []
    for _ in range(n):
        topic = rng.choice(TOPICS)
        start = rng.randrange(len(NUMBER_WORDS) - sentences + 1)
        documents.append([
            " ".join([topic, NUMBER_WORDS[start + i], *(rng.choice(words[topic]) for _ in range(fillers))])
            for i in range(sentences)
        ])
    return documents


TINY_TRANSLATOR = TrainConfig(
    embed_size=32, hidden_size=64, layers=1, heads=4, ff_size=128, dropout=0.0, attention="general", max_len=16,
    token_budget=700, lr=5e-3, schedule="linear", warmup=0, steps=400, validate_every=200, bleu_sample=50,
    progress=False,
)
# Where a family needs more to learn the reversal task to >= 95% exact match reliably (tuned over seeds);
# tiny_translator does not apply these, so that fixtures built with the plain settings stay as they are.
TINY_OVERRIDES: dict[str, dict[str, Any]] = {
    "transformer": {"heads": 2, "steps": 800, "validate_every": 400, "token_budget": 1000},
}
TINY_BERT = TrainConfig(
    arch="bert", hidden_size=32, layers=2, heads=2, ff_size=64, dropout=0.0, max_len=32, vocab_size=200,
    vocab_kind="bpe", token_budget=1024, lr=5e-3, schedule="linear", warmup=20, steps=300, validate_every=150,
    progress=False,
)


def tiny_translator(output_dir: str | os.PathLike, arch: str = "lstm", **overrides: Any) -> Path:
    """A small translator trained in seconds on reversal of letter sequences; returns its checkpoint folder.

    ``overrides`` replace TrainConfig fields, e.g. ``steps=50`` for a checkpoint that only needs to exist."""
    from seqserve.models.tokenization import train_tokenizer

    config = dataclasses.replace(TINY_TRANSLATOR, arch=arch, **overrides)
    train, dev = reversal_pairs(2000, config.seed), reversal_pairs(100, config.seed + 1000)
    tokenizer = train_tokenizer([s for s, _ in train], kind="bpe", vocab_size=40, role="joint")
    train_translator(config, train, dev, output_dir, {"source": tokenizer, "target": tokenizer})
    return Path(output_dir)


def tiny_bert(output_dir: str | os.PathLike, **overrides: Any) -> Path:
    """A small BERT with MLM/NSP heads trained in seconds on ``synthetic_documents``; returns its checkpoint folder."""
    config = dataclasses.replace(TINY_BERT, **overrides)
    train_bert(config, synthetic_documents(200, config.seed), output_dir, dev=synthetic_documents(20, config.seed + 1))
    return Path(output_dir)


