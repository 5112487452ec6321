"""`seqserve build-default` builds the three default models from a data folder, and only what is missing."""

from __future__ import annotations

import gzip
import json
import time
from pathlib import Path

import pytest

from seqserve.cli import main
from seqserve.export.default_repo import DEFAULT_MODELS, missing_models
from seqserve.models.corpora import DEV_FILE, PROSE_FILE, TRAIN_FILE

WORDS_EN = "the file menu opens a new window with the current document and its styles".split()
WORDS_DE = "das datei menü öffnet ein neues fenster mit dem aktuellen dokument und seinen stilen".split()


def _write_corpora(folder: Path) -> None:
    folder.mkdir(parents=True)
    pairs = [
        (" ".join(WORDS_EN[i : i + n]), " ".join(WORDS_DE[i : i + n]))
        for n in range(3, 9)
        for i in range(len(WORDS_EN) - n)
    ]
    with gzip.open(folder / TRAIN_FILE, "wt", encoding="utf-8") as f:
        f.writelines(f"{s}\t{t}\n" for s, t in pairs * 4)
    (folder / DEV_FILE).write_text("".join(f"{s}\t{t}\n" for s, t in pairs[:10]), encoding="utf-8")
    speech = "We meet today in a time of change. The nation is strong. Our people work hard. We will build roads."
    with gzip.open(folder / PROSE_FILE, "wt", encoding="utf-8") as f:
        f.writelines(f"{speech} Year {year} was good. Trade grew again.\n\n" for year in range(1900, 1930))


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("default")
    _write_corpora(root / "data")
    code = main([
        "build-default", "--repository", str(root / "repo"), "--data", str(root / "data"),
        "--checkpoints", str(root / "ckpt"), "--translator-budget", "2s", "--bert-budget", "2s", "--threads", "1",
        "--translator-arch", "gru",
    ])  # fmt: skip
    assert code == 0
    return root


def test_build_default_writes_every_default_model_with_a_manifest(built: Path) -> None:
    assert missing_models(built / "repo") == []
    tasks = {name: json.loads((built / "repo" / name / "1" / "manifest.json").read_text())["task"] for name in DEFAULT_MODELS}
    assert tasks == {"en-de": "translation", "sotu-bert": "bert", "minilm-l6": "bert"}


def test_build_default_exports_the_bert_with_its_mlm_head_apart(built: Path) -> None:
    manifest = json.loads((built / "repo" / "sotu-bert" / "1" / "manifest.json").read_text())
    assert set(manifest["graphs"]) == {"model", "mlm"}  # Encode and NSP run without the vocabulary-sized head


def test_build_default_if_missing_returns_at_once_when_the_repository_is_complete(built: Path) -> None:
    started = time.monotonic()
    assert main(["build-default", "--repository", str(built / "repo"), "--if-missing"]) == 0
    assert time.monotonic() - started < 5
    assert sorted(p.name for p in (built / "repo" / "en-de").iterdir()) == ["1"]  # nothing rebuilt or added


def test_build_default_builds_only_the_missing_model(built: Path) -> None:
    import shutil

    shutil.rmtree(built / "repo" / "sotu-bert")
    before = {name: (built / "repo" / name / "1" / "manifest.json").stat().st_mtime_ns for name in ("en-de", "minilm-l6")}
    code = main([
        "build-default", "--repository", str(built / "repo"), "--data", str(built / "data"),
        "--checkpoints", str(built / "ckpt2"), "--bert-budget", "1s", "--threads", "1",
    ])  # fmt: skip
    assert code == 0
    assert missing_models(built / "repo") == []
    after = {name: (built / "repo" / name / "1" / "manifest.json").stat().st_mtime_ns for name in ("en-de", "minilm-l6")}
    assert after == before
