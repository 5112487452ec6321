"""numpy greedy and beam search (server/decoding.py) over the exported step graphs of every tiny translator."""

from __future__ import annotations


import numpy as np
import pytest

from seqserve.server.decoding import BeamSearch, GreedySearch, decode_batch, length_penalty, source_max_len
from seqserve.server.repository import ModelRepository, SessionOptions
from seqserve.server.translation import OnnxStepModel

TRANSLATORS = ("tiny-lstm", "tiny-gru", "tiny-birnn", "tiny-transformer")
SENTENCES = ["the cat sat on the mat", "a dog", "we read a book in the park today", "i like tea"]



# Each decoding test runs three ways: state and memory as numpy arrays on the host reordered by numpy's take (the CPU
# path for small batches), the same reordered by the exported gather graphs (the CPU path for large ones: here for
# every gather), and kept where the sessions run as OrtValues, bound with IO binding and reordered by the gather
# graphs (the GPU path, here on the CPU: the same code, only the device name differs).
@pytest.fixture(scope="module", params=[(name, where) for name in TRANSLATORS
                                        for where in ("host", "host-graph", "device")],
                ids=lambda p: f"{p[0]}-{p[1]}")  # fmt: skip
def translator(request, tiny_repository):
    name, where = request.param
    loaded = _load(tiny_repository, name)
    step_model = OnnxStepModel(loaded, device_state=where == "device")
    assert step_model.device_state == (where == "device")
    if where == "host-graph":
        step_model.host_gather_graph_bytes = 0
    return loaded, step_model


@pytest.fixture(scope="module", params=TRANSLATORS)
def loaded(request, tiny_repository):
    """One tiny translator's sessions, for tests that build their own translators over them."""
    return _load(tiny_repository, request.param)


def _load(tiny_repository, name: str):
    repo = ModelRepository(tiny_repository)
    if name not in repo.models():
        pytest.fail(f"tiny_repository lacks {name}; it has {sorted(repo.models())}")
    return repo.load(name, options=SessionOptions(intra_op_threads=1))


def _sources(loaded) -> list[list[int]]:
    tokenizer = loaded.tokenizers["source"]
    return [tokenizer.encode(s).ids for s in SENTENCES]


def _greedy(step_model, sources, max_len):
    searches = [GreedySearch(max_len=max_len, eos_id=step_model.eos_id) for _ in sources]
    decode_batch(step_model, sources, searches)
    return [s.results(1)[0] for s in searches]


def test_greedy_equals_the_export_reference_decode(translator):
    from seqserve.export.parity import StepGraphs, greedy_decode_onnx

    loaded, step_model = translator
    graphs = StepGraphs(
        loaded.sessions["encoder"], loaded.sessions["decoder"],
        tuple(step_model.memory_names), tuple(step_model.state_names),
    )  # fmt: skip
    for ids in _sources(loaded):
        src = np.asarray([ids], dtype=np.int64)
        reference = greedy_decode_onnx(
            graphs, src, np.zeros_like(src, dtype=bool), 12, step_model.bos_id, step_model.eos_id, step_model.pad_id
        )[0].tolist()
        [ours] = _greedy(step_model, [ids], 12)
        expected = reference[: reference.index(step_model.eos_id)] if step_model.eos_id in reference else reference
        assert list(ours.tokens) == expected
        assert ours.finished == (step_model.eos_id in reference)


def test_beam_of_one_equals_greedy(translator):
    loaded, step_model = translator
    sources = _sources(loaded)
    greedy = _greedy(step_model, sources, 15)
    beams = [BeamSearch(max_len=15, eos_id=step_model.eos_id, beam_size=1) for _ in sources]
    decode_batch(step_model, sources, beams)
    for g, b in zip(greedy, beams):
        [best] = b.results(1)
        assert best.tokens == g.tokens
        assert best.score == pytest.approx(g.score, abs=1e-5)


