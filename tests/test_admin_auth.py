"""The server's interceptors on real servers: model management behind the admin token (or turned off) while everything
else stays open, and requests refused before any servicer runs (no token, unparsable bytes) counted in the metrics."""

from __future__ import annotations

import logging
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from seqserve.cli import build_command_parser
from seqserve.clients import Client, SeqServeError
from seqserve.protos.v1 import seqserve_pb2 as pb
from seqserve.protos.v1 import seqserve_pb2_grpc as pb_grpc
from seqserve.server.cli import config_from_args
from seqserve.server.config import ServerConfig
from seqserve.server.interceptors import server_interceptors
from seqserve.server.metrics import Metrics
from seqserve.server.repository import ModelRepository
from seqserve.server.testing import ServerThread

MODEL = "tiny-lstm"
TOKEN = "s3cret-admin-token"


def _config(**kwargs) -> ServerConfig:
    return ServerConfig(port=0, metrics_port=None, instances=1, threads=1, models=(MODEL,), **kwargs)


@pytest.fixture(scope="module")
def guarded(tiny_repository: Path):
    with ServerThread(_config(admin_token=TOKEN), ModelRepository(tiny_repository)) as server:
        yield server


@pytest.fixture(scope="module")
def channel(guarded):
    with grpc.insecure_channel(guarded.address) as ch:
        yield ch


def _errors(server: ServerThread, method: str, code: str) -> float:
    labels = {"method": method, "code": code}
    return server.server.metrics.registry.get_sample_value("seqserve_errors_total", labels) or 0.0


def _requests(server: ServerThread, method: str, model: str) -> float:
    labels = {"method": method, "model": model}
    return server.server.metrics.registry.get_sample_value("seqserve_requests_total", labels) or 0.0


def _translates(client: Client) -> bool:
    return client.translate(MODEL, ["a b c"])[0].text.split() == ["c", "b", "a"]


def test_unload_without_a_token_is_unauthenticated_and_the_model_keeps_serving(guarded):
    with Client(guarded.address, timeout_s=30) as client:
        before = _errors(guarded, "UnloadModel", "UNAUTHENTICATED")
        with pytest.raises(SeqServeError) as caught:
            client.unload_model(MODEL)
        assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED
        assert "Bearer" in caught.value.message and "--token" in caught.value.message
        assert _errors(guarded, "UnloadModel", "UNAUTHENTICATED") == before + 1  # counted like other refusals
        assert _translates(client)


def test_a_wrong_token_is_permission_denied(guarded):
    with Client(guarded.address, timeout_s=30, token="not-the-token") as client:
        for call in (client.unload_model, client.load_model):
            with pytest.raises(SeqServeError) as caught:
                call(MODEL)
            assert caught.value.code == grpc.StatusCode.PERMISSION_DENIED
            assert "admin token" in caught.value.message and TOKEN not in caught.value.message
        assert _translates(client)


def test_a_malformed_authorization_header_is_unauthenticated(channel):
    models = pb_grpc.ModelsStub(channel)
    request = pb.UnloadModelRequest(model=pb.ModelSpec(name=MODEL))
    for value in (f"Basic {TOKEN}", TOKEN, "Bearer "):
        with pytest.raises(grpc.RpcError) as caught:
            models.UnloadModel(request, metadata=(("authorization", value),), timeout=10)
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED, value
        assert "malformed" in caught.value.details() or "needs the admin token" in caught.value.details()


def test_the_client_token_option_unloads_and_loads(guarded):
    with Client(guarded.address, timeout_s=60, token=TOKEN) as client:
        assert client.unload_model(MODEL).state == "AVAILABLE"
        with pytest.raises(SeqServeError) as caught:
            client.translate(MODEL, ["a b c"])
        assert caught.value.code == grpc.StatusCode.FAILED_PRECONDITION  # the unload really happened
        assert client.load_model(MODEL).state == "READY"
        assert _translates(client)


def test_inference_listing_and_health_stay_open_without_a_token(guarded, channel):
    with Client(guarded.address, timeout_s=30) as client:
        assert _translates(client)
        assert MODEL in {m.name for m in client.list_models()}
        assert client.health() == "SERVING"
    health = health_pb2_grpc.HealthStub(channel)
    assert health.Check(health_pb2.HealthCheckRequest(service=MODEL), timeout=10).status == 1  # SERVING


