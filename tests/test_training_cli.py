"""`seqserve train`: option values it cannot use are usage errors (exit 2), an existing checkpoint is never replaced
unasked, and a resumed run says which options it ignored."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from seqserve.cli import main as cli_main
from seqserve.models import synthetic as S
from seqserve.models.checkpoint import load_checkpoint


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def data(tmp_path) -> Path:
    for name, pairs in (("train.tsv", S.reversal_pairs(200, 0)), ("dev.tsv", S.reversal_pairs(10, 1))):
        (tmp_path / name).write_text("".join(f"{s}\t{t}\n" for s, t in pairs))
    return tmp_path


def _train(data: Path, output: Path, *extra: str) -> int:
    return cli_main([
        "train", "translator", "--arch", "gru", "--train", str(data / "train.tsv"), "--dev", str(data / "dev.tsv"),
        "--output", str(output), "--embed-size", "8", "--layers", "1", "--vocab-size", "30", "--joint-vocab",
        "--steps", "4", "--validate-every", "2", "--no-progress", "--threads", "1", *extra,
    ])  # fmt: skip


@pytest.mark.parametrize("option, value", [("--steps", "0"), ("--dropout", "1.5"), ("--lr", "-1"),
                                           ("--threads", "-1"), ("--hidden-size", "0"),
                                           ("--vocab-kind", "wordpiece")])  # fmt: skip
def test_impossible_option_values_are_usage_errors(data, capsys, option, value):
    assert _train(data, data / "ckpt", option, value) == 2
    err = capsys.readouterr().err
    assert err.startswith("seqserve train translator: error: ") and err.count("\n") == 1
    assert not (data / "ckpt").exists()


def test_output_naming_a_file_is_one_line(data, caplog):
    (data / "file").write_text("mine")
    assert _train(data, data / "file") == 1
    assert "is not a folder" in caplog.text and (data / "file").read_text() == "mine"


def test_an_existing_checkpoint_is_not_replaced_without_resume_or_force(data, caplog):
    assert _train(data, data / "ckpt", "--hidden-size", "16") == 0
    before = (data / "ckpt" / "model.safetensors").read_bytes()
    assert _train(data, data / "ckpt", "--hidden-size", "12") == 1
    assert "holds a checkpoint already" in caplog.text and "--resume" in caplog.text and "--force" in caplog.text
    assert (data / "ckpt" / "model.safetensors").read_bytes() == before
    assert _train(data, data / "ckpt", "--hidden-size", "12", "--force") == 0
    assert load_checkpoint(data / "ckpt").config.hidden_size == 12


def test_force_keeps_the_old_checkpoint_when_the_new_run_cannot_start(data, caplog):
    """--force removes the old checkpoint only once the new run's data has loaded: a wrong --train path leaves it."""
    assert _train(data, data / "ckpt", "--hidden-size", "16") == 0
    before = (data / "ckpt" / "model.safetensors").read_bytes()
    (data / "train.tsv").rename(data / "moved.tsv")
    assert _train(data, data / "ckpt", "--hidden-size", "12", "--force") != 0
    assert (data / "ckpt" / "model.safetensors").read_bytes() == before
    assert load_checkpoint(data / "ckpt").config.hidden_size == 16


def test_resume_and_force_together_are_a_usage_error(data, capsys):
    assert _train(data, data / "ckpt", "--resume", "--force") == 2
    assert "choose one" in capsys.readouterr().err


def test_resume_says_the_size_options_were_ignored(data, caplog):
    assert _train(data, data / "ckpt", "--hidden-size", "16") == 0
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert _train(data, data / "ckpt", "--hidden-size", "64", "--steps", "6", "--resume") == 0
    assert "are the checkpoint's (hidden_size=16); the options for them (--hidden-size)" in caplog.text
    assert "changed settings ['steps']" in caplog.text  # honoured, and it changes the schedule
    assert load_checkpoint(data / "ckpt").config.hidden_size == 16