def test_batched_decode_equals_decoding_alone(translator):
    loaded, step_model = translator
    sources = _sources(loaded)
    alone = [_greedy(step_model, [s], 15)[0] for s in sources]
    together = _greedy(step_model, sources, 15)
    for a, t in zip(alone, together):
        assert a.tokens == t.tokens
        assert a.score == pytest.approx(t.score, abs=1e-4)
    beams_alone = []
    for s in sources:
        search = BeamSearch(max_len=15, eos_id=step_model.eos_id, beam_size=3)
        decode_batch(step_model, [s], [search])
        beams_alone.append(search.results(3))
    mixed = [BeamSearch(max_len=15, eos_id=step_model.eos_id, beam_size=3) for _ in sources]
    decode_batch(step_model, sources, mixed)
    for a, m in zip(beams_alone, mixed):
        assert [h.tokens for h in a] == [h.tokens for h in m.results(3)]


def test_beam_scores_are_length_penalised_sums_in_order(translator):
    loaded, step_model = translator
    sources = _sources(loaded)
    searches = [BeamSearch(max_len=10, eos_id=step_model.eos_id, beam_size=4, alpha=0.6) for _ in sources]
    decode_batch(step_model, sources, searches)
    for search in searches:
        hyps = search.results(4)
        assert 1 <= len(hyps) <= 4
        assert [h.score for h in hyps] == sorted((h.score for h in hyps), reverse=True)
        for h in hyps:
            assert len(h.token_scores) == len(h.tokens) + (1 if h.finished else 0)
            assert h.score == pytest.approx(sum(h.token_scores) / length_penalty(len(h.token_scores), 0.6), rel=1e-6)
            assert len(h.token_scores) <= 10


def test_stopped_sentence_leaves_the_running_batch(translator):
    loaded, step_model = translator
    sources = _sources(loaded)
    rows_per_step: list[int] = []
    searches = [GreedySearch(max_len=15, eos_id=step_model.eos_id) for _ in sources]
    decode_batch(step_model, sources, searches, stopped=lambda i: i == 0, on_step=rows_per_step.append)
    assert rows_per_step and max(rows_per_step) == len(sources) - 1
    assert searches[0].results(1) == []
    assert all(s.done for s in searches)


def test_max_length_is_absolute_and_relative_to_the_source():
    assert source_max_len(10, 0, 0.0, 256) == 256
    assert source_max_len(10, 7, 0.0, 256) == 7
    assert source_max_len(10, 0, 1.5, 256) == 20
    assert source_max_len(10, 30, 1.5, 256) == 20
    assert source_max_len(10, 0, 0.0, 12) == 12


@pytest.mark.parametrize("beam", [1, 3])
def test_sentences_joining_a_running_decode_get_the_results_they_get_alone(translator, beam):
    loaded, step_model = translator

    def search():
        if beam == 1:
            return GreedySearch(max_len=15, eos_id=step_model.eos_id)
        return BeamSearch(max_len=15, eos_id=step_model.eos_id, beam_size=beam)

    sources = _sources(loaded)
    alone = []
    for source in sources:
        solo = search()
        decode_batch(step_model, [source], [solo])
        alone.append(solo.results(1)[0])
    waiting = list(sources[1:])
    searches = [search() for _ in sources]
    calls: list[int] = []

    def refill(rows: int, src_len: int):
        calls.append(rows)
        if waiting and (rows == 0 or len(calls) % 2 == 0):  # a newcomer every other step
            return [(waiting.pop(0), searches[len(sources) - len(waiting) - 1])]
        return []

    done: list[int] = []
    decode_batch(step_model, [sources[0]], [searches[0]], on_done=done.append, refill=refill)
    assert sorted(done) == list(range(len(sources)))
    for search, expected in zip(searches, alone):
        [got] = search.results(1)
        assert got.tokens == expected.tokens
        assert got.score == pytest.approx(expected.score, abs=1e-4)
    # Every family takes newcomers into the running batch: RNN decoders carry no time axis, a Transformer's caches
    # are padded in front and masked (cache_pad_mask).
    assert step_model.joinable
    assert any(rows > 0 for rows in calls)


def test_a_finished_sentence_is_reported_before_the_batch_ends(translator):
    loaded, step_model = translator
    tokenizer = loaded.tokenizers["source"]
    short, long = tokenizer.encode("a").ids, tokenizer.encode("h g f e d c b a h g f e").ids
    searches = [GreedySearch(max_len=30, eos_id=step_model.eos_id) for _ in range(2)]
    order: list[tuple[int, int]] = []
    steps = [0]
    decode_batch(step_model, [short, long], searches, on_step=lambda rows: steps.__setitem__(0, steps[0] + 1),
                 on_done=lambda i: order.append((i, steps[0])))  # fmt: skip
    assert [i for i, _ in order] == [0, 1]
    assert order[0][1] < order[1][1]


