"""The client library against real seqserve servers on local ports: every method sync and async, retries, errors.

The models come from the `tiny_repository` fixture (tests/conftest.py); tests find them by capability.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from seqserve.clients import AsyncClient, Client, DecodingOptions, RetryPolicy, SeqServeError, TLSConfig
from seqserve.server.config import ServerConfig
from seqserve.server.repository import ModelRepository
from seqserve.server.testing import ServerThread

FAST_RETRY = RetryPolicy(attempts=40, initial_backoff_s=0.05, max_backoff_s=0.2)


# --------------------------------------------------------------------------------------------------------------
# Real servers on local ports


def start_server(repository: Path, port: int = 0, models: tuple[str, ...] = ()) -> ServerThread:
    """seqserve's own server (create_server) on its event loop in a background thread: the client blocks this one."""
    config = ServerConfig(port=port, metrics_port=None, instances=1, threads=1, grace_period_s=1, models=models)
    return ServerThread(config, ModelRepository(Path(repository)))


class CountingInterceptor(grpc.UnaryUnaryClientInterceptor):
    """Counts the attempts a Client makes per method (a real grpc interceptor on the real channel)."""

    def __init__(self):
        self.calls: dict[str, int] = {}

    def intercept_unary_unary(self, continuation, client_call_details, request):
        name = client_call_details.method.rsplit("/", 1)[-1]
        self.calls[name] = self.calls.get(name, 0) + 1
        return continuation(client_call_details, request)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def empty_server(tmp_path_factory):
    server = start_server(tmp_path_factory.mktemp("empty_repository"))
    yield server
    server.stop()


# --------------------------------------------------------------------------------------------------------------
# Retries, deadlines, errors (no models needed)


def test_client_started_before_server_retries_until_it_answers(tmp_path):
    port = free_port()
    counter = CountingInterceptor()
    servers: list[ServerThread] = []
    starter = threading.Timer(0.6, lambda: servers.append(start_server(tmp_path, port)))
    starter.start()
    try:
        with Client(f"127.0.0.1:{port}", retry=FAST_RETRY, timeout_s=30, interceptors=(counter,)) as client:
            assert client.list_models() == []
        assert counter.calls["ListModels"] > 1
    finally:
        starter.join()
        for server in servers:
            server.stop()


def test_call_survives_server_restart_on_same_port(tmp_path):
    first = start_server(tmp_path)
    port = first.port
    counter = CountingInterceptor()
    with Client(first.address, retry=FAST_RETRY, timeout_s=30, interceptors=(counter,)) as client:
        assert client.health() == "SERVING"
        first.stop()
        servers: list[ServerThread] = []
        restarter = threading.Timer(0.5, lambda: servers.append(start_server(tmp_path, port)))
        restarter.start()
        try:
            assert client.health() == "SERVING"
            assert counter.calls["Check"] > 2  # one before the stop, at least one refused, the one that got through
        finally:
            restarter.join()
            for server in servers:
                server.stop()


def test_unavailable_gives_up_after_configured_attempts():
    counter = CountingInterceptor()
    policy = RetryPolicy(attempts=3, initial_backoff_s=0.01, max_backoff_s=0.01)
    with Client(f"127.0.0.1:{free_port()}", retry=policy, timeout_s=10, interceptors=(counter,)) as client:
        with pytest.raises(SeqServeError) as failure:
            client.list_models()
    assert failure.value.code == grpc.StatusCode.UNAVAILABLE
    assert counter.calls["ListModels"] == 3


def test_default_policy_retries_until_a_server_started_seconds_later_answers(tmp_path):
    port = free_port()
    servers: list[ServerThread] = []
    starter = threading.Timer(2.5, lambda: servers.append(start_server(tmp_path, port)))  # the old window: 1.5 s
    starter.start()
    try:
        with Client(f"127.0.0.1:{port}", timeout_s=30) as client:
            assert client.list_models() == []
    finally:
        starter.join()
        for server in servers:
            server.stop()


def test_retries_without_a_cap_use_the_whole_deadline():
    started = time.monotonic()
    with Client(f"127.0.0.1:{free_port()}", retry=RetryPolicy(initial_backoff_s=0.1, max_backoff_s=2.0)) as client:
        with pytest.raises(SeqServeError) as failure:
            client.list_models(timeout=2.0)
    elapsed = time.monotonic() - started
    assert failure.value.code == grpc.StatusCode.UNAVAILABLE and "at the deadline" in failure.value.message
    assert 1.8 <= elapsed < 3.0


