"""What a translator's target tokenizer costs in BLEU before any model: every dev reference of the LibreOffice en-de
corpus encoded and decoded, scored against the raw references (as `seqserve evaluate` scores translations).

- NFC, BPE (the target and joint tokenizers since 58f374d);
- NFKC, BPE (every tokenizer before: the same pipeline as a `source` tokenizer, decoded without its </s>);
- NFKC, WordPiece (what `--vocab-kind wordpiece` gave translators, refused since 58f374d: the `bert` pipeline);
- and, for the NFKC/NFC difference at lower scores, references with words replaced at random (an estimate of what
  the normalization costs a model at that level, not a trained model's figure).

Run from the repository root with the prepared corpora (docs/training.md): python docs/checks/tokenizer-normalization/check.py
"""

import gzip
import itertools
import os
import random
import sys

import sacrebleu

from seqserve.models.tokenization import train_tokenizer

DATA = os.environ.get("SEQSERVE_SHARED_DATA", "/work/shared/data")
with open(f"{DATA}/libreoffice-help.en-de.dev.tsv", encoding="utf-8") as f:
    refs = [line.rstrip("\n").split("\t")[1] for line in f]
with gzip.open(f"{DATA}/libreoffice-help.en-de.train.tsv.gz", "rt", encoding="utf-8") as f:
    targets = [line.rstrip("\n").split("\t")[1] for line in itertools.islice(f, 41526)]
print(f"{len(refs)} dev references; tokenizers trained on {len(targets)} training targets, 8000 tokens", file=sys.stderr)


def round_trip(tokenizer, text: str) -> str:
    return tokenizer.decode(tokenizer.encode(text, add_special_tokens=False).ids, skip_special_tokens=True)


pipelines = {
    "NFC, BPE (target)": train_tokenizer(targets, kind="bpe", vocab_size=8000, role="target"),
    "NFKC, BPE (before)": train_tokenizer(targets, kind="bpe", vocab_size=8000, role="source"),
    "NFKC, WordPiece (refused)": train_tokenizer(targets, kind="wordpiece", vocab_size=8000, role="bert"),
}
for name, tokenizer in pipelines.items():
    decoded = [round_trip(tokenizer, r) for r in refs]
    exact = sum(d == r for d, r in zip(decoded, refs))
    print(f"{name:27s} round trip: {exact}/{len(refs)} exact, BLEU {sacrebleu.corpus_bleu(decoded, [refs]).score:.2f}")
print(f"references holding '\u2026': {sum(chr(0x2026) in r for r in refs)}")

nfkc = pipelines["NFKC, BPE (before)"].normalizer
rng = random.Random(0)
words = [w for r in refs for w in r.split()]
for keep in (0.9, 0.6, 0.4):
    hyps = [" ".join(w if rng.random() < keep else rng.choice(words) for w in r.split()) for r in refs]
    raw = sacrebleu.corpus_bleu([nfkc.normalize_str(h) for h in hyps], [refs]).score
    kept = sacrebleu.corpus_bleu(hyps, [refs]).score
    print(f"references with {1 - keep:.0%} of words replaced: BLEU {kept:.2f} as written, {raw:.2f} after NFKC "
          f"({raw - kept:+.2f})")
