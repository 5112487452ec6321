"""The Open Inference Protocol (KServe v2) on seqserve's port: a real server on port 0 serving tiny_repository, called
through raw v2 stubs, its answers checked against the same server's seqserve.v1 answers, and every bad request
answered with a status that names what was wrong."""

from __future__ import annotations

import struct
from importlib import metadata

import grpc
import numpy as np
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from seqserve.clients import Client, DecodingOptions
from seqserve.protos.inference import open_inference_pb2 as v2
from seqserve.protos.inference import open_inference_pb2_grpc as v2_grpc
from seqserve.server.config import Limits, ServerConfig
from seqserve.server.repository import ModelRepository
from seqserve.server.testing import ServerThread

LETTERS = ["a b c", "e f a h d a c", "f h d", "b d a d g e"]
DOCS = ["forest five foru fore fori", "forest six foru foro foru", "forest seven", "fora"]
LIMITS = Limits(max_texts=16, max_chars_per_text=300, max_message_bytes=64 * 1024, max_beam_size=8, max_top_k=20,
                max_tokens_per_text=64)


@pytest.fixture(scope="module")
def running(tiny_repository):
    config = ServerConfig(port=0, metrics_port=None, instances=1, threads=1, limits=LIMITS)
    with ServerThread(config, ModelRepository(tiny_repository)) as server:
        yield server


@pytest.fixture(scope="module")
def stub(running):
    with grpc.insecure_channel(running.address) as channel:
        yield v2_grpc.GRPCInferenceServiceStub(channel)


@pytest.fixture(scope="module")
def client(running):
    with Client(running.address) as c:
        yield c


def _text(name: str, values: list[str], shape: list[int] | None = None) -> v2.ModelInferRequest.InferInputTensor:
    tensor = v2.ModelInferRequest.InferInputTensor(name=name, datatype="BYTES", shape=shape or [len(values)])
    tensor.contents.bytes_contents.extend(v.encode("utf-8") for v in values)
    return tensor


def _pack(values: list[bytes]) -> bytes:
    """A raw BYTES tensor as tritonclient serializes one: each element's length as 4 little-endian bytes, then it."""
    return b"".join(struct.pack("<I", len(v)) + v for v in values)


def _unpack(raw: bytes, count: int) -> list[bytes]:
    out, at = [], 0
    for _ in range(count):
        (size,) = struct.unpack_from("<I", raw, at)
        out.append(raw[at + 4 : at + 4 + size])
        at += 4 + size
    assert at == len(raw)
    return out


def _raw_request(model: str, inputs: dict[str, list[str]], **fields) -> v2.ModelInferRequest:
    """Inputs as raw_input_contents, the way tritonclient sends them."""
    request = v2.ModelInferRequest(model_name=model, **fields)
    for name, values in inputs.items():
        request.inputs.add(name=name, datatype="BYTES", shape=[len(values)])
        request.raw_input_contents.append(_pack([v.encode("utf-8") for v in values]))
    return request


def _outputs(response: v2.ModelInferResponse) -> dict[str, np.ndarray]:
    """Each output as numpy (BYTES as decoded str), shaped as the response says."""
    out = {}
    assert len(response.outputs) == len(response.raw_output_contents)
    for tensor, raw in zip(response.outputs, response.raw_output_contents):
        count = int(np.prod(tensor.shape))
        if tensor.datatype == "BYTES":
            values = np.asarray([b.decode("utf-8") for b in _unpack(raw, count)], dtype=object)
        else:
            assert tensor.datatype == "FP32", tensor
            values = np.frombuffer(raw, "<f4")
        out[tensor.name] = values.reshape(list(tensor.shape))
    return out


def _refused(call, code: grpc.StatusCode, *fragments: str) -> str:
    with pytest.raises(grpc.RpcError) as info:
        call()
    assert info.value.code() == code, (info.value.code(), info.value.details())
    for fragment in fragments:
        assert fragment in info.value.details(), (fragment, info.value.details())
    return info.value.details()


