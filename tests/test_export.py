"""Translator export: encoder/decoder step graphs, the parity gate, the repository they land in, the command."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from seqserve.cli import main as seqserve_main
from seqserve.export import export_checkpoint
from seqserve.export.graphs import example_source
from seqserve.export.parity import ParityError, ParityReport, StepGraphs, greedy_decode_onnx, greedy_divergences
from seqserve.export.pipeline import ExportError
from seqserve.export.writer import VersionExists
from seqserve.models.checkpoint import load_checkpoint
from seqserve.models.decoding import greedy_decode
from seqserve.server.repository import ModelRepository, SessionOptions, load_model

from conftest import REPOSITORY_NAMES, TRANSLATOR_ARCHS, gpu_available, tiny_dev_pairs

torch.set_num_threads(1)


def _step_graphs(version_dir) -> tuple[StepGraphs, object]:
    loaded = load_model(version_dir)
    decoder = loaded.manifest.decoder
    graphs = StepGraphs(loaded.sessions["encoder"], loaded.sessions["decoder"], tuple(decoder["memory"]),
                        tuple(decoder["state"]))  # fmt: skip
    return graphs, loaded


def _source_batch(tokenizer, texts: list[str], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded source ids (B, S) and pad mask (B, S) of real texts."""
    rows = [tokenizer.encode(t).ids for t in texts]
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
    return ids, np.arange(width)[None, :] >= np.array([len(r) for r in rows])[:, None]


def _fill(shape, sizes: dict[str, int]) -> tuple[int, ...]:
    return tuple(sizes[d] if isinstance(d, str) else d for d in shape)


@pytest.mark.parametrize("arch", TRANSLATOR_ARCHS)
def test_translator_export_records_parity_within_tolerance(tiny_repository, arch):
    manifest = ModelRepository(tiny_repository).manifest(REPOSITORY_NAMES[arch])
    assert manifest.parity["max_abs_diff"] <= manifest.parity["tolerance"] == 1e-4
    assert manifest.parity["greedy_tokens_equal"] is True
    assert any(batch > 1 for batch, _ in manifest.parity["cases"])
    assert manifest.architecture == arch and manifest.task == "translation"


@pytest.mark.parametrize("arch", TRANSLATOR_ARCHS)
def test_greedy_decode_through_step_graph_equals_torch(tiny_repository, tiny_checkpoints, arch):
    graphs, loaded = _step_graphs(ModelRepository(tiny_repository).version_dir(REPOSITORY_NAMES[arch]))
    model = load_checkpoint(tiny_checkpoints[arch]).model
    special = loaded.manifest.special_tokens
    texts = [s for s, _ in tiny_dev_pairs()[:6]]
    ids, pad_mask = _source_batch(loaded.tokenizers["source"], texts, special["pad"])
    assert len(set((~pad_mask).sum(1).tolist())) > 1  # unequal source lengths
    ours = greedy_decode_onnx(graphs, ids, pad_mask, 20, special["decoder_start"], special["eos"], special["pad"])
    reference = greedy_decode(model, torch.from_numpy(ids), torch.from_numpy(pad_mask), 20, special["decoder_start"],
                              special["eos"], special["pad"]).numpy()  # fmt: skip
    np.testing.assert_array_equal(ours, reference)
    assert (ours == special["eos"]).any(axis=1).all()  # every row finished: the model translates, not babbles


