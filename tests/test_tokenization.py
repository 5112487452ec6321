"""Tokenizers: special ids, post-processors, round trips, vocabulary size, saved-file fidelity."""

from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer

from seqserve.models.tokenization import (
    TokenizerError,
    special_token_ids,
    train_tokenizer,
    train_translation_tokenizers,
)

ENGLISH = [
    "Choose Tools - Options - Load/Save, then click OK.",
    "The cash value is 15,000 currency units at 5.5% interest.",
    "Does the file open? Yes: it opens (quickly) in 2 seconds!",
    "Select the cells A1:B10 and press Enter.",
    "Insert a table with 3 rows and 4 columns.",
]
GERMAN = [
    "Wählen Sie Extras - Optionen - Laden/Speichern und klicken Sie auf OK.",
    "Der Barwert beträgt 15.000 Währungseinheiten bei 5,5 % Zinsen.",
    "Öffnet sich die Datei? Ja: sie öffnet sich (schnell) in 2 Sekunden!",
    "Markieren Sie die Zellen A1:B10 und drücken Sie die Eingabetaste.",
    "Fügen Sie eine Tabelle mit 3 Zeilen und 4 Spalten ein. Größe, Maße, Grüße.",
]
CORPUS = (ENGLISH + GERMAN) * 4


def _fold(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture(scope="module")
def bpe_source() -> Tokenizer:
    return train_tokenizer(CORPUS, kind="bpe", vocab_size=300, role="source")


@pytest.fixture(scope="module")
def wordpiece_bert() -> Tokenizer:
    return train_tokenizer(CORPUS, kind="wordpiece", vocab_size=300, role="bert")


@pytest.mark.parametrize("kind, role", [("bpe", "target"), ("bpe", "joint"), ("wordpiece", "source")])
def test_translator_special_ids_are_fixed(kind: str, role: str) -> None:
    tokenizer = train_tokenizer(CORPUS, kind=kind, vocab_size=200, role=role)
    assert special_token_ids(tokenizer) == {"pad": 0, "bos": 1, "eos": 2, "unk": 3}


@pytest.mark.parametrize("role", ["target", "joint"])
def test_wordpiece_is_refused_where_a_translation_is_decoded(role: str) -> None:
    # Its decoder puts spaces around punctuation: a perfect translator would lose ~10 BLEU to its own tokenizer.
    with pytest.raises(TokenizerError, match="spaces around punctuation.*use bpe"):
        train_tokenizer(CORPUS, kind="wordpiece", vocab_size=200, role=role)
    with pytest.raises(TokenizerError, match="translators cannot use WordPiece"):
        train_translation_tokenizers(list(zip(ENGLISH, GERMAN)) * 4, "wordpiece", 200, joint=role == "joint")


COMPATIBILITY_TEXT = "Warte… das kostet ½ Euro, die ﬁrma sagt „ja“ – x²."


@pytest.mark.parametrize("joint", [False, True])
def test_a_target_keeps_the_characters_a_reference_holds(joint: bool) -> None:
    # NFKC would turn "…" into "...", "½" into "1⁄2", "ﬁ" into "fi", "²" into "2": a translator could never write
    # them and BLEU would be scored against references that hold them. The target side normalizes with NFC.
    pairs = [(e, g) for e, g in zip(ENGLISH, GERMAN)] * 4 + [("Wait... it costs half.", COMPATIBILITY_TEXT)] * 4
    source, target = train_translation_tokenizers(pairs, "bpe", 300, joint=joint, min_frequency=1)
    ids = target.encode(COMPATIBILITY_TEXT, add_special_tokens=False).ids
    assert target.decode(ids) == COMPATIBILITY_TEXT
    if not joint:  # the source, only read, folds compatibility forms together
        assert source.normalizer.normalize_str("Warte… ﬁ") == "Warte... fi"


@pytest.mark.parametrize("kind", ["bpe", "wordpiece"])
def test_bert_special_ids_are_read_from_vocabulary(kind: str) -> None:
    tokenizer = train_tokenizer(CORPUS, kind=kind, vocab_size=200, role="bert")
    ids = special_token_ids(tokenizer)
    assert set(ids) == {"pad", "unk", "cls", "sep", "mask"}
    assert [tokenizer.id_to_token(ids[n]) for n in ("pad", "unk", "cls", "sep", "mask")] == [
        "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
    ]


def test_source_encoding_appends_eos(bpe_source: Tokenizer) -> None:
    encoding = bpe_source.encode("Select the cells.")
    assert encoding.ids[-1] == 2
    assert encoding.ids.count(2) == 1
    assert 1 not in encoding.ids  # no BOS on the source side


def test_target_encoding_has_no_specials() -> None:
    _, target = train_translation_tokenizers(list(zip(ENGLISH, GERMAN)) * 4, kind="bpe", vocab_size=200)
    ids = target.encode("Markieren Sie die Zellen.").ids
    assert ids == target.encode("Markieren Sie die Zellen.", add_special_tokens=False).ids
    assert not {0, 1, 2} & set(ids)


def test_joint_vocabulary_is_one_tokenizer_for_both_sides() -> None:
    source, target = train_translation_tokenizers(list(zip(ENGLISH, GERMAN)) * 4, "bpe", 300, joint=True)
    assert source is target
    assert source.encode("Öffnet sich die Datei?").ids[-1] == 2
    assert source.token_to_id("\u2581Sie") is not None and source.token_to_id("\u2581the") is not None


def test_separate_vocabularies_follow_their_language() -> None:
    source, target = train_translation_tokenizers(list(zip(ENGLISH, GERMAN)) * 4, "bpe", 300, joint=False)
    assert source.token_to_id("\u2581Sie") is None and target.token_to_id("\u2581Sie") is not None


@pytest.mark.parametrize(
    "text",
    [
        "Öffnet sich die Datei? Ja: sie öffnet sich (schnell) in 2 Sekunden!",
        "The cash value is 15,000 currency units at 5.5% interest.",
        "Größe   und Maße,\tbitte  drücken Sie   die Eingabetaste.",
    ],
)
def test_bpe_round_trips_up_to_whitespace(bpe_source: Tokenizer, text: str) -> None:
    ids = bpe_source.encode(text).ids
    assert bpe_source.decode(ids, skip_special_tokens=True) == _fold(text)


def test_wordpiece_round_trips_up_to_spaces_around_punctuation(wordpiece_bert: Tokenizer) -> None:
    text = "Öffnet sich die Datei? Ja: sie öffnet (schnell) in 2 Sekunden!"
    decoded = wordpiece_bert.decode(wordpiece_bert.encode(text).ids, skip_special_tokens=True)
    # BERT-style WordPiece splits punctuation into words, so only the characters, not the spacing, are kept.
    assert decoded.replace(" ", "") == text.replace(" ", "")
    assert decoded.startswith("Öffnet sich die Datei?")


def test_bert_pair_template_and_type_ids(wordpiece_bert: Tokenizer) -> None:
    ids = special_token_ids(wordpiece_bert)
    first, second = "Select the cells.", "Press Enter."
    a = wordpiece_bert.encode(first, add_special_tokens=False).ids
    b = wordpiece_bert.encode(second, add_special_tokens=False).ids
    encoding = wordpiece_bert.encode(first, second)
    assert encoding.ids == [ids["cls"], *a, ids["sep"], *b, ids["sep"]]
    assert encoding.type_ids == [0] * (len(a) + 2) + [1] * (len(b) + 1)
    single = wordpiece_bert.encode(first)
    assert single.ids == [ids["cls"], *a, ids["sep"]] and set(single.type_ids) == {0}


def test_bpe_bert_tokenizer_uses_bert_template() -> None:
    tokenizer = train_tokenizer(CORPUS, kind="bpe", vocab_size=200, role="bert")
    encoding = tokenizer.encode("Press Enter.", "Insert a table.")
    assert encoding.tokens[0] == "[CLS]" and encoding.tokens.count("[SEP]") == 2
    assert encoding.type_ids[-1] == 1


@pytest.mark.parametrize("kind", ["bpe", "wordpiece"])
def test_vocabulary_size_is_respected(kind: str) -> None:
    rng = random.Random(0)
    syllables = ["ka", "lo", "mi", "ne", "sto", "ru", "pa", "ve", "di", "gu", "ä", "ö", "ü", "ß"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(400)]
    texts = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(300)]
    for vocab_size in (60, 150):
        tokenizer = train_tokenizer(texts, kind=kind, vocab_size=vocab_size, role="source", min_frequency=1)
        assert tokenizer.get_vocab_size() == vocab_size