def test_unknown_model_raises_not_found_once(empty_server):
    counter = CountingInterceptor()
    with Client(empty_server.address, retry=FAST_RETRY, interceptors=(counter,)) as client:
        with pytest.raises(SeqServeError) as failure:
            client.translate("no-such-model", ["hello"])
    assert failure.value.code == grpc.StatusCode.NOT_FOUND
    assert "no-such-model" in failure.value.message
    assert counter.calls["Translate"] == 1


def test_timeout_bounds_all_attempts_together():
    policy = RetryPolicy(attempts=1000, initial_backoff_s=0.05, max_backoff_s=0.05)
    started = time.monotonic()
    with Client(f"127.0.0.1:{free_port()}", retry=policy) as client:
        with pytest.raises(SeqServeError) as failure:
            client.list_models(timeout=0.5)
    assert failure.value.code == grpc.StatusCode.UNAVAILABLE
    assert time.monotonic() - started < 2.0


def test_async_client_retries_until_server_answers(tmp_path):
    port = free_port()
    servers: list[ServerThread] = []
    starter = threading.Timer(0.5, lambda: servers.append(start_server(tmp_path, port)))

    async def call() -> str:
        async with AsyncClient(f"127.0.0.1:{port}", retry=FAST_RETRY, timeout_s=30) as client:
            starter.start()
            return await client.health()

    try:
        assert asyncio.run(call()) == "SERVING"
    finally:
        starter.join()
        for server in servers:
            server.stop()


def test_error_carries_status_code_and_server_message(empty_server):
    with Client(empty_server.address) as client:
        with pytest.raises(SeqServeError) as failure:
            client.encode("missing", ["text"])
    assert failure.value.code == grpc.StatusCode.NOT_FOUND
    assert str(failure.value).startswith("NOT_FOUND: ")


def test_client_modules_import_no_torch():
    code = (
        "import sys\n"
        "import seqserve.clients, seqserve.clients.cli, seqserve.clients.aio, seqserve.clients.translate_file\n"
        "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith(('torch.', 'seqserve.models',"
        " 'seqserve.export', 'seqserve.server')))\n"
        "print(bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


# --------------------------------------------------------------------------------------------------------------
# Every method round-trips against the tiny trained models


SOURCES = ["a c b", "d e f g", "h a b c d", "b b a"]  # the tiny translators reverse letter sequences


@pytest.fixture(scope="module")
def model_server(tiny_repository):
    server = start_server(Path(tiny_repository))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(model_server):
    with Client(model_server.address, timeout_s=60) as client:
        yield client


@pytest.fixture(scope="module")
def models(client) -> dict[str, str]:
    """capability -> the name of a ready model that has it."""
    found: dict[str, str] = {}
    for info in sorted(client.list_models(), key=lambda m: m.name):
        if info.state == "READY":
            for capability in info.capabilities:
                found.setdefault(capability, info.name)
    assert {"encode", "translate", "nsp", "fill_mask"} <= set(found), found
    return found


def test_list_models_reports_ready_versions_with_manifest_summary(client, models):
    infos = {info.name: info for info in client.list_models()}
    translator = infos[models["translate"]]
    assert translator.state == "READY" and translator.version >= 1
    assert translator.task == "translation" and translator.architecture
    assert infos[models["nsp"]].task == "bert"
    assert [info.name for info in client.list_models(models["translate"])] == [models["translate"]]


def test_encode_returns_one_float32_row_per_text(client, models):
    vectors = client.encode(models["encode"], SOURCES[:3])
    assert vectors.dtype == np.float32 and vectors.ndim == 2 and vectors.shape[0] == 3
    assert np.all(np.isfinite(vectors)) and vectors.flags.writeable


def test_encode_normalize_equals_rows_divided_by_their_norms(client, models):
    raw = client.encode(models["encode"], SOURCES)
    unit = client.encode(models["encode"], SOURCES, normalize=True)
    np.testing.assert_allclose(unit, raw / np.linalg.norm(raw, axis=1, keepdims=True), rtol=1e-4, atol=1e-5)


def test_encode_pairs_and_pooling_choices(client, models):
    pairs = [("a b c", "d e"), ("f g", "h")]
    assert client.encode(models["encode"], pairs=pairs).shape[0] == 2
    cls, mean = (client.encode(models["encode"], SOURCES[:2], pooling=p) for p in ("cls", "mean"))
    assert cls.shape == mean.shape and not np.allclose(cls, mean)


def test_translate_returns_one_result_per_text_in_order(client, models):
    together = client.translate(models["translate"], SOURCES)
    alone = [client.translate(models["translate"], [text])[0] for text in SOURCES]
    assert [r.text for r in together] == [r.text for r in alone]
    assert all(r.source_tokens > 0 and r.model.name == models["translate"] for r in together)


def test_one_client_shared_by_threads_and_one_async_client_by_tasks_answer_each_caller_its_own(model_server, client,
                                                                                               models):
    """A web app's pattern: one client for every worker. Each caller gets the answer to its own request, the same as
    when it asks alone."""
    from concurrent.futures import ThreadPoolExecutor

    pairs = [(a, b) for a in SOURCES for b in SOURCES]
    translations = {text: client.translate(models["translate"], [text])[0].text for text in SOURCES}
    vectors = {text: client.encode(models["encode"], [text])[0] for text in SOURCES}
    scores = {pair: client.score_next_sentence(models["nsp"], [pair])[0] for pair in pairs}

    def ask(i: int) -> None:
        text, pair = SOURCES[i % len(SOURCES)], pairs[i % len(pairs)]
        assert client.translate(models["translate"], [text])[0].text == translations[text]
        np.testing.assert_allclose(client.encode(models["encode"], [text])[0], vectors[text], rtol=1e-4, atol=1e-5)
        assert client.score_next_sentence(models["nsp"], [pair])[0] == pytest.approx(scores[pair], abs=1e-4)

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(ask, range(64)))  # re-raises a caller's failed assertion

    async def tasks() -> list[str]:
        async with AsyncClient(model_server.address, timeout_s=60) as shared:
            answers = await asyncio.gather(*(shared.translate(models["translate"], [SOURCES[i % len(SOURCES)]])
                                             for i in range(64)))  # fmt: skip
        return [a[0].text for a in answers]

    assert asyncio.run(tasks()) == [translations[SOURCES[i % len(SOURCES)]] for i in range(64)]