@pytest.mark.parametrize("arch", TRANSLATOR_ARCHS)
def test_step_graphs_run_at_batch_sizes_and_lengths_other_than_the_example(tiny_repository, arch):
    graphs, loaded = _step_graphs(ModelRepository(tiny_repository).version_dir(REPOSITORY_NAMES[arch]))
    specs = loaded.manifest.graphs
    for batch, length in ((1, 1), (5, 19)):
        ids = np.random.default_rng(batch).integers(4, 12, (batch, length)).astype(np.int64)
        pad_mask = np.zeros((batch, length), dtype=bool)
        pad_mask[-1, length // 2 + 1 :] = True
        memory, state = graphs.encode(ids, pad_mask)
        for steps in range(3):
            sizes = {"batch": batch, "src_len": length, "cache_len": steps, "new_cache_len": steps + 1}
            carried = [spec for spec in specs["decoder"].inputs if spec.name in (*graphs.memory, *graphs.state)]
            for spec, value in zip(carried, (*memory, *state), strict=True):
                assert value.shape == _fill(spec.shape, sizes), spec.name
            log_probs, state = graphs.step(np.full(batch, 5, np.int64), memory, pad_mask, state)
            for spec, value in zip(specs["decoder"].outputs, (log_probs, *state)):
                assert value.shape == _fill(spec.shape, sizes), spec.name
            np.testing.assert_allclose(np.exp(log_probs).sum(-1), 1.0, atol=1e-4)


@pytest.mark.parametrize("arch", TRANSLATOR_ARCHS)
def test_beam_search_can_reorder_state_by_index(tiny_repository, arch):
    graphs, loaded = _step_graphs(ModelRepository(tiny_repository).version_dir(REPOSITORY_NAMES[arch]))
    texts = ["a b c d", "h g", "c c a b e f"]
    ids, pad_mask = _source_batch(loaded.tokenizers["source"], texts, loaded.manifest.special_tokens["pad"])
    memory, state = graphs.encode(ids, pad_mask)
    _, state = graphs.step(np.array([5, 6, 7], np.int64), memory, pad_mask, state)
    prev = np.array([8, 9, 10], np.int64)
    log_probs, new_state = graphs.step(prev, memory, pad_mask, state)
    index = np.array([2, 0, 0, 1])  # beams may be dropped, duplicated and moved
    re_log_probs, re_state = graphs.step(prev[index], [m[index] for m in memory], pad_mask[index],
                                         [s[index] for s in state])  # fmt: skip
    np.testing.assert_allclose(re_log_probs, log_probs[index], atol=1e-5)
    for reordered, original in zip(re_state, new_state):
        np.testing.assert_allclose(reordered, original[index], atol=1e-5)


@pytest.mark.parametrize("arch", TRANSLATOR_ARCHS)
def test_translator_manifest_names_what_the_server_needs(tiny_repository, tiny_checkpoints, arch):
    manifest = ModelRepository(tiny_repository).manifest(REPOSITORY_NAMES[arch])
    model = load_checkpoint(tiny_checkpoints[arch]).model
    assert manifest.decoder == {"memory": list(model.memory_names()), "state": list(model.state_names())}
    assert manifest.graphs["encoder"].input_names == ["src_ids", "src_pad_mask"]
    assert manifest.graphs["encoder"].output_names == [*model.memory_names(), *model.state_names()]
    cache_mask = ["cache_pad_mask"] if arch == "transformer" else []  # Transformer sentences join running batches
    assert manifest.graphs["decoder"].input_names == [
        "prev_ids", "src_pad_mask", *cache_mask, *model.memory_names(), *model.state_names(), "topk"
    ]  # fmt: skip
    assert manifest.graphs["decoder"].output_names == [
        "log_probs", *(f"new_{n}" for n in model.state_names()), "topk_log_probs", "topk_ids"
    ]  # fmt: skip
    assert manifest.special_tokens == {"pad": 0, "bos": 1, "eos": 2, "unk": 3, "decoder_start": 1}
    assert manifest.limits == {"max_source_tokens": model.config.max_src_len,
                               "max_target_tokens": model.config.max_tgt_len}  # fmt: skip
    assert manifest.tokenizers == {"source": "source_tokenizer.json", "target": "target_tokenizer.json"}
    assert manifest.metrics["dev_bleu"] == json.loads((tiny_checkpoints[arch] / "metrics.json").read_text())["dev_bleu"]


def test_export_over_tolerance_fails_naming_the_option(tiny_checkpoints, tmp_path):
    with pytest.raises(ParityError, match="--tolerance") as info:
        export_checkpoint(tiny_checkpoints["lstm"], tmp_path, "strict", tolerance=1e-12)
    assert info.value.max_abs_diff > 1e-12
    assert ModelRepository(tmp_path).models() == {}  # nothing half-written is visible


def test_parity_tolerance_can_have_a_relative_part_as_fp16_needs():
    reference = np.array([-0.01, -4.0, -12.0])
    ours = reference + np.array([0.01, 0.05, 0.12])  # fp16-sized errors: larger for larger magnitudes
    absolute = ParityReport(2e-2)
    absolute.record("log_probs", ours, reference)
    with pytest.raises(ParityError, match=r"by 0\.12, over the tolerance 0\.02 \("):
        absolute.check("decoder.onnx")
    relative = ParityReport(2e-2, rtol=1e-2)
    relative.record("log_probs", ours, reference)
    relative.check("decoder.onnx")  # 0.05 <= 0.02 + 0.04, 0.12 <= 0.02 + 0.12
    assert relative.to_dict()["rtol"] == 1e-2 and relative.max_abs_diff == pytest.approx(0.12)
    relative.record("state", np.array([0.5]), np.array([0.0]))  # a zero reference leaves only the absolute part
    with pytest.raises(ParityError, match=r"0\.5, over the tolerance 0\.02 \+ 0\.01 x .*worst output: state"):
        relative.check("decoder.onnx")
    nan = ParityReport(2e-2, rtol=1e-2)
    nan.record("log_probs", np.array([np.nan]), np.array([-1.0]))
    with pytest.raises(ParityError, match="NaN"):
        nan.check("decoder.onnx")


@pytest.mark.parametrize("arch", ["gru", "transformer"])
def test_greedy_divergence_is_measured_by_torchs_own_margin(tiny_checkpoints, arch):
    """The greedy gate lets tokens differ only at a near-tie: greedy_divergences gives torch's margin there."""
    model = load_checkpoint(tiny_checkpoints[arch]).model.eval()
    config = model.config
    src_ids, pad_mask = example_source(3, 7, model.config.src_vocab_size, seed=5, pad_id=config.pad_id)
    reference = greedy_decode(model, src_ids, pad_mask, 12, config.bos_id, config.eos_id, config.pad_id).numpy()
    assert greedy_divergences(model, src_ids, pad_mask, reference, reference.copy(), config.bos_id, config.pad_id) == []
    with torch.no_grad():  # torch's log-probabilities at row 1's third step, given its first two tokens
        memory, state = model.encode(src_ids[1:2], pad_mask[1:2])
        for token in [config.bos_id, *reference[1, :2].tolist()]:
            log_probs, state = model.decode_step(torch.tensor([token]), memory, pad_mask[1:2], state)
    runner_up = int(torch.topk(log_probs[0], 2).indices[1])
    ours = reference.copy()
    ours[1, 2:] = config.pad_id
    ours[1, 2] = runner_up  # a decode that took the second-best token there and stopped
    [(row, step, best, margin)] = greedy_divergences(model, src_ids, pad_mask, reference, ours, config.bos_id,
                                                     config.pad_id)  # fmt: skip
    assert (row, step) == (1, 2) and best == pytest.approx(float(log_probs[0].max()), abs=1e-5)
    assert margin == pytest.approx(float(log_probs[0].max() - log_probs[0, runner_up]), abs=1e-5) and margin > 0


def test_export_refuses_an_existing_version_without_force(tiny_checkpoints, tiny_repository):
    with pytest.raises(VersionExists, match="--force"):
        export_checkpoint(tiny_checkpoints["gru"], tiny_repository, "tiny-gru", version=1)


def test_export_command_writes_the_next_version(tiny_checkpoints, tmp_path, capsys):
    args = ["export", str(tiny_checkpoints["gru"]), "--repository", str(tmp_path), "--name", "gru", "--log-level",
            "WARNING"]  # fmt: skip
    assert seqserve_main(args) == 0
    assert seqserve_main(args) == 0
    assert ModelRepository(tmp_path).models() == {"gru": [1, 2]}
    assert capsys.readouterr().out.split() == [str(tmp_path / "gru" / "1"), str(tmp_path / "gru" / "2")]
    assert seqserve_main([*args, "--version", "2"]) == 1  # exists, no --force


def test_int8_translator_export_needs_a_dev_sample(tiny_checkpoints, tmp_path):
    with pytest.raises(ExportError, match="--dev"):
        export_checkpoint(tiny_checkpoints["lstm"], tmp_path, "q", quantize="int8")


def test_cuda_export_runs_on_a_gpu_or_is_refused_clearly(tiny_checkpoints, tmp_path):
    if gpu_available():
        path = export_checkpoint(tiny_checkpoints["transformer"], tmp_path, "gpu", device="cuda")
        assert json.loads((path / "manifest.json").read_text())["precision"] == "fp16"
    else:
        with pytest.raises(ExportError, match="--device cuda needs a GPU"):
            export_checkpoint(tiny_checkpoints["transformer"], tmp_path, "gpu", device="cuda")


def test_export_command_quantizes_with_a_dev_file(tiny_checkpoints, tmp_path):
    dev = tmp_path / "dev.tsv"
    dev.write_text("".join(f"{s}\t{t}\n" for s, t in tiny_dev_pairs()[:40]), encoding="utf-8")
    repo = tmp_path / "repo"
    args = ["export", str(tiny_checkpoints["gru"]), "-r", str(repo), "-n", "gru8", "--quantize", "int8", "--dev",
            str(dev), "--log-level", "WARNING"]  # fmt: skip
    assert seqserve_main(args) == 0
    manifest = ModelRepository(repo).manifest("gru8")
    assert manifest.quantization == "int8" and manifest.quality["dev_sentences"] == 40


def test_export_command_reports_a_missing_checkpoint(tmp_path, caplog):
    assert seqserve_main(["export", str(tmp_path / "nothing"), "-r", str(tmp_path), "-n", "x"]) == 1
    assert "config.json is missing" in caplog.text


@pytest.mark.parametrize("arch", TRANSLATOR_ARCHS)
def test_decoder_step_graph_has_the_fused_nodes_and_ends_in_top_k(tiny_repository, tiny_checkpoints, arch):
    import onnx

    version_dir = ModelRepository(tiny_repository).version_dir(REPOSITORY_NAMES[arch])
    ops = [node.op_type for node in onnx.load(str(version_dir / "decoder.onnx")).graph.node]
    config = load_checkpoint(tiny_checkpoints[arch]).model.config
    if arch == "transformer":
        # Self- and cross-attention of every layer, each one onnxruntime MultiHeadAttention node, no Softmax left.
        assert ops.count("MultiHeadAttention") == 2 * config.n_decoder_layers and "Softmax" not in ops
    else:
        cell = "GRU" if arch == "gru" else "LSTM"
        assert ops.count(cell) == config.num_layers  # one ONNX node a decoder cell, not its written-out gates
        assert "Sigmoid" not in ops
    assert ops[-1] == "TopK" and ops.count("TopK") == 1


def _op_types(path: Path) -> list[str]:
    import onnx

    return [node.op_type for node in onnx.load(str(path)).graph.node]


@pytest.mark.parametrize("name, graph", [("tiny-bert", "model.onnx"), ("tiny-transformer", "encoder.onnx")])
def test_encoders_keep_add_and_layer_norm_on_cpu(tiny_repository, tmp_path, name, graph):
    """onnxruntime's CPU SkipLayerNormalization is slower than Add + LayerNormalization (export/quantize.py
    optimize_graph): the export leaves encoders unfused and CPU sessions do not fuse them back."""
    path = ModelRepository(tiny_repository).version_dir(name) / graph
    ops = _op_types(path)
    layer_norms = ops.count("LayerNormalization")
    assert "SkipLayerNormalization" not in ops and layer_norms >= 2  # two a layer (a BERT's embeddings have their own)
    options = SessionOptions()
    options.open(path, optimized_model_filepath=tmp_path / "served.onnx")  # as load_model opens every graph
    served = _op_types(tmp_path / "served.onnx")
    assert "SkipLayerNormalization" not in served and served.count("LayerNormalization") == layer_norms
    if name == "tiny-bert":  # post-norm: left to itself onnxruntime fuses them back; the disabled optimizer stops it
        so = options.ort_options()
        so.optimized_model_filepath = str(tmp_path / "fused.onnx")
        ort.InferenceSession(str(path), sess_options=so, providers=options.providers())
        assert "SkipLayerNormalization" in _op_types(tmp_path / "fused.onnx")
    assert SessionOptions(provider="cuda").disabled_optimizers() == []


def test_transformer_decoder_step_keeps_skip_layer_norm(tiny_repository):
    version_dir = ModelRepository(tiny_repository).version_dir("tiny-transformer")
    # One position a row: the fused node costs no more than the three it replaces.
    assert "SkipLayerNormalization" in _op_types(version_dir / "decoder.onnx")


@pytest.mark.parametrize("arch", TRANSLATOR_ARCHS)
def test_rnn_exports_carry_a_greedy_loop_checked_against_the_step_graph(tiny_repository, tiny_checkpoints, arch,
                                                                        tmp_path):
    repo = ModelRepository(tiny_repository)
    manifest = repo.manifest(REPOSITORY_NAMES[arch])
    if arch == "transformer":  # caches that grow a step: the step graph only
        assert "greedy" not in manifest.graphs
        assert not (repo.version_dir(REPOSITORY_NAMES[arch]) / "greedy.onnx").exists()
        return
    loop = manifest.graphs["greedy"]
    assert [i.name for i in loop.inputs] == [*(i.name for i in manifest.graphs["decoder"].inputs if i.name != "topk"),
                                             "max_steps"]  # fmt: skip
    assert [o.name for o in loop.outputs] == ["greedy_ids", "greedy_log_probs"]
    record = manifest.raw["greedy_loop_parity"]
    assert record["greedy_tokens_equal"] is True and record["max_abs_diff"] <= record["tolerance"]
    assert any(batch > 1 for batch, _ in record["cases"])
    assert _op_types(repo.version_dir(REPOSITORY_NAMES[arch]) / "greedy.onnx").count("Loop") == 1
    assert not _loop_body_transposes(repo.version_dir(REPOSITORY_NAMES[arch]) / "greedy.onnx", tmp_path)
    # Greedy tokens through the loop equal torch's greedy decode (the step graph's equal torch's: parity above).
    graphs, loaded = _step_graphs(repo.version_dir(REPOSITORY_NAMES[arch]))
    model = load_checkpoint(tiny_checkpoints[arch]).model.eval()
    config = model.config
    ids, mask = _source_batch(loaded.tokenizers["source"], ["a b c", "h g f e d c b a", "c a"], config.pad_id)
    memory, state = graphs.encode(ids, mask)
    feeds = {"prev_ids": np.full((3,), config.bos_id, dtype=np.int64), "src_pad_mask": mask,
             "max_steps": np.array(16, dtype=np.int64), **dict(zip(graphs.memory, memory)),
             **dict(zip(graphs.state, state))}  # fmt: skip
    got, log_probs = loaded.sessions["greedy"].run(None, feeds)
    with torch.no_grad():
        expected = greedy_decode(model, torch.from_numpy(ids), torch.from_numpy(mask), 16, config.bos_id,
                                 config.eos_id, config.pad_id).numpy()  # fmt: skip
    assert got.tolist() == expected.tolist()
    assert log_probs.shape == got.shape and (log_probs <= 0).all()


def _loop_body_transposes(path: Path, tmp_path: Path) -> list[str]:
    """The Transpose nodes left in greedy.onnx's loop body once a server session has optimised it: the loop carries
    (layers, batch, hidden) state, so the step graph's own transposes to and from that layout cancel."""
    import onnx

    SessionOptions().open(path, optimized_model_filepath=tmp_path / "optimized.onnx")
    [loop] = [n for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node if n.op_type == "Loop"]
    body = next(a.g for a in loop.attribute if a.name == "body")
    return [n.name for n in body.node if n.op_type == "Transpose"]


def test_the_greedy_loop_gate_fails_a_loop_that_decodes_differently(tiny_repository, tmp_path):
    """A loop built with the wrong end token runs past EOS where the step graph stops: the gate names the graph."""
    from seqserve.export.graphs import add_greedy_loop
    from seqserve.export.parity import greedy_loop_parity, open_session

    version_dir = ModelRepository(tiny_repository).version_dir("tiny-gru")
    graphs, loaded = _step_graphs(version_dir)
    special = loaded.manifest.special_tokens
    wrong = add_greedy_loop(version_dir / "decoder.onnx", loaded.manifest.graphs["decoder"], graphs.state,
                            eos_id=special["pad"], pad_id=special["pad"], path=tmp_path / "greedy.onnx")  # fmt: skip
    vocab = loaded.manifest.raw["config"]["config"]["src_vocab_size"]
    with pytest.raises(ParityError, match="greedy.onnx"):
        greedy_loop_parity(open_session(wrong.path), graphs, special["bos"], special["eos"], special["pad"],
                           vocab)  # fmt: skip
    right = add_greedy_loop(version_dir / "decoder.onnx", loaded.manifest.graphs["decoder"], graphs.state,
                            eos_id=special["eos"], pad_id=special["pad"], path=tmp_path / "right.onnx")  # fmt: skip
    report = greedy_loop_parity(open_session(right.path), graphs, special["bos"], special["eos"], special["pad"], vocab)
    assert report.greedy_tokens_equal and report.max_abs_diff <= report.tolerance


@pytest.mark.parametrize("arch", ["transformer", "lstm"])
def test_fp16_conversion_keeps_float32_only_where_asked_and_the_spec_follows(tiny_repository, tmp_path, arch):
    """The CUDA export's float16 boundary (pipeline._to_fp16, run here on the CPU): state and memory become float16
    in the file and in the manifest's spec, the named log-probabilities stay float32, and the graphs still decode
    (onnxruntime's CPU runs the float16 graph) to what the float32 pair gives."""
    import shutil

    from seqserve.export.graphs import ExportedGraph
    from seqserve.export.pipeline import _to_fp16
    from seqserve.server.repository import DECODER_TOP_K_OUTPUTS

    version = ModelRepository(tiny_repository).version_dir(REPOSITORY_NAMES[arch])
    manifest = ModelRepository(tiny_repository).manifest(REPOSITORY_NAMES[arch])
    memory, state = manifest.decoder["memory"], manifest.decoder["state"]
    converted = {}
    for graph, keep in (("encoder", False), ("decoder", ["log_probs", DECODER_TOP_K_OUTPUTS[0]])):
        shutil.copy(version / f"{graph}.onnx", tmp_path / f"{graph}.onnx")
        spec = manifest.graphs[graph]
        converted[graph] = _to_fp16(ExportedGraph(spec, tmp_path / f"{graph}.onnx"), keep_io_types=keep)
        dtypes = {t.name: t.dtype for t in (*converted[graph].spec.inputs, *converted[graph].spec.outputs)}
        session = ort.InferenceSession(str(tmp_path / f"{graph}.onnx"), providers=["CPUExecutionProvider"])
        in_file = {v.name: v.type for v in (*session.get_inputs(), *session.get_outputs())}
        onnx_type = {"float16": "tensor(float16)", "float32": "tensor(float)", "int64": "tensor(int64)",
                     "bool": "tensor(bool)"}  # fmt: skip
        assert {n: in_file[n] for n in dtypes} == {n: onnx_type[d] for n, d in dtypes.items()}  # the spec is the file's
        carried = [n for n in dtypes if n in memory or n in state or n.removeprefix("new_") in state]
        assert carried and {dtypes[n] for n in carried} == {"float16"}, dtypes
        if graph == "decoder":
            assert dtypes["log_probs"] == dtypes[DECODER_TOP_K_OUTPUTS[0]] == "float32"
            assert dtypes["prev_ids"] == "int64" and dtypes["src_pad_mask"] == "bool"
    fp32 = StepGraphs(*(ort.InferenceSession(str(version / f"{g}.onnx")) for g in ("encoder", "decoder")),
                      tuple(memory), tuple(state))  # fmt: skip
    fp16 = StepGraphs(*(ort.InferenceSession(str(tmp_path / f"{g}.onnx")) for g in ("encoder", "decoder")),
                      tuple(memory), tuple(state))  # fmt: skip
    src_ids, pad_mask = (t.numpy() for t in example_source(3, 7, 12, seed=5))
    ours = greedy_decode_onnx(fp16, src_ids, pad_mask, 10, manifest.special_tokens["decoder_start"],
                              manifest.special_tokens["eos"], manifest.special_tokens["pad"])  # fmt: skip
    reference = greedy_decode_onnx(fp32, src_ids, pad_mask, 10, manifest.special_tokens["decoder_start"],
                                   manifest.special_tokens["eos"], manifest.special_tokens["pad"])  # fmt: skip
    assert ours.shape == reference.shape and (ours == reference).mean() >= 0.9


def test_the_row_gather_gate_fails_a_graph_that_gathers_wrong(tiny_repository, tmp_path):
    """row_gather_check passes the exported gather graphs and names the tensor of one that does not gather as numpy's
    take does (here: two same-shaped caches' outputs swapped)."""
    import onnx

    from seqserve.export.parity import row_gather_check

    repo = ModelRepository(tiny_repository)
    version, manifest = repo.version_dir("tiny-transformer"), repo.manifest("tiny-transformer")
    graphs = StepGraphs(ort.InferenceSession(str(version / "encoder.onnx")),
                        ort.InferenceSession(str(version / "decoder.onnx")),
                        tuple(manifest.decoder["memory"]), tuple(manifest.decoder["state"]))  # fmt: skip
    gathers = {group: ort.InferenceSession(str(version / f"gather_{group}.onnx")) for group in ("memory", "state")}
    args = (graphs, manifest.special_tokens["decoder_start"],
            manifest.config["config"]["src_vocab_size"], manifest.special_tokens["pad"])  # fmt: skip
    assert row_gather_check(gathers, *args)["equal"]
    wrong = onnx.load(str(version / "gather_state.onnx"))
    first, second = wrong.graph.node[0], wrong.graph.node[1]
    first.output[0], second.output[0] = second.output[0], first.output[0]
    onnx.save(wrong, str(tmp_path / "gather_state.onnx"))
    gathers["state"] = ort.InferenceSession(str(tmp_path / "gather_state.onnx"))
    with pytest.raises(ParityError, match=r"gather_state.onnx: gathered_self_\w+ for rows \[2, 0, 0, 1, 2\] differs"):
        row_gather_check(gathers, *args)