def test_saved_tokenizer_keeps_pipeline(bpe_source: Tokenizer, tmp_path) -> None:
    path = tmp_path / "source_tokenizer.json"
    bpe_source.save(str(path))
    loaded = Tokenizer.from_file(str(path))
    text = "Wählen Sie Extras - Optionen, bitte."
    assert loaded.encode(text).ids == bpe_source.encode(text).ids
    assert loaded.decode(loaded.encode(text).ids, skip_special_tokens=True) == text


def test_unseen_characters_become_unk(bpe_source: Tokenizer) -> None:
    assert 3 in bpe_source.encode("Select \u4e2d cells.").ids


@pytest.mark.parametrize(
    "kwargs",
    [{"kind": "sentencepiece"}, {"role": "decoder"}, {"vocab_size": 4}],
)
def test_bad_arguments_raise_tokenizer_error(kwargs: dict) -> None:
    with pytest.raises(TokenizerError):
        train_tokenizer(CORPUS, **kwargs)


def test_empty_corpus_raises_tokenizer_error() -> None:
    with pytest.raises(TokenizerError, match="0 non-empty"):
        train_tokenizer(["", "   "], kind="bpe", vocab_size=100)


def test_special_token_ids_rejects_foreign_tokenizer() -> None:
    from tokenizers import models

    with pytest.raises(TokenizerError):
        special_token_ids(Tokenizer(models.BPE()))