def test_translate_n_best_gives_hypotheses_best_first_with_token_scores(client, models):
    options = DecodingOptions(beam_size=3, n_best=3, return_token_scores=True)
    (result,) = client.translate(models["translate"], [SOURCES[0]], options)
    scores = [h.score for h in result.hypotheses]
    assert len(scores) == 3 and scores == sorted(scores, reverse=True)
    assert all(len(h.token_scores) == len(h.tokens) + 1 for h in result.hypotheses)  # tokens and EOS


def test_translate_stream_answers_every_id_like_translate(client, models):
    texts = {f"line-{i}": SOURCES[i % len(SOURCES)] for i in range(10)}
    answers = {r.id: r for r in client.translate_stream(models["translate"], texts.items(), window=3)}
    expected = {t: r.text for t, r in zip(SOURCES, client.translate(models["translate"], SOURCES))}
    assert set(answers) == set(texts)
    assert all(answers[i].error is None and answers[i].translation.text == expected[texts[i]] for i in texts)


def test_translate_stream_keeps_at_most_window_items_in_flight(client, models):
    pulled = 0

    def items():
        nonlocal pulled
        for i in range(12):
            pulled += 1
            yield str(i), SOURCES[i % len(SOURCES)]

    in_flight = []
    for received, _ in enumerate(client.translate_stream(models["translate"], items(), window=3), start=1):
        in_flight.append(pulled - (received - 1))  # items read but unanswered before this answer arrived
    assert len(in_flight) == 12 and max(in_flight) <= 3


def test_async_translate_stream_keeps_at_most_window_items_in_flight(model_server, models):
    pulled = 0

    async def items():
        nonlocal pulled
        for i in range(12):
            pulled += 1
            yield str(i), SOURCES[i % len(SOURCES)]

    async def stream() -> list[int]:
        in_flight = []
        async with AsyncClient(model_server.address) as aclient:
            async for result in aclient.translate_stream(models["translate"], items(), window=3):
                in_flight.append(pulled - len(in_flight))
        return in_flight

    in_flight = asyncio.run(stream())
    assert len(in_flight) == 12 and max(in_flight) <= 3