def test_a_transformer_exported_without_the_cache_mask_joins_only_fresh_batches(tiny_repository):
    """Repositories exported before cache_pad_mask existed: the caches share one length, so no joining mid-decode."""
    import dataclasses

    loaded = _load(tiny_repository, "tiny-transformer")
    assert OnnxStepModel(loaded).joinable
    decoder = loaded.manifest.graphs["decoder"]
    older = dataclasses.replace(decoder, inputs=tuple(i for i in decoder.inputs if i.name != "cache_pad_mask"))
    loaded.manifest = dataclasses.replace(loaded.manifest, graphs={**loaded.manifest.graphs, "decoder": older})
    step_model = OnnxStepModel(loaded)
    assert not step_model.masks_cache and not step_model.joinable


# --------------------------------------------------------------------------------------------------------------
# greedy.onnx: a whole greedy decode in one run (RNN exports)


class _CountingSession:
    """An onnxruntime session that counts its runs (to tell which graph decoded)."""

    def __init__(self, session):
        self.session, self.runs = session, 0

    def run(self, *args, **kwargs):
        self.runs += 1
        return self.session.run(*args, **kwargs)


def _translator(loaded):
    from seqserve.server.translation import Translator

    translator = Translator.for_model(loaded)
    translator.step_model.decoder = _CountingSession(translator.step_model.decoder)
    return translator


def _translate(translator, ids, options, refill=None):
    job = translator.job(ids, options)
    jobs, done, steps = [job], [], []

    def more(rows, src_len):
        new = refill(rows, src_len) if refill else []
        jobs.extend(new)
        return new

    translator.run_batch([job], stopped=lambda i: False, on_step=steps.append, on_done=done.append, refill=more)
    return jobs, done, steps


@pytest.mark.parametrize("max_tokens", [0, 3])
def test_one_greedy_sentence_through_the_loop_equals_the_step_graph(loaded, max_tokens):
    from seqserve.server.translation import DecodeOptions

    looping, stepping = _translator(loaded), _translator(loaded)
    stepping.step_model.loop = None
    assert looping.step_model.has_loop == (loaded.manifest.architecture != "transformer")
    options = DecodeOptions(max_output_tokens=max_tokens, return_token_scores=True)
    for ids in _sources(loaded):
        [ours], done, steps = _translate(looping, ids, options)
        [reference], _, reference_steps = _translate(stepping, ids, options)
        assert done == [0] and steps == reference_steps and set(steps) == {1}
        [got], [expected] = ours.result, reference.result
        assert got.tokens == expected.tokens and got.finished == expected.finished
        assert got.score == pytest.approx(expected.score, abs=1e-5)
        assert got.token_scores == pytest.approx(expected.token_scores, abs=1e-5)
        if max_tokens:
            assert len(got.token_scores) <= max_tokens
    # The loop decoded without a single step-graph run; the step path ran it once a step.
    expected_runs = 0 if looping.step_model.has_loop else stepping.step_model.decoder.runs
    assert looping.step_model.decoder.runs == expected_runs
    assert stepping.step_model.decoder.runs > 0


def test_a_sentence_waiting_when_a_greedy_decode_starts_joins_it_through_the_step_graph(tiny_repository):
    from seqserve.server.translation import DecodeOptions

    loaded = _load(tiny_repository, "tiny-gru")
    translator = _translator(loaded)
    first, second = _sources(loaded)[:2]
    alone = [_translate(translator, ids, DecodeOptions())[0][0].result for ids in (first, second)]
    assert translator.step_model.decoder.runs == 0  # alone: the loop
    waiting = [translator.job(second, DecodeOptions())]
    refill = lambda rows, src_len: waiting[:1] and [waiting.pop()]  # noqa: E731
    jobs, done, steps = _translate(translator, first, DecodeOptions(), refill)
    assert sorted(done) == [0, 1] and len(jobs) == 2
    assert translator.step_model.decoder.runs == len(steps) and max(steps) == 2  # together, a step at a time
    for job, [expected] in zip(jobs, alone):
        [got] = job.result
        assert got.tokens == expected.tokens and got.score == pytest.approx(expected.score, abs=1e-5)


