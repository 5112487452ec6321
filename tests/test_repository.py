"""The model repository: atomic versions written by export, read by the torch-free loader."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from tokenizers import Tokenizer, models, pre_tokenizers

from conftest import cuda_starts
from seqserve.export.writer import StagedVersion, VersionExists, next_version
from seqserve.server.repository import (
    FORMAT_VERSION,
    Manifest,
    ModelNotFound,
    ModelRepository,
    ProviderFailed,
    ProviderUnavailable,
    RepositoryError,
    SessionOptions,
    TamperedFile,
    UnknownFormatVersion,
    load_model,
    placement_error,
)

INPUTS = ["input_ids", "attention_mask", "token_type_ids"]


def _write_toy_bert(folder: Path) -> dict:
    """A real (if trivial) BERT-shaped ONNX graph and tokenizer; returns the manifest fields export would write."""
    inputs = [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "seq"]) for n in INPUTS]
    out = helper.make_tensor_value_info("sequence_output", TensorProto.FLOAT, ["batch", "seq"])
    graph = helper.make_graph(
        [helper.make_node("Cast", ["input_ids"], ["sequence_output"], to=TensorProto.FLOAT)], "toy", inputs, [out]
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, folder / "model.onnx")
    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "[MASK]": 4, "hello": 5}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))
    spec = {
        "file": "model.onnx",
        "inputs": [{"name": n, "dtype": "int64", "shape": ["batch", "seq"]} for n in INPUTS],
        "outputs": [{"name": "sequence_output", "dtype": "float32", "shape": ["batch", "seq"]}],
    }
    return {
        "task": "bert",
        "architecture": "bert",
        "config": {"family": "bert", "config": {"hidden": 1}},
        "graphs": {"model": spec},
        "tokenizers": {"text": "tokenizer.json"},
        "special_tokens": {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4},
        "limits": {"max_tokens": 16},
        "outputs": ["sequence_output"],
        "pooling": "mean",
        "quantization": None,
        "parity": {"max_abs_diff": 0.0, "tolerance": 1e-4},
        "metrics": {},
    }


def _publish(repo: Path, name: str = "toy", version: int | None = None, force: bool = False) -> Path:
    with StagedVersion(repo, name, version, force) as stage:
        fields = _write_toy_bert(stage.dir)
        return stage.commit(fields)


def test_manifest_round_trips(tmp_path):
    path = _publish(tmp_path)
    written = json.loads((path / "manifest.json").read_text())
    manifest = Manifest.read(path)
    assert manifest.to_dict() == written
    assert Manifest.from_dict(manifest.to_dict()) == manifest
    assert manifest.format_version == FORMAT_VERSION and manifest.version == 1 and manifest.name == "toy"
    assert set(manifest.files) == {"model.onnx", "tokenizer.json"}
    assert manifest.files["model.onnx"]["bytes"] == (path / "model.onnx").stat().st_size
    assert manifest.graphs["model"].input_names == INPUTS


def test_loaded_model_runs_and_carries_its_tokenizer(tmp_path):
    loaded = load_model(_publish(tmp_path))
    ids = np.array([[2, 5, 3], [2, 3, 0]], dtype=np.int64)
    (out,) = loaded.sessions["model"].run(None, {"input_ids": ids, "attention_mask": ids, "token_type_ids": ids})
    np.testing.assert_array_equal(out, ids.astype(np.float32))
    assert loaded.tokenizers["text"].token_to_id("hello") == 5


def test_tampered_file_is_refused_with_its_name(tmp_path):
    path = _publish(tmp_path)
    data = bytearray((path / "model.onnx").read_bytes())
    data[-1] ^= 0xFF  # same size, different content
    (path / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(TamperedFile, match="model.onnx") as info:
        load_model(path)
    assert info.value.actual != info.value.expected


def test_missing_file_is_refused_with_its_name(tmp_path):
    path = _publish(tmp_path)
    (path / "tokenizer.json").unlink()
    with pytest.raises(TamperedFile, match="tokenizer.json"):
        load_model(path)


def test_unknown_format_version_is_refused(tmp_path):
    path = _publish(tmp_path)
    data = json.loads((path / "manifest.json").read_text())
    data["format_version"] = FORMAT_VERSION + 1
    (path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(UnknownFormatVersion, match=f"format_version {FORMAT_VERSION + 1}"):
        load_model(path)


def test_a_manifest_that_cannot_be_read_as_text_is_a_repository_error(tmp_path):
    path = _publish(tmp_path)
    (path / "manifest.json").write_bytes(b'{"name": "caf\xe9"}')
    with pytest.raises(RepositoryError, match="not UTF-8"):
        Manifest.read(path)
    (path / "manifest.json").unlink()
    (path / "manifest.json").mkdir()  # a folder where the file goes
    with pytest.raises(RepositoryError, match="cannot be read"):
        Manifest.read(path)


@pytest.mark.parametrize("content", ["[]", "3", '"manifest"', "null"])
def test_a_manifest_that_is_not_a_json_object_is_a_repository_error(tmp_path, content):
    path = _publish(tmp_path)
    (path / "manifest.json").write_text(content)
    with pytest.raises(RepositoryError, match="malformed manifest"):
        Manifest.read(path)


def _edit_manifest(path: Path, edit) -> None:
    data = json.loads((path / "manifest.json").read_text())
    edit(data)
    (path / "manifest.json").write_text(json.dumps(data))


def test_a_listed_file_without_a_hash_or_outside_the_version_is_refused(tmp_path):
    path = _publish(tmp_path)
    _edit_manifest(path, lambda d: d["files"]["model.onnx"].pop("sha256"))
    with pytest.raises(RepositoryError, match="'model.onnx' has no sha256"):
        Manifest.read(path)
    path = _publish(tmp_path)
    _edit_manifest(path, lambda d: d["files"].update({"../../etc/hostname": {"sha256": "0" * 64}}))
    with pytest.raises(RepositoryError, match="outside the version folder"):
        Manifest.read(path)


def test_an_unreadable_tokenizer_is_refused_naming_its_file(tmp_path):
    import hashlib

    path = _publish(tmp_path)
    (path / "tokenizer.json").write_text('{"version": "1.0"}')  # JSON, and hashed as published, but no tokenizer
    data = (path / "tokenizer.json").read_bytes()
    entry = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    _edit_manifest(path, lambda d: d["files"].update({"tokenizer.json": entry}))
    with pytest.raises(RepositoryError, match="tokenizer.json: not a tokenizer"):
        load_model(path)


def test_a_version_number_the_api_cannot_carry_is_no_version(tmp_path):
    import shutil

    shutil.copytree(_publish(tmp_path, "toy"), tmp_path / "toy" / str(2**32))
    assert ModelRepository(tmp_path).versions("toy") == [1]


@pytest.mark.parametrize("content, message", [
    ('{"max_batch_tokens": "lots"}', "max_batch_tokens 'lots' is not valid: an integer of at least 1"),
    ('{"max_queue_delay_ms": -5}', "max_queue_delay_ms -5 is not valid: a finite number of at least 0"),
    ('{"max_join_ms": Infinity}', "max_join_ms inf is not valid: a finite number of at least 0"),
    ('{"dispatch_when_idle": 1}', "dispatch_when_idle 1 is not valid: true or false"),
    ('{"max_batch_size": true}', "max_batch_size True is not valid: an integer of at least 1"),
    ('{"max_batch_tokenz": 1}', "unknown setting 'max_batch_tokenz'; known: max_batch_tokens"),
    ("[1, 2]", "a JSON object of batching settings is expected, not a list"),
])  # fmt: skip
def test_a_serving_config_with_a_wrong_setting_is_refused_naming_it(tmp_path, content, message):
    _publish(tmp_path)
    (tmp_path / "toy" / "config.json").write_text(content)
    with pytest.raises(RepositoryError, match=re.escape(message)):
        ModelRepository(tmp_path).serving_config("toy")


def test_a_serving_config_with_every_setting_is_read(tmp_path):
    _publish(tmp_path)
    settings = {"max_batch_tokens": 512, "max_queue_delay_ms": 2.5, "dispatch_when_idle": False, "max_batch_size": 8,
                "max_join_ms": 0, "inline_max_ms": 1}  # fmt: skip
    (tmp_path / "toy" / "config.json").write_text(json.dumps(settings))
    assert ModelRepository(tmp_path).serving_config("toy") == settings


def test_a_copied_version_folder_is_refused_naming_both(tmp_path):
    import shutil

    shutil.copytree(_publish(tmp_path, "toy"), tmp_path / "toy" / "2")  # cp -r toy/1 toy/2: its manifest says 1
    shutil.copytree(tmp_path / "toy" / "1", tmp_path / "alias" / "1")  # a model folder copied under another name
    repo = ModelRepository(tmp_path)
    assert repo.load("toy", 1).manifest.version == 1
    with pytest.raises(RepositoryError, match=r"says model 'toy' version 1, the folder is toy/2"):
        repo.load("toy", 2)
    with pytest.raises(RepositoryError, match=r"says model 'toy' version 1, the folder is alias/1"):
        repo.manifest("alias")


def test_half_written_version_is_never_visible(tmp_path):
    _publish(tmp_path, "toy")
    with pytest.raises(RuntimeError, match="export failed"):
        with StagedVersion(tmp_path, "toy") as stage:
            _write_toy_bert(stage.dir)
            # Everything but the manifest and the rename is done: readers still see only version 1.
            assert ModelRepository(tmp_path).models() == {"toy": [1]}
            raise RuntimeError("export failed")
    assert ModelRepository(tmp_path).models() == {"toy": [1]}
    assert sorted(p.name for p in (tmp_path / "toy").iterdir()) == ["1"]  # staging folder removed


def test_version_defaults_to_the_next_number(tmp_path):
    assert next_version(tmp_path, "toy") == 1
    _publish(tmp_path, "toy")
    _publish(tmp_path, "toy", version=5)
    assert _publish(tmp_path, "toy").name == "6"
    assert ModelRepository(tmp_path).versions("toy") == [1, 5, 6]


def test_existing_version_is_not_overwritten_without_force(tmp_path):
    path = _publish(tmp_path, "toy", version=1)
    before = (path / "manifest.json").read_text()
    with pytest.raises(VersionExists, match="--force"):
        _publish(tmp_path, "toy", version=1)
    assert (path / "manifest.json").read_text() == before


def test_force_replaces_an_existing_version(tmp_path):
    path = _publish(tmp_path, "toy", version=1)
    created = json.loads((path / "manifest.json").read_text())["created"]
    with StagedVersion(tmp_path, "toy", 1, force=True) as stage:
        fields = _write_toy_bert(stage.dir)
        fields["created"] = "2000-01-01T00:00:00Z"
        stage.commit(fields)
    assert Manifest.read(path).created == "2000-01-01T00:00:00Z" != created
    assert sorted(p.name for p in (tmp_path / "toy").iterdir()) == ["1"]


def test_invalid_model_name_is_refused(tmp_path):
    with pytest.raises(RepositoryError, match="Bad_Name"):
        StagedVersion(tmp_path, "Bad_Name")


def test_manifest_without_version_is_the_highest(tmp_path):
    _publish(tmp_path, "toy", version=2)
    _publish(tmp_path, "toy", version=3)
    repo = ModelRepository(tmp_path)
    assert repo.manifest("toy").version == 3
    assert repo.manifest("toy", 2).version == 2


def test_unknown_model_lists_what_exists(tmp_path):
    _publish(tmp_path, "toy")
    with pytest.raises(ModelNotFound, match=r"toy \(versions 1\)"):
        ModelRepository(tmp_path).manifest("other")
    with pytest.raises(ModelNotFound, match="toy version 7"):
        ModelRepository(tmp_path).manifest("toy", 7)


def test_session_options_set_threads_spinning_and_optimisation():
    so = SessionOptions(intra_op_threads=2, inter_op_threads=1, graph_optimization="basic").ort_options()
    assert so.intra_op_num_threads == 2 and so.inter_op_num_threads == 1
    assert so.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    assert so.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert SessionOptions(allow_spinning=True).ort_options().get_session_config_entry(
        "session.intra_op.allow_spinning"
    ) == "1"


_SHARED_POOL_SCRIPT = """
import sys
import numpy as np
from seqserve.server import repository
from seqserve.server.repository import SessionOptions, load_model, shared_thread_pool

