"""Corpus files: reading, line-numbered validation, sentence splitting, LibreOffice help alignment, dev split, CLI.

Nothing here touches the network or /work/shared/data: the help pages are tiny fakes written by the tests.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest

from seqserve.cli import main
from seqserve.models.corpora import (
    CORPUS_FILES,
    SHARED_ENV,
    BuildError,
    align_paragraphs,
    deduplicate,
    extract_help_pairs,
    help_paragraphs,
    prepare_corpora,
    split_dev,
)
from seqserve.models.data import DataError, read_documents, read_pairs, split_sentences, validate_file


def _write(path: Path, data: bytes) -> Path:
    if path.name.endswith(".gz"):
        data = gzip.compress(data)
    path.write_bytes(data)
    return path


GOOD_TSV = "Open the file.\tÖffnen Sie die Datei.\nClose it!\tSchließen Sie sie!\n".encode()


# --- reading pairs ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["pairs.tsv", "pairs.tsv.gz"])
def test_read_pairs_reads_plain_and_gzip(tmp_path: Path, name: str) -> None:
    path = _write(tmp_path / name, GOOD_TSV)
    assert read_pairs(path) == [("Open the file.", "Öffnen Sie die Datei."), ("Close it!", "Schließen Sie sie!")]


def test_read_pairs_strips_sides_crlf_and_bom(tmp_path: Path) -> None:
    path = _write(tmp_path / "p.tsv", b"\xef\xbb\xbf  Open \t Offen \r\nA b\tC d\r\n")
    assert read_pairs(path) == [("Open", "Offen"), ("A b", "C d")]


@pytest.mark.parametrize(
    ("bad_line", "reason"),
    [
        (b"no tab here", "no TAB between source and target"),
        (b"one\ttwo\tthree", "2 TABs (expected exactly one)"),
        (b"   \tnur Ziel", "empty source side"),
        (b"only source\t  ", "empty target side"),
        (b"", "empty line"),
        (b"caf\xe9\tCaf\xc3\xa9", "not UTF-8: byte 3"),
    ],
)
@pytest.mark.parametrize("name", ["bad.tsv", "bad.tsv.gz"])
def test_strict_read_reports_file_line_and_reason(tmp_path: Path, name: str, bad_line: bytes, reason: str) -> None:
    path = _write(tmp_path / name, GOOD_TSV + bad_line + b"\n" + GOOD_TSV)
    with pytest.raises(DataError) as caught:
        read_pairs(path)
    assert caught.value.line == 3
    assert caught.value.path == str(path)
    assert reason in caught.value.reason
    assert str(caught.value).startswith(f"{path}:3: ")


def test_lenient_read_skips_and_reports_every_bad_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    lines = [b"a\tb", b"no tab", b"c\td", b"x\ty\tz", b"\xff\xfe\tq", b"e\tf", b"\tg"]
    path = _write(tmp_path / "mixed.tsv", b"\n".join(lines) + b"\n")
    problems: list[DataError] = []
    pairs = read_pairs(path, strict=False, problems=problems)
    assert pairs == [("a", "b"), ("c", "d"), ("e", "f")]
    assert [p.line for p in problems] == [2, 4, 5, 7]
    assert sum("skipping" in record.message for record in caplog.records) == 4


def test_data_error_survives_pickling() -> None:
    import pickle

    error = pickle.loads(pickle.dumps(DataError("corpus.tsv", 7, "no TAB between source and target")))
    assert (error.path, error.line, str(error)) == ("corpus.tsv", 7, "corpus.tsv:7: no TAB between source and target")


def test_file_without_pairs_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no source<TAB>target pairs") as caught:
        read_pairs(_write(tmp_path / "empty.tsv", b""))
    assert caught.value.line is None


def test_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file"):
        read_pairs(tmp_path / "absent.tsv")


def test_truncated_gzip_is_reported_not_crashed_on(tmp_path: Path) -> None:
    path = tmp_path / "cut.tsv.gz"
    path.write_bytes(gzip.compress(GOOD_TSV * 200)[:-30])
    with pytest.raises(DataError, match="cannot read"):
        read_pairs(path)


# --- prose -----------------------------------------------------------------------------------------------------------


def test_read_documents_one_per_line_split_into_sentences(tmp_path: Path) -> None:
    text = "Mr. Speaker, we met. The year was good!\n\nIs it over? Yes.\n"
    path = _write(tmp_path / "speeches.txt.gz", text.encode())
    assert read_documents(path) == [["Mr. Speaker, we met.", "The year was good!"], ["Is it over?", "Yes."]]


def test_read_documents_reports_invalid_utf8_line(tmp_path: Path) -> None:
    path = _write(tmp_path / "prose.txt", b"Fine text.\n\nBroken \xc3( text.\n")
    with pytest.raises(DataError) as caught:
        read_documents(path)
    assert caught.value.line == 3 and "not UTF-8" in caught.value.reason


def test_blank_prose_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no text"):
        read_documents(_write(tmp_path / "blank.txt", b"\n  \n\n"))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("It rained. Then it stopped.", ["It rained.", "Then it stopped."]),
        ("Mr. Smith met Dr. Jones. They talked.", ["Mr. Smith met Dr. Jones.", "They talked."]),
        ("John F. Kennedy spoke. He left.", ["John F. Kennedy spoke.", "He left."]),
        ("Use e.g. the menu. Or not.", ["Use e.g. the menu.", "Or not."]),
        ("Version 5.5 is out... and stable.", ["Version 5.5 is out... and stable."]),
        ('He said "Stop." "Why?" she asked.', ['He said "Stop."', '"Why?" she asked.']),
        ("Wählen Sie OK. Öffnen Sie   die Datei.", ["Wählen Sie OK.", "Öffnen Sie die Datei."]),
    ],
)
def test_sentence_splitter(text: str, expected: list[str]) -> None:
    assert split_sentences(text) == expected


# --- LibreOffice help alignment --------------------------------------------------------------------------------------

EN_PAGE = """<html><body><div id="DisplayArea">
<p id="bm_module" hidden>WRITER</p>
<h1 id="hd_id100" dir="auto">Load/Save options</h1>
<p id="par_id101" class="paragraph">Choose <span id="sw1" class="switchinline"><span hidden="true" id="MACsw1"
 class="MAC"><span class="emph">LibreOffice - Preferences</span></span><span hidden="true" id="defaultsw1"><span
 class="emph">Tools - Options</span></span></span> - Load/Save.</p>