def test_server_and_model_status(stub, running):
    assert stub.ServerLive(v2.ServerLiveRequest()).live
    assert stub.ServerReady(v2.ServerReadyRequest()).ready
    meta = stub.ServerMetadata(v2.ServerMetadataRequest())
    assert (meta.name, meta.version) == ("seqserve", metadata.version("seqserve"))
    assert stub.ModelReady(v2.ModelReadyRequest(name="tiny-gru")).ready
    assert stub.ModelReady(v2.ModelReadyRequest(name="tiny-gru", version="1")).ready
    assert not stub.ModelReady(v2.ModelReadyRequest(name="tiny-gru", version="7")).ready
    assert not stub.ModelReady(v2.ModelReadyRequest(name="no-such-model")).ready
    assert not stub.ModelReady(v2.ModelReadyRequest(name="")).ready
    for version in ("v1", "0", "01", "\u0661", "1" * 10):  # versions are the repository's folder names: 1, 2, ...
        _refused(lambda: stub.ModelReady(v2.ModelReadyRequest(name="tiny-gru", version=version)),
                 grpc.StatusCode.INVALID_ARGUMENT, "is not a version number (1, 2, ...; empty for the latest)")


def test_model_metadata_names_each_task_s_tensors(stub, running):
    gru = stub.ModelMetadata(v2.ModelMetadataRequest(name="tiny-gru"))
    assert (gru.name, list(gru.versions), gru.platform) == ("tiny-gru", ["1"], "seqserve")
    assert [(t.name, t.datatype, list(t.shape)) for t in gru.inputs] == [("text", "BYTES", [-1])]
    assert [(t.name, t.datatype, list(t.shape)) for t in gru.outputs] == [
        ("translation", "BYTES", [-1]), ("score", "FP32", [-1])]
    bert = stub.ModelMetadata(v2.ModelMetadataRequest(name="tiny-bert", version="1"))
    hidden = running.server.manager.get("tiny-bert").hidden_size()
    assert [t.name for t in bert.inputs] == ["text", "text_pair"]
    assert [(t.name, t.datatype, list(t.shape)) for t in bert.outputs] == [
        ("embedding", "FP32", [-1, hidden]), ("is_next_probability", "FP32", [-1])]
    _refused(lambda: stub.ModelMetadata(v2.ModelMetadataRequest(name="no-such-model")), grpc.StatusCode.NOT_FOUND,
             "no-such-model", "tiny-gru")  # fmt: skip


@pytest.mark.parametrize("name", ["tiny-gru", "tiny-transformer"])
def test_translation_matches_seqserve_v1_whether_contents_or_raw(stub, client, name):
    reference = client.translate(name, LETTERS, DecodingOptions(beam_size=3))
    parameters = {"beam_size": v2.InferParameter(int64_param=3)}
    by_contents = v2.ModelInferRequest(model_name=name, id="req-7", inputs=[_text("text", LETTERS)],
                                       parameters=parameters)  # fmt: skip
    for request in (by_contents, _raw_request(name, {"text": LETTERS}, id="req-7", parameters=parameters)):
        response = stub.ModelInfer(request)
        assert (response.model_name, response.model_version, response.id) == (name, "1", "req-7")
        out = _outputs(response)
        assert list(out) == ["translation", "score"]
        assert out["translation"].tolist() == [t.hypotheses[0].text for t in reference]
        np.testing.assert_allclose(out["score"], [t.hypotheses[0].score for t in reference], rtol=1e-6)