def test_the_token_is_checked_before_the_request_is_parsed(channel):
    call = channel.unary_unary("/seqserve.v1.Models/UnloadModel")
    with pytest.raises(grpc.RpcError) as caught:
        call(b"\xff\xff\xff", timeout=10)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_with_management_turned_off_load_and_unload_are_denied_even_with_the_token(tiny_repository: Path):
    with ServerThread(_config(admin_token=TOKEN, admin=False), ModelRepository(tiny_repository)) as server:
        with Client(server.address, timeout_s=30, token=TOKEN) as client:
            for call in (client.unload_model, client.load_model):
                with pytest.raises(SeqServeError) as caught:
                    call(MODEL)
                assert caught.value.code == grpc.StatusCode.PERMISSION_DENIED
                assert "--no-admin" in caught.value.message
            assert [m.state for m in client.list_models(MODEL)] == ["READY"]
            assert _translates(client)


def test_the_command_line_takes_the_token_from_the_environment_or_a_file(monkeypatch, tmp_path: Path):
    parser, _ = build_command_parser("serve")
    monkeypatch.setenv("SEQSERVE_ADMIN_TOKEN", "from-env")
    assert config_from_args(parser.parse_args(["--repository", "r"])).admin_token == "from-env"
    token_file = tmp_path / "admin-token"
    token_file.write_text(f"{TOKEN}\n", encoding="utf-8")
    args = parser.parse_args(["--repository", "r", "--admin-token-file", str(token_file)])
    assert config_from_args(args).admin_token == TOKEN
    monkeypatch.delenv("SEQSERVE_ADMIN_TOKEN")
    assert config_from_args(parser.parse_args(["--repository", "r"])).admin_token is None


@pytest.mark.parametrize(
    "host, token, admin, warned",
    [("[::]", None, True, True), ("0.0.0.0", None, True, True), ("10.1.2.3", None, True, True),
     ("127.0.0.1", None, True, False), ("[::1]", None, True, False), ("localhost", None, True, False),
     ("[::]", TOKEN, True, False), ("[::]", None, False, False)],
)  # fmt: skip
def test_open_management_on_a_reachable_address_is_warned_about(
    host: str, token: str | None, admin: bool, warned: bool, caplog: pytest.LogCaptureFixture
):
    with caplog.at_level(logging.WARNING, logger="seqserve.server.interceptors"):
        server_interceptors(ServerConfig(host=host, admin_token=token, admin=admin), Metrics())
    assert any("open to every client" in r.getMessage() for r in caplog.records) == warned


def test_an_unparsable_request_is_counted_as_a_request_and_an_invalid_argument_error(guarded, channel):
    before = (_requests(guarded, "Translate", "other"), _errors(guarded, "Translate", "INVALID_ARGUMENT"),
              _requests(guarded, "ListModels", ""), _errors(guarded, "ListModels", "INVALID_ARGUMENT"))  # fmt: skip
    for method in ("/seqserve.v1.Inference/Translate", "/seqserve.v1.Models/ListModels"):
        with pytest.raises(grpc.RpcError) as caught:
            channel.unary_unary(method)(b"\xff\xff\xff\xff\x0f", timeout=10)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    after = (_requests(guarded, "Translate", "other"), _errors(guarded, "Translate", "INVALID_ARGUMENT"),
             _requests(guarded, "ListModels", ""), _errors(guarded, "ListModels", "INVALID_ARGUMENT"))  # fmt: skip
    # A request naming a model counts under "other" (as an unknown name does); one naming none under "".
    assert [a - b for a, b in zip(after, before)] == [1, 1, 1, 1]


def test_an_unparsable_stream_item_counts_as_a_request_and_an_error(guarded, channel):
    """TranslateStream counts items: the unparsable one is a request (of an unknown model) and its error, so the
    error rate never passes 100 %."""
    before = _requests(guarded, "TranslateStream", "other"), _errors(guarded, "TranslateStream", "INVALID_ARGUMENT")
    call = channel.stream_stream("/seqserve.v1.Inference/TranslateStream")
    with pytest.raises(grpc.RpcError) as caught:
        for _ in call(iter([b"\xff\xff\xff"]), timeout=30):
            pass
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    after = _requests(guarded, "TranslateStream", "other"), _errors(guarded, "TranslateStream", "INVALID_ARGUMENT")
    assert after == (before[0] + 1, before[1] + 1)
