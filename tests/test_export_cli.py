"""`seqserve export` refuses what it cannot do before any work, with one line and a non-zero exit, and the repository
writer never publishes what the API or a JSON reader cannot take."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch

from seqserve.cli import main as seqserve_main
from seqserve.export import export_checkpoint
from seqserve.export.graphs import export_translator
from seqserve.export.parity import ParityError, StepGraphs, open_session, translator_parity
from seqserve.export.pipeline import MAX_TOLERANCE, ExportError
from seqserve.export.writer import STALE_SECONDS, StagedVersion, _write_json, next_version
from seqserve.models.checkpoint import load_checkpoint
from seqserve.server.repository import MAX_VERSION, ModelRepository, RepositoryError

from conftest import tiny_dev_pairs

torch.set_num_threads(1)


def _export(checkpoint: Path, repo: Path, *extra: str) -> int:
    return seqserve_main(["export", str(checkpoint), "-r", str(repo), "-n", "m", "--log-level", "WARNING", *extra])


def _usage_error(capsys, argv) -> str:
    """The exit code of a refused command line is 2 (argparse's), and its message is one line on stderr."""
    with pytest.raises(SystemExit) as info:
        seqserve_main(argv)
    assert info.value.code == 2
    return capsys.readouterr().err


def _dev_file(tmp_path: Path, n: int) -> Path:
    path = tmp_path / "dev.tsv"
    path.write_text("".join(f"{s}\t{t}\n" for s, t in tiny_dev_pairs()[:n]), encoding="utf-8")
    return path


# --- versions ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["4294967296", "99999999999999999999", "0", "-3", "two"])
def test_export_refuses_a_version_the_api_cannot_carry(tmp_path, capsys, version):
    err = _usage_error(capsys, ["export", str(tmp_path), "-r", str(tmp_path / "repo"), "-n", "m", "--version", version])
    assert "--version" in err
    assert not (tmp_path / "repo").exists()


def test_the_highest_version_the_api_carries_is_accepted_and_then_nothing_follows(tmp_path):
    assert MAX_VERSION == 4294967295
    with pytest.raises(RepositoryError, match="4294967295"):
        StagedVersion(tmp_path, "m", MAX_VERSION + 1)
    (tmp_path / "m" / str(MAX_VERSION)).mkdir(parents=True)
    (tmp_path / "m" / str(MAX_VERSION) / "manifest.json").write_text("{}")
    with pytest.raises(RepositoryError, match="highest the API can carry"):
        next_version(tmp_path, "m")


def test_next_version_ignores_folders_numbered_beyond_the_api(tmp_path):
    (tmp_path / "m" / "4294967296").mkdir(parents=True)
    (tmp_path / "m" / "4294967296" / "manifest.json").write_text("{}")
    assert next_version(tmp_path, "m") == 1


# --- tolerance ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tolerance", ["-1", "nan", "inf", "0", "1000", "lots"])
def test_export_refuses_a_tolerance_that_is_no_gate(tmp_path, capsys, tolerance):
    err = _usage_error(capsys, ["export", str(tmp_path), "-r", str(tmp_path / "repo"), "-n", "m", "--tolerance",
                                tolerance])  # fmt: skip
    assert err.splitlines()[-1].startswith("seqserve export: error: argument --tolerance: ")


def test_export_function_refuses_an_infinite_tolerance_before_any_work(tiny_checkpoints, tmp_path):
    with pytest.raises(ExportError, match=f"at most {MAX_TOLERANCE:g}"):
        export_checkpoint(tiny_checkpoints["gru"], tmp_path, "m", tolerance=float("inf"))
    assert list(tmp_path.iterdir()) == []


def test_a_raised_tolerance_does_not_let_greedy_tokens_differ(tiny_checkpoints, tmp_path):
    """Graphs of one model, PyTorch weights then changed: the greedy check refuses whatever the tolerance."""
    model = load_checkpoint(tiny_checkpoints["gru"]).model.eval()
    enc, dec = export_translator(model, tmp_path)
    graphs = StepGraphs(open_session(enc.path), open_session(dec.path), tuple(model.memory_names()),
                        tuple(model.state_names()))  # fmt: skip
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.5 * torch.randn_like(parameter))
    with pytest.raises(ParityError, match="greedy decoding through decoder.onnx.*near-tie of 0.0002"):
        translator_parity(model, graphs, tolerance=1000.0)


# --- the manifest ------------------------------------------------------------------------------------------------


def test_manifest_writer_refuses_infinity_and_nan(tmp_path):
    for value in (float("inf"), float("nan")):
        with pytest.raises(RepositoryError, match="not finite"):
            _write_json(tmp_path / "manifest.json", {"parity": {"tolerance": value}})