def test_translate_stream_reports_a_failed_item_and_goes_on(client, models):
    too_long = " ".join(["word"] * 5000)
    items = [("ok-1", SOURCES[0]), ("bad", too_long), ("ok-2", SOURCES[1])]
    answers = {r.id: r for r in client.translate_stream(models["translate"], items)}
    assert answers["bad"].error is not None and answers["bad"].error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert answers["ok-1"].translation is not None and answers["ok-2"].translation is not None


class SourceFailed(Exception):
    """Raised by a caller's own item source."""


def failing_items():
    yield "0", SOURCES[0]
    yield "1", SOURCES[1]
    raise SourceFailed("the caller's source failed")


def test_translate_stream_reraises_the_callers_own_exception(client, models):
    with pytest.raises(SourceFailed, match="caller's source failed"):
        list(client.translate_stream(models["translate"], failing_items(), window=4))


def test_translate_stream_refuses_a_malformed_item_before_sending_it(client, models):
    for malformed in [(1, "a b"), ("1",), ("1", None), "1a"]:
        with pytest.raises(TypeError, match=r"\(id, text\) pairs of str"):
            list(client.translate_stream(models["translate"], [("0", SOURCES[0]), malformed]))


def test_translate_stream_refuses_an_id_still_in_flight_and_takes_one_already_answered(model_server, client, models):
    """Two items in flight with one id could not be told apart; once answered, an id may come again."""
    model = models["translate"]
    # Sent as fast as the window lets: the reader would have to lose every race with the answers to miss them all.
    same = [("a", SOURCES[i % len(SOURCES)]) for i in range(50)]
    with pytest.raises(ValueError, match="'a' is already in flight"):
        list(client.translate_stream(model, same, window=16))

    async def consume(items, window: int) -> list[str]:
        async with AsyncClient(model_server.address) as aclient:
            return [r.id async for r in aclient.translate_stream(model, items, window=window)]

    with pytest.raises(ValueError, match="'a' is already in flight"):
        asyncio.run(asyncio.wait_for(consume(same, 16), 20))
    # A window of one: each item is answered before the next is read, so reusing the id is unambiguous.
    again = [("a", SOURCES[0]), ("a", SOURCES[1])]
    assert [r.id for r in client.translate_stream(model, again, window=1)] == ["a", "a"]
    assert asyncio.run(asyncio.wait_for(consume(again, 1), 20)) == ["a", "a"]


def test_async_translate_stream_reraises_a_source_error_instead_of_hanging(model_server, models):
    async def failing():
        for item in failing_items():
            yield item

    async def consume(items) -> list[str]:
        async with AsyncClient(model_server.address) as aclient:
            return [r.id async for r in aclient.translate_stream(models["translate"], items, window=4)]

    with pytest.raises(SourceFailed):
        asyncio.run(asyncio.wait_for(consume(failing()), 20))  # a hang would end as TimeoutError
    with pytest.raises(TypeError, match="pairs of str"):
        asyncio.run(asyncio.wait_for(consume([("1", SOURCES[0]), (2, SOURCES[1])]), 20))


def test_a_single_str_where_texts_are_expected_is_a_type_error(model_server, client, models):
    calls = [
        lambda c: c.encode(models["encode"], "a b c"),
        lambda c: c.encode(models["encode"], pairs=("a b", "c d")),
        lambda c: c.translate(models["translate"], "a b"),
        lambda c: c.translate(models["translate"], b"a b"),
        lambda c: c.fill_mask(models["fill_mask"], "a [MASK] runs"),
        lambda c: c.score_next_sentence(models["nsp"], "a b"),
        lambda c: list(c.translate_stream(models["translate"], "ab")),
    ]
    for call in calls:
        with pytest.raises(TypeError, match="not a single|pair of str"):
            call(client)

    async def call_async(call):
        async with AsyncClient(model_server.address) as aclient:
            result = call(aclient)
            if hasattr(result, "__aiter__"):
                return [r async for r in result]
            return await result

    for call in calls[:6] + [lambda c: c.translate_stream(models["translate"], "ab")]:
        with pytest.raises(TypeError, match="not a single|pair of str"):
            asyncio.run(call_async(call))


def test_score_next_sentence_gives_one_probability_per_pair(client, models):
    pairs = [("the cat sat", "on the mat"), ("a dog runs", "hello world"), ("the house", "is small")]
    probabilities = client.score_next_sentence(models["nsp"], pairs)
    assert len(probabilities) == 3 and all(0.0 <= p <= 1.0 for p in probabilities)


