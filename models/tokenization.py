"""Subword tokenizers for the model families, trained with the `tokenizers` library (no torch).

A tokenizer is one `tokenizers.Tokenizer`, saved as ``tokenizer.json`` and read by the server with the same library.
The pipeline, shared by every role:

- normalizer: Unicode normalization, whitespace runs folded to one space, ends stripped. NFKC for what is only read
  (``source``, ``bert``: "…" and "..." become one spelling); NFC for what a model writes (``target``, ``joint``), so
  a translator can produce every character its references hold ("…", "½", "ﬁ"); round trips hold up to whitespace
  and the role's normalization. (Tokenizers trained before this kept NFKC on every role; their tokenizer.json keeps it.)
- pre-tokenizer: BPE splits at spaces with a Metaspace marker (``▁``, SentencePiece style), isolates punctuation and
  single digits, so the decoder can rebuild the text exactly by concatenation; WordPiece uses BERT's whitespace and
  punctuation split, digits kept together (decoding then puts spaces around punctuation, as BERT's do: "Jahr :",
  so WordPiece is refused for the ``target`` and ``joint`` roles, whose decoded text is a translation);
- model: BPE or WordPiece with the role's unknown token;
- post-processor by role (docs/design.md "Special tokens"):
  ``source`` / ``joint``: ``$A </s>``; ``target``: none (the training code frames ``<s> y`` / ``y </s>``);
  ``bert``: ``[CLS] $A [SEP]`` and ``[CLS] $A [SEP] $B [SEP]`` with type ids 0 / 1.

Special token ids come first in the vocabulary in the order listed below, so translators always have
``<pad>=0 <s>=1 </s>=2 <unk>=3``. Code reads ids with `special_token_ids`, never assumes them.
"""

from __future__ import annotations

import logging
from typing import Iterable, Literal, Sequence

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

logger = logging.getLogger(__name__)

Kind = Literal["bpe", "wordpiece"]
Role = Literal["source", "target", "joint", "bert"]

KINDS: tuple[str, ...] = ("bpe", "wordpiece")
ROLES: tuple[str, ...] = ("source", "target", "joint", "bert")

TRANSLATOR_SPECIALS: dict[str, str] = {"pad": "<pad>", "bos": "<s>", "eos": "</s>", "unk": "<unk>"}
BERT_SPECIALS: dict[str, str] = {"pad": "[PAD]", "unk": "[UNK]", "cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]"}

METASPACE = "\u2581"  # ▁, marks a word start in BPE tokens
WORDPIECE_PREFIX = "##"


class TokenizerError(ValueError):
    """A tokenizer cannot be trained as asked, or lacks the special tokens of its family."""


def _specials(role: str) -> dict[str, str]:
    return BERT_SPECIALS if role == "bert" else TRANSLATOR_SPECIALS


WRITTEN_ROLES: tuple[str, ...] = ("target", "joint")  # decoded into the text a translator answers
WORDPIECE_WRITES_BADLY = ("WordPiece's decoder puts spaces around punctuation, so a translation would read 'Jahr :' "
                          "for 'Jahr:'; translators use bpe")


def _normalizer(role: str) -> normalizers.Normalizer:
    unicode = normalizers.NFC() if role in WRITTEN_ROLES else normalizers.NFKC()
    return normalizers.Sequence([unicode, normalizers.Replace(Regex(r"\s+"), " "), normalizers.Strip()])


def _build(kind: str, role: str) -> tuple[Tokenizer, trainers.Trainer]:
    """An untrained tokenizer of this kind and role, and the trainer that fills its vocabulary."""
    unk = _specials(role)["unk"]
    if kind == "bpe":
        tokenizer = Tokenizer(models.BPE(unk_token=unk, fuse_unk=True))
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Metaspace(replacement=METASPACE, prepend_scheme="always", split=True),
                pre_tokenizers.Punctuation(behavior="isolated"),
                pre_tokenizers.Digits(individual_digits=True),
            ]
        )
        tokenizer.decoder = decoders.Metaspace(replacement=METASPACE, prepend_scheme="always", split=True)
        trainer_cls = trainers.BpeTrainer
    else:
        tokenizer = Tokenizer(models.WordPiece(unk_token=unk, continuing_subword_prefix=WORDPIECE_PREFIX))
        tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tokenizer.decoder = decoders.WordPiece(prefix=WORDPIECE_PREFIX, cleanup=True)
        trainer_cls = trainers.WordPieceTrainer
    tokenizer.normalizer = _normalizer(role)
    return tokenizer, trainer_cls