def test_translation_shapes_n_best_and_chosen_outputs(stub, client):
    request = v2.ModelInferRequest(
        model_name="tiny-lstm", inputs=[_text("text", LETTERS, shape=[4, 1])],  # [N, 1], as many v2 clients send
        parameters={"beam_size": v2.InferParameter(int64_param=3), "n_best": v2.InferParameter(int64_param=2),
                    "length_penalty": v2.InferParameter(string_param="0.6")},
        outputs=[v2.ModelInferRequest.InferRequestedOutputTensor(name="translation")],
    )  # fmt: skip
    out = _outputs(stub.ModelInfer(request))
    assert list(out) == ["translation"] and out["translation"].shape == (4, 1, 2)
    reference = client.translate("tiny-lstm", LETTERS, DecodingOptions(beam_size=3, n_best=2, length_penalty=0.6))
    assert out["translation"].reshape(4, 2).tolist() == [[h.text for h in t.hypotheses] for t in reference]
    # as tritonclient sends options: a Python int as int64_param (here uint64_param too), a float as double_param
    request = v2.ModelInferRequest(model_name="tiny-gru", inputs=[_text("text", ["", "a b c"])], parameters={
        "beam_size": v2.InferParameter(uint64_param=2), "n_best": v2.InferParameter(int64_param=2),
        "length_penalty": v2.InferParameter(double_param=0.6), "max_output_tokens": v2.InferParameter(int64_param=2)})
    blank = _outputs(stub.ModelInfer(request))
    reference = client.translate("tiny-gru", ["a b c"], DecodingOptions(beam_size=2, n_best=2, length_penalty=0.6,
                                                                         max_output_tokens=2))[0]  # fmt: skip
    assert blank["translation"].tolist() == [["", ""], [h.text for h in reference.hypotheses]]
    # a blank text is one empty translation scored 0, without running the model; the second is padding
    assert blank["score"][0].tolist() == [0.0, -np.inf] and blank["score"].dtype == np.float32
    np.testing.assert_allclose(blank["score"][1], [h.score for h in reference.hypotheses], rtol=1e-6)
    assert all(len(h.tokens) <= 2 for h in reference.hypotheses)
    cut = v2.ModelInferRequest(model_name="tiny-gru", inputs=[_text("text", ["a " * 80])],
                               parameters={"truncate": v2.InferParameter(bool_param=True)})  # fmt: skip
    assert _outputs(stub.ModelInfer(cut))["translation"].shape == (1,)  # over the token limit, cut to it


def test_encode_and_next_sentence_match_seqserve_v1(stub, client):
    vectors = _outputs(stub.ModelInfer(_raw_request("tiny-bert", {"text": DOCS})))
    assert list(vectors) == ["embedding"]  # no text_pair: the NSP output cannot be answered, so it is left out
    np.testing.assert_allclose(vectors["embedding"], client.encode("tiny-bert", DOCS), rtol=1e-5, atol=1e-6)
    request = v2.ModelInferRequest(
        model_name="tiny-bert", inputs=[_text("text", DOCS[:2]), _text("text_pair", DOCS[2:])],
        parameters={"pooling": v2.InferParameter(string_param="cls"), "normalize": v2.InferParameter(bool_param=True)},
    )  # fmt: skip
    both = _outputs(stub.ModelInfer(request))
    assert list(both) == ["embedding", "is_next_probability"]
    pairs = list(zip(DOCS[:2], DOCS[2:]))
    np.testing.assert_allclose(both["embedding"], client.encode("tiny-bert", pairs=pairs, pooling="cls",
                                                                normalize=True), rtol=1e-5, atol=1e-6)  # fmt: skip
    np.testing.assert_allclose(both["is_next_probability"], client.score_next_sentence("tiny-bert", pairs), atol=1e-6)
    assert np.allclose(np.linalg.norm(both["embedding"], axis=1), 1.0, atol=1e-5)
    column = _outputs(stub.ModelInfer(v2.ModelInferRequest(model_name="tiny-bert",
                                                           inputs=[_text("text", DOCS[:2], shape=[2, 1])])))
    assert column["embedding"].shape[:2] == (2, 1)  # the input's shape, then the hidden size  # fmt: skip
    np.testing.assert_allclose(column["embedding"][:, 0], vectors["embedding"][:2], rtol=1e-5, atol=1e-6)