def test_non_finite_checkpoint_metrics_are_published_as_null(tiny_checkpoints, tmp_path):
    checkpoint = shutil.copytree(tiny_checkpoints["gru"], tmp_path / "ckpt")
    metrics = json.loads((checkpoint / "metrics.json").read_text())
    (checkpoint / "metrics.json").write_text(json.dumps({**metrics, "dev_bleu": float("nan")}))
    path = export_checkpoint(checkpoint, tmp_path / "repo", "m")
    text = (path / "manifest.json").read_text()
    manifest = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in manifest.json"))
    assert manifest["metrics"]["dev_bleu"] is None


def test_a_link_out_of_the_version_folder_is_not_published(tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("not the version's")
    with pytest.raises(RepositoryError, match="is a link"):
        with StagedVersion(tmp_path / "repo", "m") as stage:
            (stage.dir / "tokenizer.json").symlink_to(outside)
            stage.commit({})
    assert not (tmp_path / "repo" / "m").exists()


# --- leftovers ---------------------------------------------------------------------------------------------------


def test_a_failed_export_of_a_new_name_leaves_no_folder(tiny_checkpoints, tmp_path):
    with pytest.raises(ParityError):
        export_checkpoint(tiny_checkpoints["gru"], tmp_path, "strict", tolerance=1e-12)
    assert list(tmp_path.iterdir()) == []


def test_stale_staging_folders_are_removed_by_the_next_export(tmp_path):
    model_dir = tmp_path / "m"
    old, fresh = model_dir / ".staging-killed", model_dir / ".staging-running"
    for folder in (old, fresh):
        folder.mkdir(parents=True)
        (folder / "encoder.onnx").write_bytes(b"half")
    then = time.time() - STALE_SECONDS - 60
    os.utime(old, (then, then))
    with StagedVersion(tmp_path, "m"):
        pass
    assert not old.exists() and fresh.exists()


# --- int8 options ------------------------------------------------------------------------------------------------


def test_dev_without_quantize_is_a_usage_error(tiny_checkpoints, tmp_path, capsys):
    assert _export(tiny_checkpoints["gru"], tmp_path / "repo", "--dev", str(_dev_file(tmp_path, 40))) == 2
    assert "--quantize int8" in capsys.readouterr().err
    assert not (tmp_path / "repo").exists()


@pytest.mark.parametrize("limit", ["-39", "0", "5"])
def test_dev_limit_below_the_gates_minimum_is_a_usage_error(tmp_path, capsys, limit):
    err = _usage_error(capsys, ["export", str(tmp_path), "-r", str(tmp_path / "repo"), "-n", "m", "--quantize",
                                "int8", "--dev", str(_dev_file(tmp_path, 40)), "--dev-limit", limit])  # fmt: skip
    assert "--dev-limit" in err


def test_int8_translator_refuses_a_dev_file_below_the_minimum(tiny_checkpoints, tmp_path, caplog):
    dev = _dev_file(tmp_path, 5)
    code = _export(tiny_checkpoints["gru"], tmp_path / "repo", "--quantize", "int8", "--dev", str(dev))
    assert code == 1 and "at least 30 dev pairs, got 5" in caplog.text
    assert not (tmp_path / "repo" / "m").exists()


# --- one line instead of a traceback -----------------------------------------------------------------------------


def test_repository_naming_a_file_is_a_usage_error(tiny_checkpoints, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    err = _usage_error(capsys, ["export", str(tiny_checkpoints["gru"]), "-r", str(tmp_path / "file"), "-n", "m"])
    assert "is not a folder" in err


def test_repository_that_cannot_be_created_is_one_line(tiny_checkpoints, tmp_path, caplog):
    assert _export(tiny_checkpoints["gru"], Path("/proc/nope")) == 1
    assert "cannot create /proc/nope/m" in caplog.text and "Traceback" not in caplog.text


@pytest.mark.parametrize("threads", ["-1", "0"])
def test_threads_below_one_is_a_usage_error(tmp_path, capsys, threads):
    assert "--threads" in _usage_error(capsys, ["export", str(tmp_path), "-r", str(tmp_path), "-n", "m", "--threads",
                                                threads])  # fmt: skip


def test_truncated_weights_are_one_line(tiny_checkpoints, tmp_path, caplog):
    checkpoint = shutil.copytree(tiny_checkpoints["gru"], tmp_path / "ckpt")
    weights = checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5])
    assert _export(checkpoint, tmp_path / "repo") == 1
    assert "model.safetensors cannot be read as safetensors" in caplog.text


def test_checkpoint_without_its_target_tokenizer_is_one_line(tiny_checkpoints, tmp_path, caplog):
    checkpoint = shutil.copytree(tiny_checkpoints["gru"], tmp_path / "ckpt")
    (checkpoint / "target_tokenizer.json").unlink()
    assert _export(checkpoint, tmp_path / "repo") == 1
    assert "target_tokenizer.json missing" in caplog.text
    assert ModelRepository(tmp_path).models() == {}
