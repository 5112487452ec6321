"""`seqserve batch translate`: in-process translation of a file, locally and on a local Ray cluster, with resume.

The Ray test needs the `ray` extra; without it the test fails saying so (CI installs `.[train,dev,ray]`).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from seqserve.cli import main
from seqserve.server.batch import (
    BatchError,
    BatchJob,
    BlockTranslator,
    OutputLongerThanInput,
    complete_lines,
    count_lines,
    read_blocks,
    translate_file,
)

from conftest import tiny_dev_pairs

MODEL = "tiny-lstm"


@pytest.fixture(scope="module")
def source_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Dev sentences of the tiny translators, with an empty line among them (it must stay empty and in place)."""
    lines = [src for src, _ in tiny_dev_pairs()[:30]]
    lines.insert(7, "")
    path = tmp_path_factory.mktemp("batch") / "in.txt"
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def local_output(tiny_repository: Path, source_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The single-process run, through the `seqserve` command."""
    out = tmp_path_factory.mktemp("local") / "out.txt"
    argv = ["batch", "translate", str(source_file), str(out), "--repository", str(tiny_repository),
            "--model", MODEL, "--engine", "local", "--block-lines", "8", "--batch-size", "4"]  # fmt: skip
    assert main(argv) == 0
    return out


def test_local_run_writes_one_translation_per_input_line_in_order(
    tiny_repository: Path, source_file: Path, local_output: Path
):
    sources = source_file.read_text(encoding="utf-8").splitlines()
    outputs = local_output.read_text(encoding="utf-8").splitlines()
    assert len(outputs) == len(sources) == 31
    assert outputs[7] == ""  # the empty input line
    # Each line equals the translation of that sentence alone: the batching changed nothing and nothing moved.
    worker = BlockTranslator(BatchJob(tiny_repository, MODEL))
    for i in (0, 6, 8, 30):
        assert worker.translate([sources[i]]) == [outputs[i]]
    # The tiny translators reverse letter sequences; most dev sentences come out exactly reversed.
    reversed_ok = sum(o == " ".join(reversed(s.split())) for s, o in zip(sources, outputs) if s)
    assert reversed_ok >= 10


def test_resume_keeps_complete_lines_and_cuts_a_half_written_one(
    tiny_repository: Path, source_file: Path, local_output: Path, tmp_path: Path
):
    full = local_output.read_text(encoding="utf-8")
    kept = full.splitlines(keepends=True)[:13]
    out = tmp_path / "out.txt"
    # 13 complete lines (one of them not a real translation, to prove they are kept, not redone) + half a line.
    kept[3] = "KEPT AS IT WAS\n"
    out.write_text("".join(kept) + "half a transl", encoding="utf-8")
    result = translate_file(BatchJob(tiny_repository, MODEL, block_lines=8, batch_size=4), source_file, out)
    assert (result.resumed_from, result.translated, result.lines) == (13, 18, 31)
    expected = full.splitlines(keepends=True)
    expected[3] = "KEPT AS IT WAS\n"
    assert out.read_text(encoding="utf-8") == "".join(expected)


def test_output_longer_than_input_is_refused(tiny_repository: Path, source_file: Path, tmp_path: Path):
    out = tmp_path / "out.txt"
    out.write_text("x\n" * 40, encoding="utf-8")
    with pytest.raises(OutputLongerThanInput) as caught:
        translate_file(BatchJob(tiny_repository, MODEL), source_file, out)
    assert (caught.value.out_lines, caught.value.in_lines) == (40, 31)


def test_ray_engine_on_a_local_cluster_equals_the_local_run(
    tiny_repository: Path, source_file: Path, local_output: Path, tmp_path: Path
):
    try:
        import ray
    except ImportError as error:  # a clear failure, not a skip: CI must install the `ray` extra
        pytest.fail(f"ray is not installed ({error}); install seqserve's `ray` extra: pip install -e '.[ray]'")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        out = tmp_path / "out.txt"
        # A resumed run: the first 5 lines are there already, the rest goes through 2 actors in blocks of 8 lines.
        out.write_text("".join(local_output.read_text(encoding="utf-8").splitlines(keepends=True)[:5]))
        argv = ["batch", "translate", str(source_file), str(out), "--repository", str(tiny_repository),
                "--model", MODEL, "--engine", "ray", "--workers", "2",
                "--block-lines", "8", "--batch-size", "4"]  # fmt: skip
        assert main(argv) == 0
        assert out.read_bytes() == local_output.read_bytes()
    finally:
        ray.shutdown()


def test_blocks_after_a_resume_start_at_the_resume_line(source_file: Path):
    # Both engines consume these blocks, so both decode the same batches.
    starts = [b.start for b in read_blocks(source_file, 5, 8)]
    sizes = [len(b.lines) for b in read_blocks(source_file, 5, 8)]
    assert starts == [5, 13, 21, 29] and sizes == [8, 8, 8, 2]


@pytest.mark.parametrize(
    "content, lines, resume, kept",
    [(b"", 0, 0, b""), (b"a\n", 1, 1, b"a\n"), (b"a\nb", 2, 1, b"a\n"), (b"abc", 1, 0, b""),
     (b"a\n\n" + b"y" * 200_000, 3, 2, b"a\n\n")],
)  # fmt: skip
def test_complete_lines_counts_whole_lines_and_cuts_the_rest(
    tmp_path: Path, content: bytes, lines: int, resume: int, kept: bytes
):
    path = tmp_path / "out.txt"
    path.write_bytes(content)
    assert count_lines(path) == lines
    assert complete_lines(path) == resume
    assert path.read_bytes() == kept


def test_a_bert_model_is_refused_and_bad_options_are_named(tiny_repository: Path):
    with pytest.raises(BatchError, match="tiny-bert is a 'bert' model"):
        BlockTranslator(BatchJob(tiny_repository, "tiny-bert"))
    with pytest.raises(BatchError, match="batch size 0"):
        BatchJob(tiny_repository, MODEL, batch_size=0)
    for device, device_id in (("cpu", 1), ("cuda", -1)):
        with pytest.raises(BatchError, match=f"device id {device_id}: a GPU's number .*with device cuda"):
            BatchJob(tiny_repository, MODEL, device=device, device_id=device_id)