def test_draining_not_ready_and_metrics(stub, running, tiny_repository):
    requests = running.server.metrics.registry.get_sample_value
    before = requests("seqserve_requests_total", {"method": "ModelInfer", "model": "tiny-gru"}) or 0.0
    stub.ModelInfer(_raw_request("tiny-gru", {"text": ["a b"]}))
    assert requests("seqserve_requests_total", {"method": "ModelInfer", "model": "tiny-gru"}) == before + 1

    async def draining(value: bool) -> None:  # on the server's loop: the state is an asyncio event
        running.server.state.draining = value

    running.call(draining(True))  # what drain() sets first: no new work, probes still answered
    try:
        assert stub.ServerLive(v2.ServerLiveRequest()).live  # a restart would not help
        assert not stub.ServerReady(v2.ServerReadyRequest()).ready  # send no more work here
        _refused(lambda: stub.ModelInfer(_raw_request("tiny-gru", {"text": ["a"]})), grpc.StatusCode.UNAVAILABLE,
                 "shutting down")  # fmt: skip
        _refused(lambda: stub.ModelReady(v2.ModelReadyRequest(name="tiny-gru")), grpc.StatusCode.UNAVAILABLE)
    finally:
        running.call(draining(False))
    config = ServerConfig(port=0, metrics_port=None, instances=1, threads=1, limits=LIMITS, models=["tiny-gru"])
    with ServerThread(config, ModelRepository(tiny_repository)) as one, grpc.insecure_channel(one.address) as ch:
        only = v2_grpc.GRPCInferenceServiceStub(ch)
        assert only.ServerReady(v2.ServerReadyRequest()).ready
        assert not only.ModelReady(v2.ModelReadyRequest(name="tiny-lstm")).ready  # in the repository, not loaded
        _refused(lambda: only.ModelMetadata(v2.ModelMetadataRequest(name="tiny-lstm")),
                 grpc.StatusCode.FAILED_PRECONDITION, "tiny-lstm version 1 is not ready (state AVAILABLE")  # fmt: skip
        one.call(one.server.manager.unload("tiny-gru", 1))
        assert not only.ServerReady(v2.ServerReadyRequest()).ready  # no version READY
        assert not only.ModelReady(v2.ModelReadyRequest(name="tiny-gru")).ready
        _refused(lambda: only.ModelInfer(_raw_request("tiny-gru", {"text": ["a"]})),
                 grpc.StatusCode.FAILED_PRECONDITION, "not ready")  # fmt: skip


