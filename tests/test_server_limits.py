"""Every limit and bad input gets its status code and a message naming the limit, and the server keeps serving."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from seqserve.protos.v1 import seqserve_pb2 as pb
from seqserve.protos.v1 import seqserve_pb2_grpc as pb_grpc
from seqserve.server.config import Limits, ServerConfig
from seqserve.server.repository import ModelRepository
from seqserve.server.served import FILL_MASK_ENTRY_BYTES
from seqserve.server.testing import ServerThread

LIMITS = Limits(max_texts=4, max_chars_per_text=100, max_tokens_per_text=12, max_message_bytes=16 * 1024,
                max_beam_size=4, max_top_k=10, max_queue=3)  # fmt: skip
INVALID, NOT_FOUND, EXHAUSTED = (
    grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED
)  # fmt: skip


@pytest.fixture(scope="module")
def channel(tiny_repository):
    root = tiny_repository if isinstance(tiny_repository, Path) else Path(tiny_repository.root)
    config = ServerConfig(port=0, metrics_port=None, instances=1, threads=1, limits=LIMITS,
                          models=("tiny-lstm", "tiny-bert"))  # fmt: skip
    with ServerThread(config, ModelRepository(root)) as running, grpc.insecure_channel(running.address) as channel:
        yield channel


@pytest.fixture(scope="module")
def inference(channel):
    return pb_grpc.InferenceStub(channel)


def _translate(**fields) -> pb.TranslateRequest:
    fields.setdefault("model", pb.ModelSpec(name="tiny-lstm"))
    return pb.TranslateRequest(**fields)


def _error(call, request) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call(request)
    return info.value.code(), info.value.details()


def test_too_many_texts_is_invalid_argument_naming_the_limit(inference):
    code, details = _error(inference.Translate, _translate(texts=["a"] * 5))
    assert code == INVALID and "5 texts" in details and "limit of 4" in details and "max_texts" in details


def test_too_many_characters_is_invalid_argument_naming_the_limit(inference):
    code, details = _error(inference.Encode, pb.EncodeRequest(model=pb.ModelSpec(name="tiny-bert"), texts=["x" * 101]))
    assert code == INVALID and "101 characters" in details and "100" in details and "max_chars_per_text" in details


def test_too_many_tokens_is_rejected_by_default_with_count_and_limit(inference):
    code, details = _error(inference.Translate, _translate(texts=["a b", "a b c d e f g h a b c d e"]))
    assert code == INVALID and "text 1 has 14 tokens" in details and "limit of 12" in details


def test_truncation_when_asked_cuts_to_the_limit(inference):
    response = inference.Translate(
        _translate(texts=["a b c d e f g h a b c d e"], truncation=pb.TRUNCATION_TRUNCATE)
    )
    assert response.translations[0].source_tokens == 12


def test_truncation_keeps_bert_special_tokens(inference):
    response = inference.Encode(pb.EncodeRequest(
        model=pb.ModelSpec(name="tiny-bert"), texts=["forest five " * 8], truncation=pb.TRUNCATION_TRUNCATE
    ))  # fmt: skip
    assert list(response.token_counts) == [12]


def test_oversized_message_is_resource_exhausted(inference):
    code, details = _error(inference.Translate, _translate(texts=["a" * 20_000]))
    assert code == EXHAUSTED and "16384" in details


def test_a_request_larger_than_the_whole_queue_is_invalid_argument(inference):
    """No retry can make it fit, so not RESOURCE_EXHAUSTED's "retry later" (nothing else was queued)."""
    code, details = _error(inference.Translate, _translate(texts=["a", "b", "c", "d"]))
    assert code == INVALID and "request has 4 sequences" in details and "holds (3, max_queue)" in details
    assert "retry" not in details


def test_beam_over_the_limit_is_invalid_argument(inference):
    code, details = _error(inference.Translate, _translate(texts=["a"], options=pb.DecodingOptions(beam_size=9)))
    assert code == INVALID and "beam_size = 9" in details and "4" in details


def test_n_best_over_the_beam_is_invalid_argument(inference):
    options = pb.DecodingOptions(beam_size=2, n_best=3)
    code, details = _error(inference.Translate, _translate(texts=["a"], options=options))
    assert code == INVALID and "n_best = 3" in details