# --------------------------------------------------------------------------------------------------------------
# Decoder state kept where the sessions run (OnnxStepModel device_state)


@pytest.mark.parametrize("name", TRANSLATORS)
def test_state_kept_on_the_device_decodes_as_on_the_host(tiny_repository, name):
    """Beam 3 over a batch with a sentence dropped midway: the same hypotheses and scores, and the device path's
    state really is OrtValues between steps (reordered by the gather graphs, not numpy)."""
    import onnxruntime as ort

    loaded = _load(tiny_repository, name)
    results, kinds = {}, {}
    for where in ("host", "device"):
        step_model = OnnxStepModel(loaded, device_state=where == "device")
        gather_rows = step_model.gather_rows

        def spy(group, tensors, rows, gather_rows=gather_rows, where=where):
            kinds.setdefault(where, set()).update(type(x) for x in tensors)
            return gather_rows(group, tensors, rows)

        step_model.gather_rows = spy
        sources = _sources(loaded)
        searches = [BeamSearch(max_len=12, eos_id=step_model.eos_id, beam_size=3) for _ in sources]
        steps = [0]
        decode_batch(step_model, sources, searches, stopped=lambda i: i == 2 and steps[0] >= 1,
                     on_step=lambda rows: steps.__setitem__(0, steps[0] + 1))  # fmt: skip
        results[where] = [[(h.tokens, h.score) for h in s.results(3)] for s in searches]
    assert results["host"] == results["device"]
    assert results["host"][2] == []  # dropped after its first step
    assert kinds["host"] == {np.ndarray} and kinds["device"] == {ort.OrtValue}


def test_device_state_needs_the_gather_graphs(tiny_repository):
    """An export that predates the gather graphs: asked for device state, a clear error; by default (and on a GPU) it
    keeps the state on the host. Every translator export has them, checked against numpy at export."""
    import dataclasses

    from seqserve.server.repository import GATHER_GRAPHS

    loaded = _load(tiny_repository, "tiny-transformer")
    assert set(GATHER_GRAPHS.values()) <= set(loaded.manifest.graphs)
    assert loaded.manifest.raw["row_gather_check"]["equal"]
    assert not OnnxStepModel(loaded).device_state  # the CPU keeps numpy state unless asked
    older = dataclasses.replace(loaded, sessions={k: v for k, v in loaded.sessions.items()
                                                  if k not in GATHER_GRAPHS.values()})  # fmt: skip
    with pytest.raises(ValueError, match="gather graphs .* export it again"):
        OnnxStepModel(older, device_state=True)
    assert not OnnxStepModel(older).device_state


def test_large_host_gathers_run_the_gather_graph_and_equal_numpys(tiny_repository):
    """On the host a gather of HOST_GATHER_GRAPH_BYTES or more runs the exported gather graph (numpy in and out),
    a smaller one numpy's take: the same arrays either way."""
    from seqserve.server.translation import HOST_GATHER_GRAPH_BYTES

    loaded = _load(tiny_repository, "tiny-transformer")
    step_model = OnnxStepModel(loaded)
    assert not step_model.device_state and step_model.host_gather_graph_bytes == HOST_GATHER_GRAPH_BYTES
    src = np.asarray([_sources(loaded)[2]] * 3, dtype=np.int64)
    memory, state = step_model.encode(src, np.zeros(src.shape, dtype=bool))
    _, _, state = step_model.step_top_k(np.full((3,), step_model.bos_id), np.zeros(src.shape, dtype=bool), memory,
                                        state, 2, cache_mask=np.zeros((3, 0), dtype=bool))  # fmt: skip
    rows = np.asarray([2, 0, 0, 1], dtype=np.int64)
    for group, tensors in (("state", state), ("memory", memory)):
        step_model.gathers[group] = counting = _CountingSession(step_model.gathers[group])
        step_model.host_gather_graph_bytes = HOST_GATHER_GRAPH_BYTES
        small = step_model.gather_rows(group, tensors, rows)  # a tiny model's tensors: numpy
        assert counting.runs == 0
        step_model.host_gather_graph_bytes = 0
        large = step_model.gather_rows(group, tensors, rows)
        assert counting.runs == 1
        for x, a, b in zip(tensors, small, large):
            assert isinstance(b, np.ndarray) and b.shape == (4, *x.shape[1:]) and np.array_equal(a, b)