def test_fill_mask_gives_top_k_per_mask_most_likely_first(client, models):
    results = client.fill_mask(models["fill_mask"], ["the [MASK] sat on the [MASK]", "a [MASK] runs"], top_k=4)
    assert [len(masks) for masks in results] == [2, 1]
    for masks in results:
        for candidates in masks:
            probabilities = [c.probability for c in candidates]
            assert len(candidates) == 4 and probabilities == sorted(probabilities, reverse=True)


def test_unload_then_load_changes_state_and_serving(model_server, client, models):
    name = models["nsp"]
    try:
        assert client.unload_model(name).state in ("AVAILABLE", "UNLOADING")
        assert client.health(name) == "NOT_SERVING"
        started = time.monotonic()
        with pytest.raises(SeqServeError) as failure:  # the default retry policy: not retried for a deadline's length
            client.score_next_sentence(name, [("a", "b")])
        assert failure.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert "LoadModel loads it" in failure.value.message
        assert time.monotonic() - started < 5
    finally:
        assert client.load_model(name).state == "READY"
    assert client.health(name) == "SERVING"


def test_invalid_argument_is_not_retried(model_server, models):
    counter = CountingInterceptor()
    with Client(model_server.address, retry=FAST_RETRY, interceptors=(counter,)) as client:
        with pytest.raises(SeqServeError) as failure:
            client.translate(models["translate"], [" ".join(["word"] * 5000)])
    assert failure.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert counter.calls["Translate"] == 1


def test_deadline_exceeded_raises_seqserve_error(client, models):
    with pytest.raises(SeqServeError) as failure:
        client.translate(models["translate"], SOURCES * 8, DecodingOptions(beam_size=4), timeout=0.001)
    assert failure.value.code == grpc.StatusCode.DEADLINE_EXCEEDED


def test_async_client_methods_equal_sync_results(model_server, client, models):
    async def call_all():
        async with AsyncClient(model_server.address, timeout_s=60) as aclient:
            return (
                await aclient.encode(models["encode"], SOURCES),
                await aclient.translate(models["translate"], SOURCES),
                await aclient.score_next_sentence(models["nsp"], [("a dog", "runs")]),
                await aclient.fill_mask(models["fill_mask"], ["a [MASK] runs"], top_k=3),
                await aclient.list_models(),
                await aclient.health(models["translate"]),
            )

    vectors, translations, nsp, masks, listing, health = asyncio.run(call_all())
    np.testing.assert_allclose(vectors, client.encode(models["encode"], SOURCES), rtol=1e-5, atol=1e-6)
    assert [t.text for t in translations] == [t.text for t in client.translate(models["translate"], SOURCES)]
    assert nsp == pytest.approx(client.score_next_sentence(models["nsp"], [("a dog", "runs")]), abs=1e-6)
    assert masks == client.fill_mask(models["fill_mask"], ["a [MASK] runs"], top_k=3)
    assert {(m.name, m.version) for m in listing} == {(m.name, m.version) for m in client.list_models()}
    assert health == "SERVING"


def test_async_load_and_unload_round_trip(model_server, models):
    async def cycle():
        async with AsyncClient(model_server.address, timeout_s=60) as aclient:
            unloaded = await aclient.unload_model(models["fill_mask"])
            loaded = await aclient.load_model(models["fill_mask"])
            return unloaded.state, loaded.state

    unloaded, loaded = asyncio.run(cycle())
    assert unloaded in ("AVAILABLE", "UNLOADING") and loaded == "READY"


def test_async_translate_stream_answers_every_id_like_translate(model_server, client, models):
    items = [(str(i), SOURCES[i % len(SOURCES)]) for i in range(8)]

    async def stream():
        async with AsyncClient(model_server.address) as aclient:
            answers = aclient.translate_stream(models["translate"], items, window=2)
            return {r.id: r.translation.text async for r in answers}

    expected = {t: r.text for t, r in zip(SOURCES, client.translate(models["translate"], SOURCES))}
    assert asyncio.run(stream()) == {i: expected[text] for i, text in items}