def test_max_output_tokens_over_the_model_limit_is_invalid_argument(inference):
    options = pb.DecodingOptions(max_output_tokens=1_000_000)
    code, details = _error(inference.Translate, _translate(texts=["a"], options=options))
    assert code == INVALID and "max_output_tokens = 1000000" in details


def test_negative_length_penalty_is_invalid_argument(inference):
    options = pb.DecodingOptions(length_penalty=-1.0)
    code, details = _error(inference.Translate, _translate(texts=["a"], options=options))
    assert code == INVALID and "length_penalty" in details


def test_a_mask_cut_off_by_truncation_is_said_so(inference):
    request = pb.FillMaskRequest(model=pb.ModelSpec(name="tiny-bert"), texts=["forest five " * 7 + "[MASK]"],
                                 truncation=pb.TRUNCATION_TRUNCATE)  # fmt: skip
    code, details = _error(inference.FillMask, request)
    assert code == INVALID and "past the model's limit of 12 tokens" in details and "truncation cut them off" in details


def test_top_k_over_the_limit_is_invalid_argument(inference):
    request = pb.FillMaskRequest(model=pb.ModelSpec(name="tiny-bert"), texts=["forest [MASK]"], top_k=11)
    code, details = _error(inference.FillMask, request)
    assert code == INVALID and "top_k = 11" in details and "10" in details


def test_a_fill_mask_answer_over_the_message_limit_is_refused_before_the_work(tiny_repository):
    """masks x top_k candidates that could not be sent back: RESOURCE_EXHAUSTED naming both, before the model runs (it
    ran, then the server failed to send: a wasted batch and a traceback in the log)."""
    root = tiny_repository if isinstance(tiny_repository, Path) else Path(tiny_repository.root)
    limits = Limits(max_message_bytes=2048, max_top_k=10)
    config = ServerConfig(port=0, metrics_port=None, instances=1, threads=1, limits=limits, models=("tiny-bert",))
    with ServerThread(config, ModelRepository(root)) as running, grpc.insecure_channel(running.address) as ch:
        stub = pb_grpc.InferenceStub(ch)
        request = pb.FillMaskRequest(model=pb.ModelSpec(name="tiny-bert"), texts=["[MASK] " * 8] * 4, top_k=10)
        code, details = _error(stub.FillMask, request)
        assert code == EXHAUSTED and "32 masks x top_k 10" in details and "2048-byte message limit" in details
        small = stub.FillMask(pb.FillMaskRequest(model=pb.ModelSpec(name="tiny-bert"), texts=["forest [MASK]"],
                                                 top_k=10))  # fmt: skip
        candidates = small.results[0].masks[0].candidates
        assert len(candidates) == 10
        # Under the floor estimate (17 x 10 x 12 bytes) but over the limit once computed: refused all the same,
        # RESOURCE_EXHAUSTED with seqserve's message (gRPC's own send failure left a traceback and no metric).
        request = pb.FillMaskRequest(model=pb.ModelSpec(name="tiny-bert"), texts=["[MASK] " * 8] * 2 + ["[MASK]"],
                                     top_k=10)  # fmt: skip
        code, details = _error(stub.FillMask, request)
        assert code == EXHAUSTED and "the answer takes" in details and "2048-byte message limit" in details
        errors = running.server.metrics.registry.get_sample_value(
            "seqserve_errors_total", {"method": "FillMask", "code": "RESOURCE_EXHAUSTED"}
        )
        assert errors == 2
        # Encode's vectors alone (texts x hidden x 4 bytes) are known before any work
        encode = pb.EncodeRequest(model=pb.ModelSpec(name="tiny-bert"), texts=["forest"] * 40)
        code, details = _error(stub.Encode, encode)
        assert code == EXHAUSTED and "40 texts x" in details and "send fewer texts" in details
        # The estimate is a floor: every real candidate (with its 2 bytes of framing) takes at least that much.
        assert min(c.ByteSize() + 2 for c in candidates) >= FILL_MASK_ENTRY_BYTES