path = sys.argv[1]
ids = np.array([[2, 5, 3]], dtype=np.int64)
feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
options = SessionOptions(intra_op_threads=1)
assert options.ort_options().use_per_session_threads  # no shared pools yet: a pool of its own
own = load_model(path, options).sessions["model"].run(None, feeds)[0]
assert shared_thread_pool(2, 1) == (2, 1)
# From now on every session of the process uses the shared pools (onnxruntime refuses pools of their own).
assert not options.ort_options().use_per_session_threads
shared = load_model(path, options).sessions["model"].run(None, feeds)[0]
assert shared_thread_pool(1, 1) == (2, 1)  # the sizes are the process's: a second call cannot change them
np.testing.assert_array_equal(shared, own)
print("ok")
"""


def test_sessions_share_one_thread_pool_for_the_life_of_the_process(tmp_path):
    # In a subprocess: the shared pools bind the whole process, and this test process must keep per-session pools.
    path = _publish(tmp_path)
    done = subprocess.run([sys.executable, "-c", _SHARED_POOL_SCRIPT, str(path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "ok"
    assert "ignored" in done.stderr  # the second call's sizes are reported as ignored, not silently dropped


def test_cuda_provider_is_used_or_refused_clearly(tmp_path):
    """Three machines: no CUDA provider in onnxruntime (refused before any graph opens); onnxruntime-gpu whose CUDA
    provider does not start (CUDA libraries missing: onnxruntime itself would fall back to the CPU; refused, not
    served on the CPU; run by hand with onnxruntime-gpu 1.31.1 and no CUDA); a GPU (every session on CUDA)."""
    path = _publish(tmp_path)
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(ProviderUnavailable, match="CUDAExecutionProvider.*onnxruntime-gpu"):
            load_model(path, SessionOptions(provider="cuda"))
        return
    if not cuda_starts(path / "model.onnx"):  # this onnxruntime falls back to the CPU here
        with pytest.raises(ProviderFailed, match="lists CUDAExecutionProvider but did not start it.*--device cpu"):
            load_model(path, SessionOptions(provider="cuda"))
        return
    loaded = load_model(path, SessionOptions(provider="cuda", device_id=0))
    session = loaded.sessions["model"]
    assert session.get_providers()[0] == "CUDAExecutionProvider"
    assert session.get_provider_options()["CUDAExecutionProvider"]["device_id"] == "0"


def test_device_id_picks_the_gpu_and_belongs_to_cuda_only():
    assert SessionOptions(provider="cuda", device_id=1).provider_entries() == [
        ("CUDAExecutionProvider", {"device_id": "1"}), "CPUExecutionProvider"]
    assert SessionOptions(provider="cuda").provider_entries()[0] == ("CUDAExecutionProvider", {"device_id": "0"})
    assert SessionOptions().provider_entries() == ["CPUExecutionProvider"]
    for bad in ({"provider": "cpu", "device_id": 1}, {"provider": "cuda", "device_id": -1}):
        with pytest.raises(ValueError, match="device id -?1: a GPU.s number .*with device cuda"):
            SessionOptions(**bad)


def test_a_session_started_elsewhere_than_asked_is_refused():
    """onnxruntime retries a session it cannot start with fallback providers and says so only on standard output (the
    CPU: onnxruntime-gpu 1.31 asked for GPU 99 on a one-GPU H100). What a session reports is checked against what was
    asked, the GPU too: here on the providers and options a session reports, on a real GPU session in
    tests/test_cuda.py."""
    gpu, cpu = ["CUDAExecutionProvider", "CPUExecutionProvider"], ["CPUExecutionProvider"]
    cuda = {"CUDAExecutionProvider": {"device_id": "0", "arena_extend_strategy": "kNextPowerOfTwo"}}
    assert placement_error(SessionOptions(), "m.onnx", cpu, {"CPUExecutionProvider": {}}) is None
    assert placement_error(SessionOptions(provider="cuda"), "m.onnx", gpu, cuda) is None
    on_cpu = placement_error(SessionOptions(provider="cuda"), "m.onnx", cpu, {"CPUExecutionProvider": {}})
    assert isinstance(on_cpu, ProviderFailed) and "lists CUDAExecutionProvider but did not start it" in str(on_cpu)
    lacks = placement_error(SessionOptions(provider="cuda", device_id=99), "m.onnx", cpu, {"CPUExecutionProvider": {}})
    assert isinstance(lacks, ProviderFailed)
    assert re.search(r"m\.onnx: .*could not start CUDAExecutionProvider on GPU 99 \(the session runs on "
                     r"CPUExecutionProvider.*a GPU number this machine lacks.*give --device-id a GPU this machine has",
                     str(lacks)), str(lacks)  # fmt: skip
    elsewhere = placement_error(SessionOptions(provider="cuda", device_id=7), "m.onnx", gpu, cuda)
    assert isinstance(elsewhere, ProviderFailed)
    assert re.search(r"m\.onnx: .*started CUDAExecutionProvider on GPU 0, not on GPU 7 as asked.*"
                     r"give --device-id a GPU this machine has", str(elsewhere)), str(elsewhere)  # fmt: skip
    asked_one = {"CUDAExecutionProvider": {"device_id": "1"}}
    assert placement_error(SessionOptions(provider="cuda", device_id=1), "m.onnx", gpu, asked_one) is None


def test_loader_imports_no_torch():
    code = (
        "import sys, seqserve.server.repository, seqserve.export.writer; "
        "assert 'torch' not in sys.modules, 'torch imported'; assert 'onnx' not in sys.modules, 'onnx imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_published_version_is_readable_by_other_users(tmp_path):
    # A container serves the repository as another user than the one that built it.
    version_dir = _publish(tmp_path, "toy")
    assert version_dir.stat().st_mode & 0o777 == 0o755