<p id="par_id102" class="paragraph">Saves the file. Then closes it.</p>
<p id="par_id103" class="paragraph">Only in English.</p>
<p id="par_id104" class="paragraph">OK</p>
<span class="switch"><span hidden="true" id="WRITERsw2" class="WRITER">
<p id="par_id105" class="paragraph">Rotates the text &amp; the frame.<br>By 90 degrees.</p></span></span>
<p id="par_id106">Use 5.5% for 36 months. The value is 15,000 units.</p>
</div></body></html>"""

DE_PAGE = """<html><body><div id="DisplayArea">
<p id="bm_module" hidden>WRITER</p>
<h1 id="hd_id100" dir="auto">Optionen Laden/Speichern</h1>
<p id="par_id101" class="paragraph">Wählen Sie <span id="sw1" class="switchinline"><span hidden="true" id="MACsw1"
 class="MAC"><span class="emph">LibreOffice – Einstellungen</span></span><span hidden="true" id="defaultsw1"><span
 class="emph">Extras – Optionen</span></span></span> – Laden/Speichern.</p>
<p id="par_id102" class="paragraph">Speichert die Datei. Dann wird sie geschlossen.</p>
<p id="par_id104" class="paragraph">OK</p>
<span class="switch"><span hidden="true" id="WRITERsw2" class="WRITER">
<p id="par_id105" class="paragraph">Dreht den Text &amp; den Rahmen.<br>Um 90 Grad.</p></span></span>
<p id="par_id106">Verwenden Sie 5,5 % für 36 Monate. Der Wert ist 15.000 Einheiten. Am 18. Tag.</p>
</div></body></html>"""


def test_help_page_paragraphs_keep_default_switch_text_only() -> None:
    paragraphs = help_paragraphs(EN_PAGE)
    assert paragraphs["par_id101"] == "Choose Tools - Options - Load/Save."
    assert paragraphs["hd_id100"] == "Load/Save options"
    assert "bm_module" not in paragraphs


def test_help_page_paragraphs_keep_block_switch_text_and_break_at_br() -> None:
    assert help_paragraphs(EN_PAGE)["par_id105"] == "Rotates the text & the frame. By 90 degrees."


def test_align_pairs_same_ids_and_splits_equal_sentence_counts() -> None:
    pairs = align_paragraphs(help_paragraphs(EN_PAGE), help_paragraphs(DE_PAGE))
    assert ("Load/Save options", "Optionen Laden/Speichern") in pairs
    assert ("Choose Tools - Options - Load/Save.", "Wählen Sie Extras – Optionen – Laden/Speichern.") in pairs
    assert ("Saves the file.", "Speichert die Datei.") in pairs
    assert ("Then closes it.", "Dann wird sie geschlossen.") in pairs
    assert ("Rotates the text & the frame.", "Dreht den Text & den Rahmen.") in pairs
    assert not any("Only in English" in source for source, _ in pairs)


def test_align_keeps_whole_paragraph_when_sentence_counts_differ() -> None:
    pairs = align_paragraphs(help_paragraphs(EN_PAGE), help_paragraphs(DE_PAGE))
    assert (
        "Use 5.5% for 36 months. The value is 15,000 units.",
        "Verwenden Sie 5,5 % für 36 Monate. Der Wert ist 15.000 Einheiten. Am 18. Tag.",
    ) in pairs


def test_align_keeps_paragraph_when_sentence_lengths_implausible() -> None:
    english = {"p": "Click here. This long sentence explains every single option of the dialog in detail."}
    german = {"p": "Klicken Sie hier und lesen Sie die lange Erklärung aller Optionen. Fertig."}
    assert align_paragraphs(english, german) == [(english["p"], german["p"])]


def test_deduplicate_drops_identical_sides_and_repeated_english() -> None:
    pairs = [("OK", "OK"), ("Save", "Speichern"), ("Save", "Sichern"), ("Open", "Öffnen")]
    assert deduplicate(pairs) == [("Save", "Speichern"), ("Open", "Öffnen")]


def test_extract_help_pairs_walks_both_trees(tmp_path: Path) -> None:
    for language, page in (("en-US", EN_PAGE), ("de", DE_PAGE)):
        (tmp_path / language / "text" / "shared").mkdir(parents=True)
        (tmp_path / language / "text" / "shared" / "a.html").write_text(page, encoding="utf-8")
        # the same page again under another name: its pairs repeat the English, so they are dropped
        (tmp_path / language / "text" / "shared" / "b.html").write_text(page, encoding="utf-8")
    (tmp_path / "en-US" / "text" / "only_en.html").write_text(EN_PAGE, encoding="utf-8")
    pairs = extract_help_pairs(tmp_path / "en-US", tmp_path / "de")
    assert [source for source, _ in pairs] == [
        "Load/Save options",
        "Choose Tools - Options - Load/Save.",
        "Saves the file.",
        "Then closes it.",
        "Rotates the text & the frame.",
        "By 90 degrees.",
        "Use 5.5% for 36 months. The value is 15,000 units.",
    ]


def test_extract_reads_xhp_source_pages(tmp_path: Path) -> None:
    page = """<helpdocument><body><paragraph id="par_id1" role="paragraph">Choose <switchinline select="sys">
    <caseinline select="MAC">{mac}</caseinline><defaultinline>{default}</defaultinline></switchinline>.</paragraph>
    </body></helpdocument>"""
    (tmp_path / "en").mkdir()
    (tmp_path / "de").mkdir()
    (tmp_path / "en" / "x.xhp").write_text(page.format(mac="Preferences", default="Tools - Options"))
    (tmp_path / "de" / "x.xhp").write_text(page.format(mac="Einstellungen", default="Extras - Optionen"))
    pairs = extract_help_pairs(tmp_path / "en", tmp_path / "de")
    assert pairs == [("Choose Tools - Options.", "Choose Extras - Optionen.")]


def test_extract_without_pages_raises_build_error(tmp_path: Path) -> None:
    with pytest.raises(BuildError, match="no .html or .xhp"):
        extract_help_pairs(tmp_path, tmp_path)


# --- dev split -------------------------------------------------------------------------------------------------------


def _numbered_pairs(n: int) -> list[tuple[str, str]]:
    return [(" ".join(["word"] * (1 + i % 45)) + f" {i}", f"Wort {i}") for i in range(n)]


def test_dev_split_is_held_apart_and_in_word_range() -> None:
    pairs = _numbered_pairs(500)
    train, dev = split_dev(pairs, size=50, seed=7)
    assert len(dev) == 50 and len(train) == 450
    assert all(4 <= len(source.split()) <= 40 for source, _ in dev)
    assert not {s for s, _ in dev} & {s for s, _ in train}
    assert sorted(train + dev) == sorted(pairs)


def test_dev_split_is_deterministic_given_seed() -> None:
    pairs = _numbered_pairs(500)
    assert split_dev(pairs, 50, seed=7) == split_dev(pairs, 50, seed=7)
    assert split_dev(pairs, 50, seed=7)[1] != split_dev(pairs, 50, seed=8)[1]


def test_dev_split_drops_train_copies_of_dev_english() -> None:
    pairs = [(f"one two three four {i}", f"de {i}") for i in range(20)] + [("one two three four 0", "andere")]
    train, dev = split_dev(pairs, size=20, seed=1, words=(5, 5))
    assert len(dev) == 20 and train == []


def test_dev_split_keeps_held_out_english_out_of_both_sides() -> None:
    pairs = _numbered_pairs(500)
    held = {source for source, _ in pairs[:100]}
    train, dev = split_dev(pairs, size=50, seed=7, hold_out=held)
    assert len(train) + len(dev) == 400
    assert not held & {source for source, _ in train + dev}


def test_dev_split_needs_enough_candidates() -> None:
    with pytest.raises(BuildError, match="only 3 pairs"):
        split_dev([("a b c d", "x"), ("e f g h", "y"), ("i j k l", "z")], size=5)


# --- shared copies and the CLI ---------------------------------------------------------------------------------------


@pytest.fixture()
def shared_dir(tmp_path: Path) -> Path:
    shared = tmp_path / "shared"
    shared.mkdir()
    for name in CORPUS_FILES:
        _write(shared / name, GOOD_TSV)
    return shared


def test_prepare_copies_shared_corpora(shared_dir: Path, tmp_path: Path) -> None:
    corpora = prepare_corpora(tmp_path / "out", shared=shared_dir)
    assert corpora.origin == f"copied from {shared_dir}"
    assert read_pairs(corpora.train) == read_pairs(shared_dir / CORPUS_FILES[0])
    assert all((tmp_path / "out" / name).is_file() for name in CORPUS_FILES)


def test_prepare_finds_shared_corpora_through_environment(
    shared_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(SHARED_ENV, str(shared_dir))
    assert prepare_corpora(tmp_path / "out").origin == f"copied from {shared_dir}"


def test_prepare_refuses_incomplete_shared_folder(tmp_path: Path) -> None:
    with pytest.raises(BuildError, match="lacks"):
        prepare_corpora(tmp_path / "out", shared=tmp_path)


def test_cli_build_from_shared(shared_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["data", "--from-shared", str(shared_dir), "--output", str(tmp_path / "out")]) == 0
    assert "copied from" in capsys.readouterr().out
    assert (tmp_path / "out" / CORPUS_FILES[1]).read_bytes() == (shared_dir / CORPUS_FILES[1]).read_bytes()


def test_cli_validate_good_files_exit_zero(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    pairs = _write(tmp_path / "ok.tsv.gz", GOOD_TSV)
    prose = _write(tmp_path / "ok.txt", b"One speech. Two sentences.\n\nAnother.\n")
    assert main(["data", "validate", str(pairs), str(prose)]) == 0
    out = capsys.readouterr().out
    assert f"{pairs}: OK, 2 pairs" in out and f"{prose}: OK, 2 documents" in out


def test_cli_validate_reports_bad_lines_and_exits_one(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = _write(tmp_path / "bad.tsv", GOOD_TSV + b"missing tab\n" + b"a\tb\tc\n")
    assert main(["data", "validate", str(bad)]) == 1
    out = capsys.readouterr().out
    assert f"{bad}: 2 problem(s), 2 good pairs" in out
    assert f"{bad}:3: no TAB between source and target" in out
    assert f"{bad}:4: 2 TABs (expected exactly one)" in out


def test_cli_validate_option_form_and_problem_limit(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = _write(tmp_path / "bad.tsv", b"a\tb\n" + b"x\n" * 5)
    assert main(["data", "--validate", str(bad), "--max-problems", "2"]) == 1
    out = capsys.readouterr().out
    assert f"{bad}:3: no TAB" in out and f"{bad}:4:" not in out and "and 3 more" in out


def test_cli_validate_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["data", "validate", str(tmp_path / "nope.txt")]) == 1
    assert "no such file" in capsys.readouterr().out


def test_validate_file_kind_can_be_forced(tmp_path: Path) -> None:
    path = _write(tmp_path / "pairs.data", GOOD_TSV)
    assert validate_file(path).kind == "prose" and validate_file(path).ok
    report = validate_file(path, kind="pairs")
    assert report.kind == "pairs" and report.records == 2 and report.ok