def test_more_texts_than_a_request_may_hold_is_invalid_argument_whatever_the_answer_size(inference):
    # 200 vectors would also be over the 16 KiB message limit; the count is the request's fault, INVALID_ARGUMENT,
    # which no client retries (RESOURCE_EXHAUSTED was answered first, and clients retry that one as a full queue).
    encode = pb.EncodeRequest(model=pb.ModelSpec(name="tiny-bert"), texts=["a"] * 200)
    code, details = _error(inference.Encode, encode)
    assert code == INVALID and "request has 200 texts" in details and "(max_texts)" in details


def test_fill_mask_without_a_mask_is_invalid_argument(inference):
    request = pb.FillMaskRequest(model=pb.ModelSpec(name="tiny-bert"), texts=["forest five"])
    code, details = _error(inference.FillMask, request)
    assert code == INVALID and "[MASK]" in details


def test_texts_and_pairs_together_are_invalid_argument(inference):
    request = pb.EncodeRequest(
        model=pb.ModelSpec(name="tiny-bert"), texts=["a"], pairs=[pb.TextPair(first="a", second="b")]
    )
    code, details = _error(inference.Encode, request)
    assert code == INVALID and "not both" in details


def test_unknown_enum_value_is_invalid_argument(inference):
    request = pb.EncodeRequest(model=pb.ModelSpec(name="tiny-bert"), texts=["a"], pooling=7)
    code, details = _error(inference.Encode, request)
    assert code == INVALID and "pooling" in details


def test_a_task_the_model_lacks_is_invalid_argument(inference):
    code, details = _error(inference.Translate, _translate(model=pb.ModelSpec(name="tiny-bert"), texts=["a"]))
    assert code == INVALID and "does not serve translate" in details and "encode" in details


def test_unknown_model_is_not_found_listing_what_exists(inference):
    code, details = _error(inference.Translate, _translate(model=pb.ModelSpec(name="no-such"), texts=["a"]))
    assert code == NOT_FOUND and "no-such" in details and "tiny-lstm" in details and "tiny-bert" in details


def test_unknown_version_is_not_found_listing_versions(inference):
    request = _translate(model=pb.ModelSpec(name="tiny-lstm", version=7), texts=["a"])
    code, details = _error(inference.Translate, request)
    assert code == NOT_FOUND and "version 7" in details and "tiny-lstm" in details


@pytest.mark.parametrize("name", ["a" * 256, "A" * 3000, "tiny-lstm\n", "x\x00y"])
def test_an_impossible_model_name_is_not_found_cut_and_escaped(inference, channel, name):
    # Over the file system's name length (it raised OSError: INTERNAL), larger than gRPC's metadata limit when echoed
    # whole (the client got RESOURCE_EXHAUSTED), or with control characters (written raw into the log).
    code, details = _error(inference.Translate, _translate(model=pb.ModelSpec(name=name), texts=["a"]))
    assert code == NOT_FOUND and "tiny-lstm (versions" in details
    assert len(details) < 1000 and "\n" not in details.split(";")[0] and "\x00" not in details
    models = pb_grpc.ModelsStub(channel)
    with pytest.raises(grpc.RpcError) as info:
        models.LoadModel(pb.LoadModelRequest(model=pb.ModelSpec(name=name)), timeout=10)
    assert info.value.code() == NOT_FOUND and len(info.value.details()) < 1000


def test_model_in_the_repository_but_not_loaded_is_failed_precondition(inference):
    """Not UNAVAILABLE: only a LoadModel helps, and clients retry UNAVAILABLE until their deadline."""
    request = _translate(model=pb.ModelSpec(name="tiny-gru"), texts=["a"])
    code, details = _error(inference.Translate, request)
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "tiny-gru" in details and "AVAILABLE" in details


def test_invalid_utf8_in_a_string_field_is_refused_without_crashing(inference, channel):
    # A hand-made TranslateRequest whose text bytes are not UTF-8, sent raw (no serializer on this call).
    raw = pb.TranslateRequest(model=pb.ModelSpec(name="tiny-lstm"), texts=["ab"]).SerializeToString()
    assert b"\x12\x02ab" in raw
    call = channel.unary_unary("/seqserve.v1.Inference/Translate")
    with pytest.raises(grpc.RpcError) as info:
        call(raw.replace(b"\x12\x02ab", b"\x12\x02\xff\xfe"), timeout=10)
    assert info.value.code() == INVALID and "TranslateRequest" in info.value.details()


