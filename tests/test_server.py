"""The inference RPCs over a real server on port 0 serving tiny_repository, checked against the ONNX sessions."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from tokenizers import Tokenizer

from seqserve.protos.v1 import seqserve_pb2 as pb
from seqserve.protos.v1 import seqserve_pb2_grpc as pb_grpc
from seqserve.server.config import BatchingConfig, Limits, ServerConfig
from seqserve.server.repository import ModelRepository
from seqserve.server.testing import ServerThread

TRANSLATORS = ("tiny-lstm", "tiny-gru", "tiny-birnn", "tiny-transformer")
LETTERS = ["a b c", "e f a h d a c", "f h d", "b d a d g e", "c", "h g f e d c b a", "a a b", "d e"]
DOCS = ["forest five foru fore fori", "forest six foru foro foru", "forest seven", "fora"]
LIMITS = Limits(max_texts=16, max_chars_per_text=300, max_message_bytes=64 * 1024, max_beam_size=8, max_top_k=20)



@pytest.fixture(scope="module")
def running(tiny_repository):
    config = ServerConfig(
        port=0, metrics_port=None, instances=1, threads=1, limits=LIMITS,
        batching=BatchingConfig(max_queue_delay_ms=20.0),
    )  # fmt: skip
    with ServerThread(config, ModelRepository(tiny_repository)) as server:
        yield server


@pytest.fixture(scope="module")
def channel(running):
    with grpc.insecure_channel(running.address) as ch:
        yield ch


@pytest.fixture(scope="module")
def inference(channel):
    return pb_grpc.InferenceStub(channel)


def _spec(name: str, version: int = 0) -> pb.ModelSpec:
    return pb.ModelSpec(name=name, version=version)


def _version_dir(tiny_repository, name: str) -> Path:
    return tiny_repository / name / "1"


def _session(tiny_repository, name: str, graph: str) -> ort.InferenceSession:
    manifest = json.loads((_version_dir(tiny_repository, name) / "manifest.json").read_text())
    path = _version_dir(tiny_repository, name) / manifest["graphs"][graph]["file"]
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _bert_inputs(tiny_repository, text: str, pair: str | None = None) -> dict[str, np.ndarray]:
    tok = Tokenizer.from_file(str(_version_dir(tiny_repository, "tiny-bert") / "tokenizer.json"))
    enc = tok.encode(text, pair) if pair is not None else tok.encode(text)
    ids = np.asarray([enc.ids], dtype=np.int64)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.asarray([enc.type_ids])}


def _bert_manifest(tiny_repository) -> dict:
    return json.loads((_version_dir(tiny_repository, "tiny-bert") / "manifest.json").read_text())


def _hidden(tiny_repository) -> int:
    outputs = _bert_manifest(tiny_repository)["graphs"]["model"]["outputs"]
    return next(o["shape"][-1] for o in outputs if o["name"] == "sequence_output")


def _vectors(response: pb.EncodeResponse) -> np.ndarray:
    t = response.embeddings
    assert t.dtype == "float32"
    return np.frombuffer(t.data, dtype="<f4").reshape(tuple(t.shape))


def _code_and_details(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


# ------------------------------------------------------------------------------------------------------------------
# Translate


@pytest.mark.parametrize("name", TRANSLATORS)
def test_translation_equals_a_greedy_decode_through_the_exported_graphs(name, inference, tiny_repository):
    from seqserve.export.parity import StepGraphs, greedy_decode_onnx

    manifest = json.loads((_version_dir(tiny_repository, name) / "manifest.json").read_text())
    graphs = StepGraphs(
        _session(tiny_repository, name, "encoder"), _session(tiny_repository, name, "decoder"),
        tuple(manifest["decoder"]["memory"]), tuple(manifest["decoder"]["state"]),
    )  # fmt: skip
    src_tok = Tokenizer.from_file(str(_version_dir(tiny_repository, name) / "source_tokenizer.json"))
    tgt_tok = Tokenizer.from_file(str(_version_dir(tiny_repository, name) / "target_tokenizer.json"))
    special = manifest["special_tokens"]
    response = inference.Translate(pb.TranslateRequest(model=_spec(name), texts=LETTERS[:4]))
    assert response.model == pb.ModelRef(name=name, version=1)
    assert len(response.translations) == 4
    for text, translation in zip(LETTERS, response.translations):
        src = np.asarray([src_tok.encode(text).ids], dtype=np.int64)
        ids = greedy_decode_onnx(
            graphs, src, np.zeros_like(src, dtype=bool), manifest["limits"]["max_target_tokens"],
            special["decoder_start"], special["eos"], special["pad"],
        )[0].tolist()  # fmt: skip
        ids = ids[: ids.index(special["eos"])] if special["eos"] in ids else ids
        [best] = translation.hypotheses
        assert best.tokens == [tgt_tok.id_to_token(i) for i in ids]
        assert best.text == tgt_tok.decode(ids, skip_special_tokens=True)
        assert translation.source_tokens == src.shape[1]


def test_tiny_translator_reverses_letters(inference):
    response = inference.Translate(pb.TranslateRequest(model=_spec("tiny-transformer"), texts=["a b c d"]))
    assert response.translations[0].hypotheses[0].text.split() == ["d", "c", "b", "a"]


def test_beam_of_one_equals_greedy_over_rpc(inference):
    greedy = inference.Translate(pb.TranslateRequest(model=_spec("tiny-lstm"), texts=LETTERS))
    beam = inference.Translate(
        pb.TranslateRequest(model=_spec("tiny-lstm"), texts=LETTERS, options=pb.DecodingOptions(beam_size=1))
    )
    assert greedy.translations == beam.translations


def test_beam_returns_n_best_sorted_with_token_scores(inference):
    options = pb.DecodingOptions(beam_size=4, n_best=3, length_penalty=0.6, return_token_scores=True)
    response = inference.Translate(pb.TranslateRequest(model=_spec("tiny-gru"), texts=LETTERS[:3], options=options))
    for translation in response.translations:
        hyps = translation.hypotheses
        assert len(hyps) == 3
        assert [h.score for h in hyps] == sorted((h.score for h in hyps), reverse=True)
        for h in hyps:
            n = len(h.token_scores)
            assert n in (len(h.tokens), len(h.tokens) + 1)  # + the EOS score when it ended with EOS
            assert h.score == pytest.approx(sum(h.token_scores) / ((5 + n) / 6) ** 0.6, rel=1e-4)


def test_max_output_tokens_caps_the_translation(inference):
    options = pb.DecodingOptions(max_output_tokens=2, return_token_scores=True)
    request = pb.TranslateRequest(model=_spec("tiny-lstm"), texts=["h g f e d c b a"], options=options)
    response = inference.Translate(request)
    hyp = response.translations[0].hypotheses[0]
    assert len(hyp.token_scores) <= 2 and len(hyp.tokens) <= 2


@pytest.mark.parametrize("beam", [3, 1])  # greedy: alone through greedy.onnx (RNNs), in a crowd step by step too
def test_translation_does_not_depend_on_batch_company(running, inference, beam):
    target = "e f a h d a c"
    options = pb.DecodingOptions(beam_size=beam, n_best=min(beam, 2), return_token_scores=True)
    for name in TRANSLATORS:
        alone = inference.Translate(pb.TranslateRequest(model=_spec(name), texts=[target], options=options))
        batches_before = _batch_count(running, name)
        with ThreadPoolExecutor(8) as pool:
            crowd = [
                pool.submit(inference.Translate, pb.TranslateRequest(model=_spec(name), texts=[t], options=options))
                for t in LETTERS * 2 + [target]
            ]
            results = [f.result() for f in crowd]
        assert _batch_count(running, name) - batches_before < len(crowd)  # some requests did share a batch
        together = results[-1].translations[0]
        for a, b in zip(alone.translations[0].hypotheses, together.hypotheses):
            assert a.tokens == b.tokens
            assert a.score == pytest.approx(b.score, abs=1e-4)


def _batch_count(running, model: str) -> float:
    return running.server.metrics.registry.get_sample_value("seqserve_batch_sequences_count", {"model": model}) or 0


def test_empty_text_list_gives_empty_results(inference, tiny_repository):
    assert len(inference.Translate(pb.TranslateRequest(model=_spec("tiny-lstm"))).translations) == 0
    vectors = _vectors(inference.Encode(pb.EncodeRequest(model=_spec("tiny-bert"))))
    assert vectors.shape == (0, _hidden(tiny_repository))
    nsp = inference.ScoreNextSentence(pb.ScoreNextSentenceRequest(model=_spec("tiny-bert")))
    assert len(nsp.is_next_probability) == 0
    assert len(inference.FillMask(pb.FillMaskRequest(model=_spec("tiny-bert"))).results) == 0


def test_translation_of_an_empty_string_is_empty(inference):
    response = inference.Translate(pb.TranslateRequest(model=_spec("tiny-lstm"), texts=["", "a b"]))
    empty = response.translations[0].hypotheses
    assert len(empty) == 1 and empty[0].text == "" and empty[0].score == 0.0
    assert response.translations[1].hypotheses[0].text != ""


# ------------------------------------------------------------------------------------------------------------------
# Encode, ScoreNextSentence, FillMask


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_embeddings_equal_the_onnx_session_output_pooled(pooling, inference, tiny_repository):
    session = _session(tiny_repository, "tiny-bert", "model")
    enum = {"cls": pb.POOLING_CLS, "mean": pb.POOLING_MEAN}[pooling]
    response = inference.Encode(pb.EncodeRequest(model=_spec("tiny-bert"), texts=DOCS, pooling=enum))
    vectors = _vectors(response)
    assert vectors.shape == (len(DOCS), _hidden(tiny_repository))
    for text, vector, count in zip(DOCS, vectors, response.token_counts):
        inputs = _bert_inputs(tiny_repository, text)
        [sequence] = session.run(["sequence_output"], inputs)  # (1, L, H)
        expected = sequence[0, 0] if pooling == "cls" else sequence[0].mean(axis=0)
        np.testing.assert_allclose(vector, expected, atol=1e-5)
        assert count == inputs["input_ids"].shape[1]


def test_encode_of_pairs_uses_token_types(inference, tiny_repository):
    session = _session(tiny_repository, "tiny-bert", "model")
    pair = pb.TextPair(first=DOCS[0], second=DOCS[1])
    vectors = _vectors(inference.Encode(pb.EncodeRequest(model=_spec("tiny-bert"), pairs=[pair])))
    [sequence] = session.run(["sequence_output"], _bert_inputs(tiny_repository, DOCS[0], DOCS[1]))
    np.testing.assert_allclose(vectors[0], sequence[0, 0], atol=1e-5)  # tiny-bert pools with cls


def test_normalize_gives_unit_vectors(inference):
    vectors = _vectors(inference.Encode(pb.EncodeRequest(model=_spec("tiny-bert"), texts=DOCS, normalize=True)))
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_encode_of_an_empty_string_encodes_cls_sep(inference):
    response = inference.Encode(pb.EncodeRequest(model=_spec("tiny-bert"), texts=[""]))
    assert list(response.token_counts) == [2]
    assert np.isfinite(_vectors(response)).all()


def test_long_requests_are_tokenized_like_short_ones(inference, tiny_repository):
    text = "forest five foru " * 17  # 16 of these pass 4096 characters: tokenized in a worker thread
    request = pb.EncodeRequest(model=_spec("tiny-bert"), texts=[text] * 16, truncation=pb.TRUNCATION_TRUNCATE)
    many = inference.Encode(request)
    one = inference.Encode(pb.EncodeRequest(model=_spec("tiny-bert"), texts=[text], truncation=pb.TRUNCATION_TRUNCATE))
    limit = _bert_manifest(tiny_repository)["limits"]["max_tokens"]
    assert len(text.split()) > limit
    assert list(many.token_counts) == [limit] * 16 and list(one.token_counts) == [limit]
    np.testing.assert_allclose(_vectors(many), np.repeat(_vectors(one), 16, axis=0), atol=1e-5)


def test_embeddings_do_not_depend_on_batch_company(inference):
    alone = _vectors(inference.Encode(pb.EncodeRequest(model=_spec("tiny-bert"), texts=[DOCS[3]])))
    with ThreadPoolExecutor(6) as pool:
        crowd = [pool.submit(inference.Encode, pb.EncodeRequest(model=_spec("tiny-bert"), texts=[d])) for d in DOCS * 3]
        results = [_vectors(f.result()) for f in crowd]
    np.testing.assert_allclose(results[3], alone, atol=1e-5)
    np.testing.assert_allclose(results[-1], alone, atol=1e-5)


def test_next_sentence_probability_is_softmax_index_zero(inference, tiny_repository):
    session = _session(tiny_repository, "tiny-bert", "model")
    pairs = [(DOCS[0], DOCS[1]), (DOCS[1], DOCS[3])]
    response = inference.ScoreNextSentence(
        pb.ScoreNextSentenceRequest(model=_spec("tiny-bert"), pairs=[pb.TextPair(first=a, second=b) for a, b in pairs])
    )
    for (a, b), prob in zip(pairs, response.is_next_probability):
        [logits] = session.run(["nsp_logits"], _bert_inputs(tiny_repository, a, b))
        expected = np.exp(logits[0, 0]) / np.exp(logits[0]).sum()
        assert prob == pytest.approx(float(expected), abs=1e-5)


def test_fill_mask_gives_top_k_per_mask_from_the_mlm_head(inference, tiny_repository):
    session = _session(tiny_repository, "tiny-bert", "model")
    text = "forest [MASK] foru [MASK] fori"
    response = inference.FillMask(pb.FillMaskRequest(model=_spec("tiny-bert"), texts=[text], top_k=3))
    [result] = response.results
    assert len(result.masks) == 2
    inputs = _bert_inputs(tiny_repository, text)
    [logits] = session.run(["mlm_logits"], inputs)  # (1, L, V)
    mask_id = _bert_manifest(tiny_repository)["special_tokens"]["mask"]
    positions = np.flatnonzero(inputs["input_ids"][0] == mask_id)
    for pos, mask in zip(positions, result.masks):
        probs = np.exp(logits[0, pos] - logits[0, pos].max())
        probs /= probs.sum()
        assert [c.token_id for c in mask.candidates] == list(np.argsort(-probs, kind="stable")[:3])
        assert mask.candidates[0].probability == pytest.approx(float(probs.max()), abs=1e-5)
        assert mask.candidates[0].token != ""


def test_default_top_k_is_five(inference):
    response = inference.FillMask(pb.FillMaskRequest(model=_spec("tiny-bert"), texts=["forest [MASK]"]))
    assert len(response.results[0].masks[0].candidates) == 5


# ------------------------------------------------------------------------------------------------------------------
# TranslateStream


def test_stream_answers_every_item_by_id_and_matches_translate(inference):
    spec = _spec("tiny-transformer")
    items = [pb.TranslateStreamRequest(id=f"n{i}", model=spec, text=t) for i, t in enumerate(LETTERS)]
    responses = {r.id: r for r in inference.TranslateStream(iter(items))}
    assert set(responses) == {item.id for item in items}
    unary = inference.Translate(pb.TranslateRequest(model=_spec("tiny-transformer"), texts=LETTERS))
    for i, translation in enumerate(unary.translations):
        assert responses[f"n{i}"].error_code == 0
        assert responses[f"n{i}"].translation.hypotheses[0].text == translation.hypotheses[0].text


def test_stream_items_are_counted_under_their_model(running, inference):
    def counted(model: str) -> float:
        labels = {"method": "TranslateStream", "model": model}
        return running.server.metrics.registry.get_sample_value("seqserve_requests_total", labels) or 0.0

    before = counted("tiny-lstm"), counted("other")
    items = [pb.TranslateStreamRequest(id=str(i), model=_spec("tiny-lstm"), text="a b") for i in range(3)]
    items.append(pb.TranslateStreamRequest(id="x", model=_spec("no-such-model"), text="a b"))
    latencies = running.server.metrics.registry.get_sample_value
    observed = latencies("seqserve_request_latency_seconds_count", {"method": "TranslateStream"}) or 0.0
    assert len(list(inference.TranslateStream(iter(items)))) == 4
    assert (counted("tiny-lstm"), counted("other")) == (before[0] + 3, before[1] + 1)
    assert latencies("seqserve_request_latency_seconds_count", {"method": "TranslateStream"}) == observed + 4


def test_a_cancelled_stream_counts_its_unfinished_items_as_cancelled(running, inference):
    """Every item counted as a request is also timed, and those the cancellation cut short count as CANCELLED."""
    sample = running.server.metrics.registry.get_sample_value

    def counts() -> tuple[float, float, float]:
        return (sample("seqserve_requests_total", {"method": "TranslateStream", "model": "tiny-lstm"}) or 0.0,
                sample("seqserve_request_latency_seconds_count", {"method": "TranslateStream"}) or 0.0,
                sample("seqserve_errors_total", {"method": "TranslateStream", "code": "CANCELLED"}) or 0.0)  # fmt: skip

    before = counts()
    options = pb.DecodingOptions(beam_size=8)
    items = [pb.TranslateStreamRequest(id=str(i), model=_spec("tiny-lstm"), text="h g f e d c b a h g f e d c b",
                                       options=options) for i in range(40)]  # fmt: skip
    call = inference.TranslateStream(iter(items))
    next(call)
    call.cancel()
    deadline = time.monotonic() + 10
    while (now := counts())[0] - before[0] != now[1] - before[1] and time.monotonic() < deadline:
        time.sleep(0.05)  # the server's item tasks finish counting after the client has gone
    requests, timed, cancelled = (a - b for a, b in zip(counts(), before))
    assert requests == timed and cancelled >= 1


def test_stream_reports_a_failed_item_and_goes_on(inference):
    items = [
        pb.TranslateStreamRequest(id="good", model=_spec("tiny-lstm"), text="a b"),
        pb.TranslateStreamRequest(id="unknown", model=_spec("no-such-model"), text="a b"),
        pb.TranslateStreamRequest(id="long", model=_spec("tiny-lstm"), text="a " * 400),
        pb.TranslateStreamRequest(id="after", model=_spec("tiny-lstm"), text="c d"),
    ]
    responses = {r.id: r for r in inference.TranslateStream(iter(items))}
    assert responses["unknown"].error_code == grpc.StatusCode.NOT_FOUND.value[0]
    assert "no-such-model" in responses["unknown"].error_message
    assert responses["long"].error_code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert responses["long"].error_message.startswith("item long has 800 characters")  # its id, not "text 0"
    assert responses["good"].error_code == 0 and responses["after"].error_code == 0
    assert responses["after"].translation.hypotheses[0].text.split() == ["d", "c"]