def test_bad_requests_are_refused_with_what_was_wrong(stub, running):
    invalid = grpc.StatusCode.INVALID_ARGUMENT

    def infer(**fields):
        return lambda: stub.ModelInfer(v2.ModelInferRequest(**fields))

    gru, bert = {"model_name": "tiny-gru"}, {"model_name": "tiny-bert"}
    _refused(infer(model_name="nope", inputs=[_text("text", ["a"])]), grpc.StatusCode.NOT_FOUND, "nope")
    _refused(infer(**gru, model_version="one", inputs=[_text("text", ["a"])]), invalid, "'one' is not a version")
    _refused(infer(**gru), invalid, "input text is missing")
    _refused(infer(**gru, inputs=[_text("source", ["a"])]), invalid, "unknown input 'source'", "takes text")
    _refused(infer(**gru, inputs=[_text("text", ["a"]), _text("text", ["b"])]), invalid, "given twice")
    fp32 = v2.ModelInferRequest.InferInputTensor(name="text", datatype="FP32", shape=[1])
    fp32.contents.fp32_contents.append(1.0)
    _refused(infer(**gru, inputs=[fp32]), invalid, "datatype 'FP32'", "BYTES")
    _refused(infer(**gru, inputs=[_text("text", ["a", "b"], shape=[3])]), invalid, "shape [3] means 3 elements",
             "holds 2")  # fmt: skip
    _refused(infer(**gru, inputs=[_text("text", ["a"], shape=[-1])]), invalid, "negative dimension")
    _refused(infer(**gru, inputs=[_text("text", [])], parameters={"beam_size": v2.InferParameter(int64_param=99)}),
             invalid, "beam_size = 99", "limit: 8")  # fmt: skip
    _refused(infer(**gru, inputs=[_text("text", ["a"])], parameters={"beam": v2.InferParameter(int64_param=2)}),
             invalid, "unknown parameter 'beam'", "beam_size")  # fmt: skip
    _refused(infer(**gru, inputs=[_text("text", ["a"])], parameters={"beam_size": v2.InferParameter(
        string_param="4")}), invalid, "beam_size is an integer (int64_param), 1..8")  # fmt: skip
    _refused(infer(**gru, inputs=[_text("text", ["a"])], parameters={"beam_size": v2.InferParameter(
        int64_param=-1)}), invalid, "beam_size = -1 is out of range (limit: 1..8; 0 is taken as 1)")  # fmt: skip
    _refused(infer(**gru, inputs=[_text("text", ["a"])], parameters={"max_output_tokens": v2.InferParameter(
        int64_param=2**40)}), invalid, "max_output_tokens = 1099511627776 is out of range (limit: 0..")  # fmt: skip
    for bad in ("long", " 1_0 ", "nan"):
        _refused(infer(**gru, inputs=[_text("text", ["a"])], parameters={"length_penalty": v2.InferParameter(
            string_param=bad)}), invalid, "length_penalty is a number")  # fmt: skip
    _refused(infer(**gru, inputs=[_text("text", ["a"])], parameters={"length_penalty": v2.InferParameter(
        double_param=float("inf"))}), invalid, "length_penalty = inf is out of range (limit: 0..10)")  # fmt: skip
    _refused(infer(**gru, inputs=[_text("text", ["a"]), _text("text_pair", ["b"])]), invalid,
             "unknown input 'text_pair'; this model takes text")  # fmt: skip
    _refused(infer(**gru, inputs=[_text("text", ["a"])],
                   outputs=[v2.ModelInferRequest.InferRequestedOutputTensor(name="logits")]),
             invalid, "unknown output 'logits'", "translation, score")  # fmt: skip
    _refused(infer(**bert, inputs=[_text("text", ["a"])],
                   outputs=[v2.ModelInferRequest.InferRequestedOutputTensor(name="is_next_probability")]),
             invalid, "needs input text_pair")  # fmt: skip
    _refused(infer(**bert, inputs=[_text("text", ["a", "b"]), _text("text_pair", ["c"])]), invalid,
             "text_pair has 1 elements and text 2")  # fmt: skip
    _refused(infer(**bert, inputs=[_text("text", ["a"])], parameters={"pooling": v2.InferParameter(
        string_param="max")}), invalid, "pooling is one of")  # fmt: skip
    _refused(infer(**gru, inputs=[_text("text", ["a"] * 17)]), invalid,
             "input text has 17 elements (shape [17]), over the limit of 16 texts per request (max_texts)")
    _refused(infer(**gru, inputs=[_text("text", [], shape=[2**20, 2**20])]), invalid, "1099511627776 elements",
             "limit of 16 texts")  # fmt: skip
    details = _refused(infer(**gru, inputs=[_text("text", ["a"], shape=[1] * 3000)]), invalid,
                       "input text has 3000 dimensions, at most 8")  # fmt: skip
    assert len(details) < 200, details  # the client's shape is not echoed back whole
    _refused(infer(**gru, inputs=[_text("text", ["x" * 301])]), invalid,
             "input text: element 0 has 301 characters, over the limit of 300 characters (max_chars_per_text)")
    _refused(infer(**bert, inputs=[_text("text", ["a"]), _text("text_pair", ["x" * 301])]), invalid,
             "input text_pair: element 0 has 301 characters")  # fmt: skip
    _refused(infer(**gru, inputs=[_text("text", ["a", "a " * 80])]), invalid,
             "input text: element 1 has 81 tokens, over the model's limit of 64 tokens", "set parameter truncate")
    _refused(infer(**bert, inputs=[_text("text", ["a " * 40]), _text("text_pair", ["b " * 40])]), invalid,
             "the pair of elements 0 of text and text_pair has", "over the model's limit of 32 tokens",
             "set parameter truncate")  # fmt: skip
    shared = _text("text", ["a"])
    shared.parameters["shared_memory_region"].string_param = "region0"
    _refused(infer(**gru, inputs=[shared]), invalid, "tensor parameters are not supported (got 'shared_memory_region')")
    mixed = _text("text", ["a"])
    mixed.contents.fp32_contents.append(1.0)
    _refused(infer(**gru, inputs=[mixed]), invalid, "contents.fp32_contents given")
    classify = v2.ModelInferRequest.InferRequestedOutputTensor(name="score")
    classify.parameters["classification"].int64_param = 3
    _refused(infer(**gru, inputs=[_text("text", ["a"])], outputs=[classify]), invalid,
             "output parameters are not supported (got 'classification')")  # fmt: skip
    _refused(infer(**bert, inputs=[_text("text", ["a"]), _text("text_pair", ["b"])],
                   outputs=[v2.ModelInferRequest.InferRequestedOutputTensor(name="is_next_probability")],
                   parameters={"pooling": v2.InferParameter(string_param="bogus")}), invalid,
             "pooling is one of")  # checked though only the NSP output is asked for  # fmt: skip
    not_utf8 = v2.ModelInferRequest.InferInputTensor(name="text", datatype="BYTES", shape=[2])
    not_utf8.contents.bytes_contents.extend([b"ok", b"\xff\xfe"])
    _refused(infer(**gru, inputs=[not_utf8]), invalid, "element 1 is not UTF-8")

    def raw(buffer: bytes, count: int = 2, extra: dict | None = None):
        request = v2.ModelInferRequest(model_name="tiny-gru", **(extra or {}))
        request.inputs.add(name="text", datatype="BYTES", shape=[count])
        request.raw_input_contents.append(buffer)
        return lambda: stub.ModelInfer(request)

    good = _pack([b"a b", b"c"])
    assert _outputs(raw(good)())["translation"].shape == (2,)
    _refused(raw(good[:-1]), invalid, "element 1 says 1 bytes but only 0 remain")
    _refused(raw(good[:9]), invalid, "end inside element 1's 4-byte length")
    _refused(raw(good + b"x"), invalid, "1 bytes left over")
    _refused(raw(struct.pack("<I", 2**32 - 1) + b"a", count=1), invalid, "says 4294967295 bytes")
    two_buffers = v2.ModelInferRequest(model_name="tiny-gru", inputs=[_text("text", ["a"])],
                                       raw_input_contents=[good, good])  # fmt: skip
    _refused(lambda: stub.ModelInfer(two_buffers), invalid, "2 raw_input_contents for 1 inputs")
    both = v2.ModelInferRequest(model_name="tiny-gru", inputs=[_text("text", ["a"])], raw_input_contents=[good])
    _refused(lambda: stub.ModelInfer(both), invalid, "contents beside raw_input_contents")
    # after all of that, the server still serves
    assert stub.ServerReady(v2.ServerReadyRequest()).ready
    assert _outputs(stub.ModelInfer(_raw_request("tiny-gru", {"text": ["a b"]})))["translation"].shape == (1,)


def test_reflection_lists_the_standard_service(running):
    with grpc.insecure_channel(running.address) as channel:
        answers = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = {s.name for s in next(answers).list_services_response.service}
    assert "inference.GRPCInferenceService" in names and "seqserve.v1.Inference" in names