def test_garbage_bytes_are_refused_without_crashing(channel):
    call = channel.unary_unary("/seqserve.v1.Inference/Encode")
    with pytest.raises(grpc.RpcError) as info:
        call(b"\xff\xff\xff\xff\x0f", timeout=10)
    assert info.value.code() == INVALID and "Encode" in info.value.details()


@pytest.mark.parametrize("bad", [b"\x1a\x02\xff\xfe", b"\xff\xff\xff"])  # text not UTF-8; not a message
def test_an_unparsable_stream_item_ends_the_stream_with_invalid_argument_not_a_hang(channel, bad):
    good = pb.TranslateStreamRequest(id="1", model=pb.ModelSpec(name="tiny-lstm"), text="a b c").SerializeToString()
    call = channel.stream_stream("/seqserve.v1.Inference/TranslateStream",
                                 response_deserializer=pb.TranslateStreamResponse.FromString)  # fmt: skip
    responses = call(iter([good, bad]), timeout=30)
    got = []
    with pytest.raises(grpc.RpcError) as info:
        for response in responses:
            got.append(response)
    assert info.value.code() == INVALID, info.value.details()  # not DEADLINE_EXCEEDED: the stream ended at once
    assert "stream item of" in info.value.details() and "TranslateStream" in info.value.details()
    assert [r.id for r in got] in ([], ["1"])  # the item before it may have been answered first


def test_server_still_serves_after_every_bad_request(inference):
    # Runs last in this module: the same server has refused every request above.
    after = inference.Translate(_translate(texts=["a b c"]))
    assert after.translations[0].hypotheses[0].text.split() == ["c", "b", "a"]
    vectors = inference.Encode(pb.EncodeRequest(model=pb.ModelSpec(name="tiny-bert"), texts=["forest"]))
    assert list(vectors.embeddings.shape)[0] == 1 and len(vectors.embeddings.data) > 0


def test_an_abort_after_the_deadline_passed_unwinds_quietly_and_a_live_one_is_sent(caplog):
    """errors.abort_call: gRPC's core cannot send a status on a call whose deadline passed meanwhile and raised an
    internal error there (logged with a traceback, one per request of a short-deadline storm); such a call now
    unwinds as cancelled, and a live call still gets its status and message."""
    import asyncio
    import logging
    import time

    from seqserve.server.errors import abort_call

    outcomes: list[str] = []

    async def late(request: bytes, context) -> bytes:
        time.sleep(0.3)  # a busy loop: the 0.1 s deadline passes before the handler answers
        try:
            await abort_call(context, grpc.StatusCode.INVALID_ARGUMENT, "too late to say")
        except asyncio.CancelledError:
            outcomes.append("cancelled")
            raise
        except BaseException as exc:
            outcomes.append(type(exc).__name__)
            raise
        return b""

    async def live(request: bytes, context) -> bytes:
        await abort_call(context, grpc.StatusCode.INVALID_ARGUMENT, "said")
        return b""

    def same(data: bytes) -> bytes:
        return data

    handlers = {name: grpc.unary_unary_rpc_method_handler(f, request_deserializer=same, response_serializer=same)
                for name, f in (("late", late), ("live", live))}  # fmt: skip

    async def run() -> tuple[dict[str, int], grpc.aio.AioRpcError]:
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("t.T", handlers),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        codes: dict[str, int] = {}
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                for _ in range(3):
                    try:
                        await channel.unary_unary("/t.T/late")(b"x", timeout=0.1)
                    except grpc.aio.AioRpcError as exc:
                        codes[exc.code().name] = codes.get(exc.code().name, 0) + 1
                await asyncio.sleep(0.4)
                try:
                    await channel.unary_unary("/t.T/live")(b"x", timeout=5)
                except grpc.aio.AioRpcError as exc:
                    return codes, exc
        finally:
            await server.stop(0)
        raise AssertionError("the live call was not aborted")

    caplog.set_level(logging.DEBUG, logger="seqserve.server.errors")
    caplog.set_level(logging.WARNING)
    codes, live_error = asyncio.run(run())
    assert codes == {"DEADLINE_EXCEEDED": 3}
    assert outcomes and set(outcomes) == {"cancelled"}, outcomes  # not gRPC's internal error, not a sent abort
    assert live_error.code() == grpc.StatusCode.INVALID_ARGUMENT and live_error.details() == "said"
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