def _post_processor(tokenizer: Tokenizer, role: str) -> processors.PostProcessor | None:
    if role == "target":
        return None
    if role == "bert":
        cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
        return processors.TemplateProcessing(
            single="[CLS] $A:0 [SEP]:0",
            pair="[CLS] $A:0 [SEP]:0 $B:1 [SEP]:1",
            special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
        )
    eos_id = tokenizer.token_to_id("</s>")
    return processors.TemplateProcessing(
        single="$A:0 </s>:0", pair="$A:0 </s>:0 $B:1 </s>:1", special_tokens=[("</s>", eos_id)]
    )


def train_tokenizer(
    texts: Iterable[str],
    kind: Kind = "bpe",
    vocab_size: int = 8000,
    role: Role = "source",
    min_frequency: int = 2,
) -> Tokenizer:
    """Train a BPE or WordPiece tokenizer with the special tokens and post-processor of `role`."""
    if kind not in KINDS:
        raise TokenizerError(f"unknown tokenizer kind {kind!r}; choose one of {', '.join(KINDS)}")
    if role not in ROLES:
        raise TokenizerError(f"unknown tokenizer role {role!r}; choose one of {', '.join(ROLES)}")
    if kind == "wordpiece" and role in WRITTEN_ROLES:
        raise TokenizerError(f"a {role} tokenizer cannot be WordPiece: {WORDPIECE_WRITES_BADLY}")
    specials = list(_specials(role).values())
    if vocab_size <= len(specials):
        raise TokenizerError(f"vocab_size={vocab_size} leaves no room beside {len(specials)} special tokens")
    tokenizer, trainer_cls = _build(kind, role)
    options = dict(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials, show_progress=False)
    if kind == "wordpiece":
        options["continuing_subword_prefix"] = WORDPIECE_PREFIX
    tokenizer.train_from_iterator(_nonempty(texts), trainer=trainer_cls(**options))
    for index, token in enumerate(specials):
        # The trainer puts special tokens first; the design fixes translator ids, so check rather than hope.
        if tokenizer.token_to_id(token) != index:
            raise TokenizerError(f"special token {token} got id {tokenizer.token_to_id(token)}, expected {index}")
    processor = _post_processor(tokenizer, role)
    if processor is not None:
        tokenizer.post_processor = processor
    logger.info("trained %s %s tokenizer: %d tokens (asked %d)", kind, role, tokenizer.get_vocab_size(), vocab_size)
    return tokenizer


def _nonempty(texts: Iterable[str]) -> Iterable[str]:
    count = 0
    for text in texts:
        if text and not text.isspace():
            count += 1
            yield text
    if count == 0:
        raise TokenizerError("no text to train a tokenizer on (0 non-empty lines)")


def train_translation_tokenizers(
    pairs: Sequence[tuple[str, str]],
    kind: Kind = "bpe",
    vocab_size: int = 8000,
    joint: bool = False,
    min_frequency: int = 2,
) -> tuple[Tokenizer, Tokenizer]:
    """Source and target tokenizers for a translator; with `joint` one tokenizer (the same object) serves both."""
    if kind == "wordpiece":  # before the source's training: the target's would be refused after it
        raise TokenizerError(f"translators cannot use WordPiece: {WORDPIECE_WRITES_BADLY}")
    if joint:
        texts = (text for pair in pairs for text in pair)
        tokenizer = train_tokenizer(texts, kind, vocab_size, role="joint", min_frequency=min_frequency)
        return tokenizer, tokenizer
    source = train_tokenizer((s for s, _ in pairs), kind, vocab_size, role="source", min_frequency=min_frequency)
    target = train_tokenizer((t for _, t in pairs), kind, vocab_size, role="target", min_frequency=min_frequency)
    return source, target


def special_token_ids(tokenizer: Tokenizer) -> dict[str, int]:
    """``{pad, bos, eos, unk}`` of a translator tokenizer or ``{pad, unk, cls, sep, mask}`` of a BERT one."""
    for specials in (TRANSLATOR_SPECIALS, BERT_SPECIALS):
        ids = {name: tokenizer.token_to_id(token) for name, token in specials.items()}
        if all(i is not None for i in ids.values()):
            return ids  # type: ignore[return-value]
    raise TokenizerError(
        f"tokenizer has neither the translator tokens {list(TRANSLATOR_SPECIALS.values())} "
        f"nor the BERT tokens {list(BERT_SPECIALS.values())} (vocabulary of {tokenizer.get_vocab_size()})"
    )
