"""A MarianMT directory with random weights and a locally trained SentencePiece model, for tests and benchmarks.

Sizes: `TINY` (tests), `SMALL` (256, 3+3 layers, 4 heads, FFN 1024) and `BASE` (transformer-base: 512, 6+6, 8, 2048),
vocabulary 8000 for the benchmark sizes. The text the SentencePiece model learns from is synthetic (words made of
random syllables) and written by this module, so nothing is downloaded.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

_SYLLABLES = [c + v for c in "bcdfghklmnprstvwz" for v in "aeiou"] + ["th", "sch", "qu", "ng", "ei", "au"]


@dataclass(frozen=True)
class MarianSize:
    d_model: int
    layers: int
    heads: int
    ffn: int
    vocab: int
    # Weight init std: large enough that greedy choices are not near-ties float rounding could flip (tests compare
    # token for token), small enough that log-probabilities stay within the export's parity tolerance.
    init_std: float = 0.05


TINY = MarianSize(d_model=32, layers=2, heads=4, ffn=64, vocab=300, init_std=0.3)
SMALL = MarianSize(d_model=256, layers=3, heads=4, ffn=1024, vocab=8000)
BASE = MarianSize(d_model=512, layers=6, heads=8, ffn=2048, vocab=8000)
SIZES = {"tiny": TINY, "small": SMALL, "base": BASE}


def synthetic_sentences(n: int, seed: int = 0, words: int = 4000) -> list[str]:
    """n sentences of 5-25 words drawn (Zipf-like) from a lexicon of random syllable words."""
    rng = random.Random(seed)
    lexicon = sorted({"".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 4))) for _ in range(words)})
    rng.shuffle(lexicon)
    weights = [1.0 / (i + 1) for i in range(len(lexicon))]
    out = []
    for _ in range(n):
        sentence = " ".join(rng.choices(lexicon, weights, k=rng.randint(5, 25)))
        out.append(sentence[0].upper() + sentence[1:] + rng.choice([".", ".", "?", "!"]))
    return out


def train_spm(out_dir: Path, vocab: int, seed: int = 0) -> Path:
    """A unigram SentencePiece model of `vocab` pieces (including <unk>, <s>, </s>) trained on synthetic text."""
    import sentencepiece as spm

    text = out_dir / "spm_train.txt"
    n = max(2000, vocab * 6)
    text.write_text("\n".join(synthetic_sentences(n, seed, words=max(600, vocab * 3))) + "\n", encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(text), model_prefix=str(out_dir / "spm"), vocab_size=vocab, model_type="unigram",
        character_coverage=1.0, hard_vocab_limit=False, num_threads=2, minloglevel=2, seed_sentencepiece_size=200000,
    )  # fmt: skip
    text.unlink()
    return out_dir / "spm.model"


def build_marian_dir(
    out_dir: str | Path, size: MarianSize, seed: int = 0, language_codes: tuple[str, ...] = ()
) -> Path:
    """Save a random-weight MarianMTModel and its MarianTokenizer files (source.spm, target.spm, vocab.json) to
    out_dir; returns it. `language_codes` (">>fra<<") join the vocabulary as multilingual models have them.
    EOS gets a -50 logit bias, so greedy outputs run to the length limit in every toolkit."""
    import sentencepiece as spm
    import torch
    from transformers import MarianConfig, MarianMTModel, MarianTokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model_path = train_spm(out, size.vocab, seed)  # vocab.json: <s> out, <pad> in
    processor = spm.SentencePieceProcessor(model_file=str(model_path))
    pieces = [processor.id_to_piece(i) for i in range(processor.get_piece_size())]
    # Marian's vocabulary order: </s> 0, <unk> 1, the pieces, <pad> last.
    vocab = {"</s>": 0, "<unk>": 1}
    for piece in pieces:
        if piece not in ("<s>", "</s>", "<unk>") and piece not in vocab:
            vocab[piece] = len(vocab)
    for code in language_codes:  # multilingual OPUS-MT targets: ">>fra<<" tokens in vocab.json, not in the spm
        vocab[code] = len(vocab)
    vocab["<pad>"] = len(vocab)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    for name in ("source.spm", "target.spm"):
        (out / name).write_bytes(model_path.read_bytes())
    model_path.unlink()
    (out / "spm.vocab").unlink(missing_ok=True)
    tokenizer = MarianTokenizer(str(out / "source.spm"), str(out / "target.spm"), str(out / "vocab.json"))
    tokenizer.save_pretrained(str(out))

    V = len(vocab)
    config = MarianConfig(
        vocab_size=V, decoder_vocab_size=V, d_model=size.d_model, encoder_layers=size.layers,
        decoder_layers=size.layers, encoder_attention_heads=size.heads, decoder_attention_heads=size.heads,
        encoder_ffn_dim=size.ffn, decoder_ffn_dim=size.ffn, activation_function="swish", scale_embedding=True,
        share_encoder_decoder_embeddings=True, tie_word_embeddings=True, pad_token_id=V - 1, eos_token_id=0,
        decoder_start_token_id=V - 1, forced_eos_token_id=None, max_position_embeddings=512, max_length=512,
        num_beams=1,
    )  # fmt: skip
    torch.manual_seed(seed)
    config.init_std = size.init_std
    model = MarianMTModel(config).eval()
    with torch.no_grad():
        bias = torch.randn(1, V) * 0.05
        bias[0, 0] = -50.0  # EOS: never chosen, every toolkit decodes to the same length limit
        model.final_logits_bias.copy_(bias)
    model.generation_config.bad_words_ids = [[V - 1]]  # as OPUS-MT: generate never produces <pad>
    model.save_pretrained(str(out))
    log.info("MarianMT %s (vocabulary %d) saved to %s", size, V, out)
    return out