def test_async_invalid_argument_raises_seqserve_error(model_server, models):
    async def call():
        async with AsyncClient(model_server.address, retry=FAST_RETRY) as aclient:
            await aclient.fill_mask(models["fill_mask"], ["a [MASK] runs"], top_k=100_000)

    with pytest.raises(SeqServeError) as failure:
        asyncio.run(call())
    assert failure.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_max_message_bytes_limits_what_the_client_receives(model_server, models):
    texts = SOURCES * 8  # 32 vectors of float32: more than 256 bytes
    with Client(model_server.address, max_message_bytes=256) as small:
        with pytest.raises(SeqServeError) as failure:
            small.encode(models["encode"], texts)
    assert failure.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED


# --------------------------------------------------------------------------------------------------------------
# TLS and metadata, against a plain grpc server with the standard health service (seqserve serves plaintext today)


class MetadataRecorder(grpc.ServerInterceptor):
    def __init__(self):
        self.seen: list[dict[str, str]] = []

    def intercept_service(self, continuation, handler_call_details):
        self.seen.append(dict(handler_call_details.invocation_metadata))
        return continuation(handler_call_details)


@pytest.fixture(scope="module")
def certificate(tmp_path_factory) -> tuple[Path, Path]:
    """A self-signed certificate for localhost (its own CA) and its key, from the openssl command."""
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return cert, key


def test_mutual_tls_channel_and_token_reach_a_tls_server(certificate):
    from concurrent.futures import ThreadPoolExecutor

    from grpc_health.v1 import health, health_pb2_grpc

    cert, key = certificate
    recorder = MetadataRecorder()
    server = grpc.server(ThreadPoolExecutor(max_workers=2), interceptors=[recorder])
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    credentials = grpc.ssl_server_credentials(
        [(key.read_bytes(), cert.read_bytes())], root_certificates=cert.read_bytes(), require_client_auth=True
    )
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    try:
        tls = TLSConfig(root_certificates=cert, certificate_chain=cert, private_key=key)
        with Client(f"localhost:{port}", tls=tls, token="s3cret", metadata=(("x-team", "nlp"),)) as client:
            assert client.health() == "SERVING"
        with Client(f"localhost:{port}", retry=RetryPolicy(attempts=1)) as plaintext:
            with pytest.raises(SeqServeError) as failure:
                plaintext.health(timeout=5)
        assert failure.value.code == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop(0)
    assert recorder.seen[0]["authorization"] == "Bearer s3cret" and recorder.seen[0]["x-team"] == "nlp"


def test_tls_handshake_failure_is_not_retried_and_says_why(empty_server, certificate):
    cert, _ = certificate
    started = time.monotonic()
    with Client(empty_server.address, tls=TLSConfig(root_certificates=cert), timeout_s=20) as client:
        with pytest.raises(SeqServeError) as failure:
            client.health()  # a TLS client against seqserve's plaintext port
    assert failure.value.code == grpc.StatusCode.UNAVAILABLE and "is the server plaintext" in failure.value.message
    assert time.monotonic() - started < 5


def test_tls_config_needs_both_client_certificate_and_key(certificate):
    cert, _ = certificate
    with pytest.raises(ValueError, match="both"):
        TLSConfig(root_certificates=cert, certificate_chain=cert).credentials()


def test_closed_client_raises_seqserve_error(empty_server):
    client = Client(empty_server.address)
    client.close()
    with pytest.raises(SeqServeError, match="closed"):
        client.health()
    with pytest.raises(SeqServeError, match="closed"):
        list(client.translate_stream("any", [("1", "a")]))

    async def use_closed() -> None:
        aclient = AsyncClient(empty_server.address)
        await aclient.close()
        with pytest.raises(SeqServeError, match="closed"):
            await aclient.health()
        with pytest.raises(SeqServeError, match="closed"):
            [r async for r in aclient.translate_stream("any", [("1", "a")])]

    asyncio.run(use_closed())


def test_metadata_given_as_a_dict_is_sent():
    from concurrent.futures import ThreadPoolExecutor

    from grpc_health.v1 import health, health_pb2_grpc

    recorder = MetadataRecorder()
    server = grpc.server(ThreadPoolExecutor(max_workers=2), interceptors=[recorder])
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with Client(f"127.0.0.1:{port}", metadata={"x-team": "nlp"}) as client:
            assert client.health() == "SERVING"
    finally:
        server.stop(0)
    assert recorder.seen[0]["x-team"] == "nlp"
    with pytest.raises(ValueError, match="metadata"):
        Client("127.0.0.1:1", metadata={"x-team": 1})
