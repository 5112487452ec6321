"""Server speed-ups keep the reference outputs: the split masked-LM head (mlm.onnx) and beam top-k preselection."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest

from seqserve.protos.v1 import seqserve_pb2 as pb
from seqserve.protos.v1 import seqserve_pb2_grpc as pb_grpc
from seqserve.server.bert import BertJob, BertModel
from seqserve.server.config import BatchingConfig, ServerConfig
from seqserve.server.repository import ModelRepository, load_model
from seqserve.server.testing import ServerThread
from seqserve.server.text import Encoded

TEXTS = ["forest [MASK] foru [MASK] fori", "forest six [MASK]", "[MASK] seven", "fora foru [MASK] fore five"]
PAIRS = [("forest five", "foru fore"), ("forest seven", "fora")]


@pytest.fixture(scope="module")
def split_root(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoints: dict[str, Path]) -> Path:
    """One BERT checkpoint exported twice: with the MLM head inside model.onnx, and split into mlm.onnx."""
    import torch

    from seqserve.export import export_checkpoint

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("split_repository")
    export_checkpoint(tiny_checkpoints["bert"], root, "bert-whole", version=1, split_mlm=False)
    export_checkpoint(tiny_checkpoints["bert"], root, "bert-split", version=1, split_mlm=True)
    return root


@pytest.fixture(scope="module")
def inference(split_root: Path):
    config = ServerConfig(port=0, metrics_port=None, instances=1, threads=1,
                          batching=BatchingConfig(max_queue_delay_ms=5.0))  # fmt: skip
    with ServerThread(config, ModelRepository(split_root)) as server:
        with grpc.insecure_channel(server.address) as channel:
            yield pb_grpc.InferenceStub(channel)


def _array(t: pb.Tensor) -> np.ndarray:
    return np.frombuffer(t.data, dtype=t.dtype).reshape(tuple(t.shape))


def _spec(name: str) -> pb.ModelSpec:
    return pb.ModelSpec(name=name)


def test_split_export_has_no_mlm_logits_in_model_graph(split_root: Path) -> None:
    loaded = load_model(split_root / "bert-split" / "1")
    assert set(loaded.sessions) == {"model", "mlm"}
    assert "mlm_logits" not in {o.name for o in loaded.sessions["model"].get_outputs()}
    assert "fill_mask" in BertModel(loaded).capabilities()


def test_fill_mask_over_grpc_matches_between_split_and_whole_head(inference) -> None:
    whole = inference.FillMask(pb.FillMaskRequest(model=_spec("bert-whole"), texts=TEXTS, top_k=4))
    split = inference.FillMask(pb.FillMaskRequest(model=_spec("bert-split"), texts=TEXTS, top_k=4))
    assert len(split.results) == len(TEXTS)
    for a, b in zip(whole.results, split.results):
        assert len(a.masks) == len(b.masks) > 0
        for mask_a, mask_b in zip(a.masks, b.masks):
            assert [c.token_id for c in mask_a.candidates] == [c.token_id for c in mask_b.candidates]
            got = [c.probability for c in mask_b.candidates]
            assert got == pytest.approx([c.probability for c in mask_a.candidates], abs=1e-5)


def test_encode_and_nsp_over_grpc_match_between_split_and_whole_head(inference) -> None:
    texts = [t.replace("[MASK]", "fore") for t in TEXTS]
    whole = inference.Encode(pb.EncodeRequest(model=_spec("bert-whole"), texts=texts))
    split = inference.Encode(pb.EncodeRequest(model=_spec("bert-split"), texts=texts))
    assert list(split.embeddings.shape) == list(whole.embeddings.shape) and split.embeddings.shape[0] == len(texts)
    np.testing.assert_allclose(_array(split.embeddings), _array(whole.embeddings), atol=1e-5)
    pairs = [pb.TextPair(first=a, second=b) for a, b in PAIRS]
    nsp_whole = inference.ScoreNextSentence(pb.ScoreNextSentenceRequest(model=_spec("bert-whole"), pairs=pairs))
    nsp_split = inference.ScoreNextSentence(pb.ScoreNextSentenceRequest(model=_spec("bert-split"), pairs=pairs))
    assert list(nsp_split.is_next_probability) == pytest.approx(list(nsp_whole.is_next_probability), abs=1e-5)


def _job(loaded, text: str, kind: str) -> BertJob:
    enc = loaded.tokenizers["text"].encode(text)
    return BertJob(kind=kind, encoded=Encoded(list(enc.ids), list(enc.type_ids)), top_k=3)


def test_split_head_runs_fill_mask_rows_of_a_mixed_batch_as_if_alone(split_root: Path) -> None:
    loaded = load_model(split_root / "bert-split" / "1")
    model = BertModel(loaded)
    kinds = ["encode", "fill_mask", "encode", "fill_mask"]
    mixed = [_job(loaded, text, kind) for text, kind in zip(TEXTS, kinds)]
    model.run_batch(mixed)
    for text, job in zip(TEXTS, mixed):
        if job.kind != "fill_mask":
            continue
        alone = _job(loaded, text, "fill_mask")
        model.run_batch([alone])
        assert [[t for t, _ in m] for m in job.result] == [[t for t, _ in m] for m in alone.result]
        for m_job, m_alone in zip(job.result, alone.result):
            assert [p for _, p in m_job] == pytest.approx([p for _, p in m_alone], abs=1e-5)


def test_no_cpu_mem_arena_flag_reaches_the_onnxruntime_session_options() -> None:
    import argparse

    from seqserve.server import cli as server_cli
    from seqserve.server.app import session_options

    parser = argparse.ArgumentParser()
    server_cli.add_arguments(parser)
    default = server_cli.config_from_args(parser.parse_args(["--repository", "r"]))
    lean = server_cli.config_from_args(parser.parse_args(["--repository", "r", "--no-cpu-mem-arena"]))
    assert session_options(default).ort_options().enable_cpu_mem_arena is True
    assert session_options(lean).ort_options().enable_cpu_mem_arena is False


def test_serve_shares_one_thread_pool_and_starts_an_idle_model_at_once_unless_told_otherwise() -> None:
    import argparse

    from seqserve.server import cli as server_cli

    parser = argparse.ArgumentParser()
    server_cli.add_arguments(parser)
    default = server_cli.config_from_args(parser.parse_args(["--repository", "r"]))
    other = server_cli.config_from_args(
        parser.parse_args(["--repository", "r", "--per-session-threads", "--always-wait"])
    )
    assert default.shared_threads and default.batching.dispatch_when_idle
    assert not other.shared_threads and not other.batching.dispatch_when_idle


def test_the_shared_pool_gives_concurrent_runs_their_threads_and_no_more() -> None:
    from seqserve.server.app import shared_pool_size

    # A pool of size n runs n - 1 threads of its own plus each caller: instances callers + pool threads = cores.
    for instances, threads in ((1, 2), (2, 2), (2, 1), (4, 3)):
        assert instances + shared_pool_size(instances, threads) - 1 == instances * threads
    assert shared_pool_size(1, 2) == 2 and shared_pool_size(2, 1) == 1


def test_model_served_without_the_arena_gives_the_same_fill_mask(split_root: Path) -> None:
    from seqserve.server.repository import SessionOptions

    with_arena = BertModel(load_model(split_root / "bert-split" / "1"))
    loaded = load_model(split_root / "bert-split" / "1", SessionOptions(cpu_mem_arena=False))
    without = BertModel(loaded)
    a, b = _job(loaded, TEXTS[0], "fill_mask"), _job(loaded, TEXTS[0], "fill_mask")
    with_arena.run_batch([a])
    without.run_batch([b])
    assert a.result == b.result


# ------------------------------------------------------------------------------------------------------------------
# Beam search: per-row top-k preselection ranks exactly as the full ranking


def _tie_heavy(rng: np.random.Generator, rows: int, vocab: int) -> np.ndarray:
    """(R, V) log-probs drawn from a handful of values, so the per-row cut nearly always falls inside a tie."""
    levels = np.log(np.array([0.5, 0.2, 0.1, 0.05], dtype=np.float32))
    return levels[rng.integers(0, levels.size, size=(rows, vocab))]


@pytest.mark.parametrize("take", [2, 4, 8])
def test_preselected_ranking_equals_full_ranking_on_random_log_probs(take: int) -> None:
    from seqserve.server.ranking import best_candidates, best_candidates_full

    def sorted_reference(candidates: np.ndarray) -> np.ndarray:  # every candidate sorted: value desc, index asc
        flat = candidates.reshape(-1)
        return np.lexsort((np.arange(flat.size), -flat))[:take]

    rng = np.random.default_rng(take)
    for rows, vocab in [(1, 50), (3, 40), (8, 300), (16, 7)]:
        log_probs = rng.standard_normal((rows, vocab)).astype(np.float32)
        totals = rng.standard_normal(rows) * 3
        candidates = totals[:, None] + log_probs  # (R, V) float64
        np.testing.assert_array_equal(best_candidates(log_probs, totals, take), sorted_reference(candidates))
        np.testing.assert_array_equal(best_candidates_full(candidates, take), sorted_reference(candidates))


@pytest.mark.parametrize("take", [2, 4, 8])
def test_preselected_ranking_equals_full_ranking_with_ties_at_the_cut(take: int) -> None:
    from seqserve.server.ranking import best_candidates, best_candidates_full

    def sorted_reference(candidates: np.ndarray) -> np.ndarray:  # every candidate sorted: value desc, index asc
        flat = candidates.reshape(-1)
        return np.lexsort((np.arange(flat.size), -flat))[:take]

    rng = np.random.default_rng(100 + take)
    for trial in range(20):
        rows, vocab = int(rng.integers(2, 9)), int(rng.integers(take + 1, 60))
        log_probs = _tie_heavy(rng, rows, vocab)
        totals = rng.choice([0.0, -1.5], size=rows)  # rows sharing a total tie across rows too
        candidates = totals[:, None] + log_probs  # (R, V)
        want = sorted_reference(candidates)
        np.testing.assert_array_equal(best_candidates(log_probs, totals, take), want, err_msg=f"trial {trial}")
        np.testing.assert_array_equal(best_candidates_full(candidates, take), want, err_msg=f"trial {trial}")
    minus_inf = np.full((3, 10), -np.inf, dtype=np.float32)
    minus_inf[1, 4] = -1.0
    zeros = np.zeros(3)
    np.testing.assert_array_equal(best_candidates(minus_inf, zeros, take), sorted_reference(minus_inf + zeros[:, None]))
    # Distinct float32 values that one float64 total rounds to one sum, at the cut: 1e-30 vs 2e-30 below -5.
    rounding = np.full((2, 12), -30.0, dtype=np.float32)
    rounding[:, 1 : take + 1] = -1e-30
    rounding[:, 0] = -2e-30  # under each row's cut in float32, tied with it (and first by index) in float64
    totals = np.array([-5.0, -5.0])
    want = sorted_reference(totals[:, None] + rounding)
    np.testing.assert_array_equal(best_candidates(rounding, totals, take), want)


def test_beam_search_with_preselection_makes_the_same_hypotheses_as_the_full_ranking(monkeypatch) -> None:
    from seqserve.server import decoding
    from seqserve.server.ranking import best_candidates_full

    rng = np.random.default_rng(7)
    steps = [_tie_heavy(rng, 4, 30) if i % 2 else np.log(rng.dirichlet(np.ones(30), 4)).astype(np.float32)
             for i in range(12)]  # fmt: skip

    def run() -> list:
        search = decoding.make_search(beam_size=4, max_len=12, eos_id=2, alpha=0.0)
        first = np.log(rng_first.dirichlet(np.ones(30), 1)).astype(np.float32)  # (1, V): one BOS row
        rows = search.advance(first)
        for log_probs in steps:
            if search.done:
                break
            rows = search.advance(log_probs[: len(rows)])
        return list(search.finished)

    rng_first = np.random.default_rng(1)
    fast = run()

    def full(log_probs: np.ndarray, totals: np.ndarray, take: int) -> np.ndarray:
        return best_candidates_full(totals[:, None] + log_probs, take)

    monkeypatch.setattr(decoding, "best_candidates", full)
    rng_first = np.random.default_rng(1)
    assert run() == fast and len(fast) > 0


# ------------------------------------------------------------------------------------------------------------------
# Decoder graphs with TopK: searches fed each row's best K tokens decide exactly as with the full log-probs


def _top_k_rows(log_probs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """What ONNX TopK returns: each row's best k, best first, ties to the lower id."""
    ids = np.argsort(-log_probs, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(log_probs, ids, axis=1), ids


@pytest.mark.parametrize("beam", [1, 2, 4])
def test_searches_fed_top_k_candidates_make_the_same_hypotheses_as_fed_full_log_probs(beam: int) -> None:
    from seqserve.server.decoding import make_search

    rng = np.random.default_rng(beam)
    vocab = 40
    for trial in range(30):
        tie_heavy = trial % 2 == 1
        steps = [_tie_heavy(rng, 2 * beam, vocab) if tie_heavy else
                 np.log(rng.dirichlet(np.ones(vocab) * 0.3, 2 * beam)).astype(np.float32) for _ in range(10)]
        full = make_search(beam, max_len=10, eos_id=2, alpha=0.6)
        top = make_search(beam, max_len=10, eos_id=2, alpha=0.6)
        rows_full, rows_top, undecided = 1, 1, 0
        for log_probs in steps:
            if full.done:
                break
            chosen_full = full.advance(log_probs[:rows_full])
            values, ids = _top_k_rows(log_probs[:rows_top], top.candidates())
            chosen_top = top.advance_top(values, ids, complete=False)
            if chosen_top is None:  # a tie the candidates cannot settle: the caller hands over the full row
                undecided += 1
                chosen_top = top.advance(log_probs[:rows_top])
            assert chosen_top == chosen_full, f"trial {trial}"
            rows_full, rows_top = max(len(chosen_full), 1), max(len(chosen_top), 1)
        assert top.finished == full.finished and top.done == full.done
        if beam > 1 and tie_heavy:
            assert undecided > 0  # the tie-heavy steps exercised the hand-over


def test_beams_ranked_together_rank_as_each_alone_on_its_full_log_probs() -> None:
    from seqserve.server.decoding import BeamSearch
    from seqserve.server.ranking import best_candidates_full, rank_beams

    rng = np.random.default_rng(11)
    vocab, beam = 30, 3
    for trial in range(40):
        searches, rows, blocks = [], [], []
        start = 0
        for _ in range(int(rng.integers(1, 6))):
            n_rows = int(rng.integers(1, beam + 1))  # a first step has one row, later ones up to k
            search = BeamSearch(max_len=10, eos_id=2, beam_size=beam)
            search.live_tokens = [(1,)] * n_rows
            search.live_scores = [tuple(rng.choice([-0.5, -1.0, -1.5], size=2)) for _ in range(n_rows)]
            searches.append(search)
            rows.append(np.arange(start, start + n_rows))
            blocks.append(_tie_heavy(rng, n_rows, vocab) if trial % 2 else
                          np.log(rng.dirichlet(np.ones(vocab), n_rows)).astype(np.float32))  # fmt: skip
            start += n_rows
        log_probs = np.concatenate(blocks)  # (R, V)
        values, ids = _top_k_rows(log_probs, 2 * beam + 1)
        for search, r, ranked in zip(searches, rows, rank_beams(searches, rows, values, ids, complete=False)):
            totals = np.array([sum(s) for s in search.live_scores])
            want = best_candidates_full(totals[:, None] + log_probs[r], 2 * beam)  # flat indices, best first
            if ranked is None:  # a tie at some row's cut: the caller ranks the full log-probs instead
                continue
            parents, tokens, picked = ranked
            np.testing.assert_array_equal(parents * vocab + tokens, want, err_msg=f"trial {trial}")
            np.testing.assert_array_equal(picked, log_probs[r][parents, tokens])


def test_decoding_through_the_top_k_graph_equals_decoding_from_log_probs(tiny_repository: Path) -> None:
    from seqserve.server.decoding import decode_batch, make_search
    from seqserve.server.translation import OnnxStepModel

    for name in ("tiny-transformer", "tiny-gru"):
        loaded = load_model(ModelRepository(tiny_repository).version_dir(name))
        with_top_k = OnnxStepModel(loaded)
        assert with_top_k.top_k and with_top_k.vocab_size > 0
        without = OnnxStepModel(loaded)
        without.top_k = False  # the path of graphs exported before TopK: (R, V) log-probs and numpy ranking
        tokenizer = loaded.tokenizers["source"]
        sources = [tokenizer.encode(t).ids for t in ("a b c d", "h g", "c c a b e f", "e")]
        for beam in (1, 3, 5):
            results = []
            for model in (with_top_k, without):
                searches = [make_search(beam, 12, model.eos_id, 0.6) for _ in sources]
                decode_batch(model, sources, searches)
                results.append([s.results(beam) for s in searches])
            assert results[0] == results[1], (name, beam)


# ------------------------------------------------------------------------------------------------------------------
# `seqserve export` splits the MLM head by default


def test_export_command_splits_the_mlm_head_of_a_bert_by_default(tiny_checkpoints, tmp_path) -> None:
    import argparse

    from seqserve.cli import main as seqserve_main
    from seqserve.export import cli as export_cli

    args = ["export", str(tiny_checkpoints["bert"]), "-r", str(tmp_path), "-n", "bert", "--log-level", "WARNING"]
    assert seqserve_main(args) == 0
    assert set(ModelRepository(tmp_path).manifest("bert").graphs) == {"model", "mlm"}
    parser = argparse.ArgumentParser()
    export_cli.add_arguments(parser)
    assert parser.parse_args(["ckpt", "-r", "r", "-n", "b", "--no-split-mlm"]).split_mlm is False
