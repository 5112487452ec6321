"""Operating the server: model management, health, reflection, metrics, deadlines and cancellation."""

from __future__ import annotations

import json
import shutil
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from seqserve.protos.v1 import seqserve_pb2 as pb
from seqserve.protos.v1 import seqserve_pb2_grpc as pb_grpc
from seqserve.server.config import BatchingConfig, Limits, ServerConfig
from seqserve.server.repository import ModelRepository
from seqserve.server.testing import ServerThread

# One sentence per batch (cost = tokens x beam > budget / 2), so a long request is many batches in a row.
BATCHING = BatchingConfig(max_batch_tokens=200, max_queue_delay_ms=1.0)
LONG_TEXTS = ["h g f e d c b a h g f e d c b"] * 128
LONG_OPTIONS = pb.DecodingOptions(beam_size=8, n_best=1)
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING



@pytest.fixture(scope="module")
def running(tiny_repository):
    config = ServerConfig(port=0, metrics_port=0, instances=1, threads=1, batching=BATCHING)
    with ServerThread(config, ModelRepository(tiny_repository)) as server:
        yield server


@pytest.fixture(scope="module")
def channel(running):
    with grpc.insecure_channel(running.address) as ch:
        yield ch


@pytest.fixture(scope="module")
def inference(channel):
    return pb_grpc.InferenceStub(channel)


@pytest.fixture(scope="module")
def models(channel):
    return pb_grpc.ModelsStub(channel)


def _steps(running, model: str) -> float:
    return running.server.metrics.registry.get_sample_value("seqserve_decode_steps_total", {"model": model}) or 0.0


def _long_request(model: str = "tiny-lstm") -> pb.TranslateRequest:
    return pb.TranslateRequest(model=pb.ModelSpec(name=model), texts=LONG_TEXTS, options=LONG_OPTIONS)


# ------------------------------------------------------------------------------------------------------------------
# Models service


def test_list_models_shows_every_version_with_state_and_manifest_summary(models):
    listed = {s.name: s for s in models.ListModels(pb.ListModelsRequest()).models}
    assert {"tiny-lstm", "tiny-gru", "tiny-birnn", "tiny-transformer", "tiny-bert"} <= set(listed)
    lstm, bert = listed["tiny-lstm"], listed["tiny-bert"]
    assert lstm.state == pb.MODEL_STATE_READY and lstm.version == 1
    assert lstm.task == "translation" and lstm.architecture == "lstm" and list(lstm.capabilities) == ["translate"]
    assert lstm.max_input_tokens > 0 and "parity_max_abs_diff" in lstm.metrics
    assert bert.task == "bert" and set(bert.capabilities) == {"encode", "nsp", "fill_mask"}
    assert listed["tiny-bert-int8"].quantization == "int8"


def test_list_models_filters_by_name(models):
    listed = models.ListModels(pb.ListModelsRequest(name="tiny-gru")).models
    assert [s.name for s in listed] == ["tiny-gru"]


def test_unload_and_load_while_other_models_serve(models, inference):
    spec = pb.ModelSpec(name="tiny-gru")
    before = inference.Translate(pb.TranslateRequest(model=spec, texts=["a b"]))
    with ThreadPoolExecutor(2) as pool:
        busy = pool.submit(inference.Translate, _long_request("tiny-transformer"))
        unloaded = models.UnloadModel(pb.UnloadModelRequest(model=spec))
        assert unloaded.state == pb.MODEL_STATE_AVAILABLE
        with pytest.raises(grpc.RpcError) as info:
            inference.Translate(pb.TranslateRequest(model=spec, texts=["a b"]))
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "LoadModel" in info.value.details()
        loaded = models.LoadModel(pb.LoadModelRequest(model=spec))
        assert loaded.state == pb.MODEL_STATE_READY and loaded.version == 1
        assert len(busy.result(timeout=60).translations) == len(LONG_TEXTS)
    assert inference.Translate(pb.TranslateRequest(model=spec, texts=["a b"])) == before


def test_unload_finishes_requests_already_queued(models, inference):
    spec = pb.ModelSpec(name="tiny-birnn")
    with ThreadPoolExecutor(1) as pool:
        busy = pool.submit(inference.Translate, pb.TranslateRequest(model=spec, texts=LONG_TEXTS[:32]))
        time.sleep(0.05)
        models.UnloadModel(pb.UnloadModelRequest(model=spec))
        assert len(busy.result(timeout=60).translations) == 32
    models.LoadModel(pb.LoadModelRequest(model=spec))


def test_an_unload_whose_caller_gives_up_still_completes(models, inference):
    """UnloadModel past its deadline while the version drains: the caller gets DEADLINE_EXCEEDED, the unload goes on
    to the end (it stayed UNLOADING for good, refusing requests, until someone loaded it again)."""
    spec = pb.ModelSpec(name="tiny-birnn")
    long = pb.TranslateRequest(model=spec, texts=LONG_TEXTS[:32], options=pb.DecodingOptions(beam_size=4))
    with ThreadPoolExecutor(3) as pool:
        busy = [pool.submit(inference.Translate, long) for _ in range(3)]
        time.sleep(0.05)
        try:
            models.UnloadModel(pb.UnloadModelRequest(model=spec), timeout=0.02)
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert all(len(b.result(timeout=60).translations) == 32 for b in busy)
    deadline = time.monotonic() + 30
    while (state := _state(models, "tiny-birnn")) == pb.MODEL_STATE_UNLOADING and time.monotonic() < deadline:
        time.sleep(0.05)
    assert state == pb.MODEL_STATE_AVAILABLE
    assert models.LoadModel(pb.LoadModelRequest(model=spec)).state == pb.MODEL_STATE_READY


def test_a_load_whose_caller_gives_up_still_ends_ready(running, models, inference):
    """LoadModel past its deadline while the sessions open: the load goes on to READY (it was left LOADING for good,
    every request told "retry shortly", until someone loaded it again)."""
    import asyncio

    from seqserve.server.manager import LOADING

    spec = pb.ModelSpec(name="tiny-birnn")
    models.UnloadModel(pb.UnloadModelRequest(model=spec))
    manager = running.server.manager

    async def load_and_give_up() -> str:
        caller = asyncio.ensure_future(manager.load("tiny-birnn"))
        waited = time.monotonic() + 10
        while manager.status("tiny-birnn", 1).state != LOADING:  # the sessions are opening in a worker thread
            assert time.monotonic() < waited, manager.status("tiny-birnn", 1)
            await asyncio.sleep(0.001)
        caller.cancel()  # what gRPC does to a handler whose deadline passed
        await asyncio.gather(caller, return_exceptions=True)
        return manager.status("tiny-birnn", 1).state

    assert running.call(load_and_give_up()) == LOADING  # given up while loading
    deadline = time.monotonic() + 30
    while (state := _state(models, "tiny-birnn")) == pb.MODEL_STATE_LOADING and time.monotonic() < deadline:
        time.sleep(0.02)
    assert state == pb.MODEL_STATE_READY
    assert len(inference.Translate(pb.TranslateRequest(model=spec, texts=["c b a"])).translations) == 1


def test_unloading_a_version_that_is_not_loaded_leaves_it_as_it_is(models):
    spec = pb.ModelSpec(name="tiny-lstm-int8")
    unloads = [models.UnloadModel(pb.UnloadModelRequest(model=spec)) for _ in range(3)]  # the first one unloads
    assert [s.state for s in unloads] == [pb.MODEL_STATE_AVAILABLE] * 3 and unloads[-1].version == 1
    assert models.LoadModel(pb.LoadModelRequest(model=spec)).state == pb.MODEL_STATE_READY


def _state(models, name: str) -> int:
    return next(s.state for s in models.ListModels(pb.ListModelsRequest()).models if s.name == name)


def test_load_of_an_unknown_model_is_not_found(models):
    with pytest.raises(grpc.RpcError) as info:
        models.LoadModel(pb.LoadModelRequest(model=pb.ModelSpec(name="nope")))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND and "tiny-lstm" in info.value.details()


def test_a_model_that_fails_to_load_is_failed_and_the_others_serve(tiny_repository, tmp_path):
    root = tmp_path / "repo"
    for name in ("tiny-lstm", "tiny-bert"):
        shutil.copytree(tiny_repository / name, root / name)
    shutil.copytree(tiny_repository / "tiny-lstm", root / "broken")
    manifest = json.loads((root / "broken" / "1" / "manifest.json").read_text())
    manifest["name"] = "broken"
    (root / "broken" / "1" / "manifest.json").write_text(json.dumps(manifest))
    with open(root / "broken" / "1" / "decoder.onnx", "ab") as f:
        f.write(b"tampered")
    config = ServerConfig(port=0, metrics_port=None, instances=1, threads=1)
    with ServerThread(config, ModelRepository(root)) as running, grpc.insecure_channel(running.address) as ch:
        listed = {s.name: s for s in pb_grpc.ModelsStub(ch).ListModels(pb.ListModelsRequest()).models}
        assert listed["broken"].state == pb.MODEL_STATE_FAILED and "decoder.onnx" in listed["broken"].reason
        assert listed["tiny-lstm"].state == pb.MODEL_STATE_READY
        stub = pb_grpc.InferenceStub(ch)
        with pytest.raises(grpc.RpcError) as info:
            stub.Translate(pb.TranslateRequest(model=pb.ModelSpec(name="broken"), texts=["a"]))
        # FAILED is not transient: not UNAVAILABLE, which clients retry until their deadline
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "FAILED" in info.value.details()
        ok = stub.Translate(pb.TranslateRequest(model=pb.ModelSpec(name="tiny-lstm"), texts=["a b"]))
        assert ok.translations[0].hypotheses[0].text.split() == ["b", "a"]
        health = health_pb2_grpc.HealthStub(ch)
        assert health.Check(health_pb2.HealthCheckRequest(service="broken")).status == NOT_SERVING


def test_copied_version_folders_are_failed_and_leave_their_original_serving(tiny_repository, tmp_path):
    root = tmp_path / "repo"
    shutil.copytree(tiny_repository / "tiny-lstm" / "1", root / "tiny-lstm" / "1")
    shutil.copytree(tiny_repository / "tiny-lstm" / "1", root / "tiny-lstm" / "2")  # its manifest says version 1
    shutil.copytree(tiny_repository / "tiny-lstm" / "1", root / "alias" / "1")  # its manifest says tiny-lstm
    (root / "odd" / "1").mkdir(parents=True)
    (root / "odd" / "1" / "manifest.json").write_text("[]")  # JSON, but not an object
    config = ServerConfig(port=0, metrics_port=None, instances=1, threads=1, models=("alias",))
    with ServerThread(config, ModelRepository(root)) as running, grpc.insecure_channel(running.address) as ch:
        admin, stub = pb_grpc.ModelsStub(ch), pb_grpc.InferenceStub(ch)
        with pytest.raises(grpc.RpcError) as info:
            admin.LoadModel(pb.LoadModelRequest(model=pb.ModelSpec(name="tiny-lstm", version=2)))
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "manifest says model 'tiny-lstm' version 1, the folder is tiny-lstm/2" in info.value.details()
        assert "fix what the reason names" in info.value.details()  # not "LoadModel loads it": it just failed to
        admin.LoadModel(pb.LoadModelRequest(model=pb.ModelSpec(name="tiny-lstm", version=1)))
        listed = {(s.name, s.version): s for s in admin.ListModels(pb.ListModelsRequest()).models}
        alias = listed[("alias", 1)]
        assert alias.state == pb.MODEL_STATE_FAILED and "folder is alias/1" in alias.reason
        assert listed[("tiny-lstm", 2)].state == pb.MODEL_STATE_FAILED
        assert listed[("odd", 1)].state == pb.MODEL_STATE_FAILED and "malformed manifest" in listed[("odd", 1)].reason
        with pytest.raises(grpc.RpcError) as info:  # never loaded: a request says what ListModels says
            stub.Encode(pb.EncodeRequest(model=pb.ModelSpec(name="odd"), texts=["a"]))
        assert "state FAILED" in info.value.details() and "malformed manifest" in info.value.details()
        admin.UnloadModel(pb.UnloadModelRequest(model=pb.ModelSpec(name="alias")))
        request = pb.TranslateRequest(model=pb.ModelSpec(name="tiny-lstm"), texts=["a b"])
        assert stub.Translate(request).model.version == 1  # untouched by anything done to its copies


def _two_versions(tiny_repository: Path, tmp_path: Path) -> Path:
    """A repository of tiny-lstm versions 1 and 2 (2 a renumbered copy of 1)."""
    root = tmp_path / "repo"
    shutil.copytree(tiny_repository / "tiny-lstm" / "1", root / "tiny-lstm" / "1")
    shutil.copytree(tiny_repository / "tiny-lstm" / "1", root / "tiny-lstm" / "2")
    manifest = json.loads((root / "tiny-lstm" / "2" / "manifest.json").read_text())
    (root / "tiny-lstm" / "2" / "manifest.json").write_text(json.dumps({**manifest, "version": 2}))
    return root


def test_a_broken_newest_version_falls_back_to_the_next_one_at_start(tiny_repository, tmp_path):
    root = _two_versions(tiny_repository, tmp_path)
    (root / "tiny-lstm" / "2" / "source_tokenizer.json").unlink()  # a broken new export
    config = ServerConfig(port=0, metrics_port=None, instances=1, threads=1)
    with ServerThread(config, ModelRepository(root)) as running, grpc.insecure_channel(running.address) as ch:
        states = {s.version: s for s in pb_grpc.ModelsStub(ch).ListModels(pb.ListModelsRequest()).models}
        assert states[2].state == pb.MODEL_STATE_FAILED and "source_tokenizer.json" in states[2].reason
        assert states[1].state == pb.MODEL_STATE_READY
        request = pb.TranslateRequest(model=pb.ModelSpec(name="tiny-lstm"), texts=["a b"])
        assert pb_grpc.InferenceStub(ch).Translate(request).model.version == 1


def test_a_second_server_on_a_port_in_use_fails_to_bind(running, tmp_path):
    """Not SO_REUSEPORT's silent sharing, where the second server took a share of the first one's connections."""
    import asyncio

    from seqserve.server.app import create_server

    async def second() -> None:
        create_server(ServerConfig(port=running.port, metrics_port=None), ModelRepository(tmp_path))

    with pytest.raises(OSError, match=f"could not bind .*:{running.port}"):
        asyncio.run(second())


# ------------------------------------------------------------------------------------------------------------------
# Health, reflection, metrics


def test_health_is_serving_overall_and_per_model(channel, models):
    health = health_pb2_grpc.HealthStub(channel)
    assert health.Check(health_pb2.HealthCheckRequest(service="")).status == SERVING
    assert health.Check(health_pb2.HealthCheckRequest(service="tiny-bert")).status == SERVING
    models.UnloadModel(pb.UnloadModelRequest(model=pb.ModelSpec(name="tiny-bert-int8")))
    assert health.Check(health_pb2.HealthCheckRequest(service="tiny-bert-int8")).status == NOT_SERVING
    models.LoadModel(pb.LoadModelRequest(model=pb.ModelSpec(name="tiny-bert-int8")))
    assert health.Check(health_pb2.HealthCheckRequest(service="tiny-bert-int8")).status == SERVING
    with pytest.raises(grpc.RpcError) as info:
        health.Check(health_pb2.HealthCheckRequest(service="no-such-model"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert "no health service 'no-such-model'" in info.value.details() and "tiny-lstm" in info.value.details()
    with pytest.raises(grpc.RpcError) as info:  # not a model's name: shown_name quotes it, and only it
        health.Check(health_pb2.HealthCheckRequest(service="seqserve.v1.Inference"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert info.value.details().startswith("no health service 'seqserve.v1.Inference': ask"), info.value.details()


def test_reflection_lists_and_describes_the_api(channel):
    database = ProtoReflectionDescriptorDatabase(channel)
    services = set(database.get_services())
    assert {"seqserve.v1.Inference", "seqserve.v1.Models", "grpc.health.v1.Health"} <= services
    described = database.FindFileContainingSymbol("seqserve.v1.Inference")
    assert "Translate" in [m.name for s in described.service for m in s.method]


@pytest.mark.parametrize("host, url", [("::", "http://[::]:9161/metrics"), ("::1", "http://[::1]:9161/metrics"),
                                       ("[::]", "http://[::]:9161/metrics"),
                                       ("0.0.0.0", "http://0.0.0.0:9161/metrics"),
                                       ("localhost", "http://localhost:9161/metrics")])  # fmt: skip
def test_metrics_url_brackets_an_ipv6_host(host, url):
    from seqserve.server.metrics import http_url

    assert http_url(host, 9161, "/metrics") == url


def test_metrics_endpoint_counts_rise(running, inference):
    def scrape() -> str:
        with urllib.request.urlopen(running.metrics_url, timeout=10) as response:
            return response.read().decode()

    def value(text: str, line_start: str) -> float:
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(line_start))

    key = 'seqserve_requests_total{method="Translate",model="tiny-lstm"}'
    before = scrape()
    inference.Translate(pb.TranslateRequest(model=pb.ModelSpec(name="tiny-lstm"), texts=["a b", "c"]))
    with pytest.raises(grpc.RpcError):
        inference.Translate(pb.TranslateRequest(model=pb.ModelSpec(name="nope"), texts=["a"]))
    after = scrape()
    assert value(after, key) == value(before, key) + 1
    assert value(after, 'seqserve_errors_total{code="NOT_FOUND",method="Translate"}') >= 1
    assert 'model="nope"' not in after  # unknown names do not become metric series
    for family in ("seqserve_decode_steps_total", "seqserve_tokens_in_total", "seqserve_tokens_out_total",
                   "seqserve_batch_sequences_count", "seqserve_queue_seconds_count",
                   "seqserve_request_latency_seconds_count"):  # fmt: skip
        assert value(after, family) > value(before, family), family


# ------------------------------------------------------------------------------------------------------------------
# Deadlines and cancellation


@pytest.fixture(scope="module")
def full_run(running, inference) -> tuple[float, float]:
    """Seconds and decode steps of the long request left to finish."""
    before = _settled_steps(running, "tiny-lstm")
    started = time.monotonic()
    inference.Translate(_long_request(), timeout=120)
    return time.monotonic() - started, _steps(running, "tiny-lstm") - before


def test_long_request_takes_many_decode_steps(full_run):
    assert full_run[1] >= len(LONG_TEXTS) * 2


def _settled_steps(running, model: str) -> float:
    """Decode steps once the server has stopped taking them (two equal readings 100 ms apart)."""
    last = -1.0
    while (now := _steps(running, model)) != last:
        last = now
        time.sleep(0.1)
    return now


def _errors(running, method: str, code: str) -> float:
    labels = {"method": method, "code": code}
    return running.server.metrics.registry.get_sample_value("seqserve_errors_total", labels) or 0.0


def test_deadline_exceeded_and_the_work_stops(running, inference, full_run):
    before = _settled_steps(running, "tiny-lstm")
    counted = _errors(running, "Translate", "DEADLINE_EXCEEDED"), _errors(running, "Translate", "CANCELLED")
    with pytest.raises(grpc.RpcError) as info:
        inference.Translate(_long_request(), timeout=min(0.1, full_run[0] / 4))
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    taken = _settled_steps(running, "tiny-lstm") - before
    assert taken < full_run[1] / 2
    # Counted as what the client saw, not as a cancellation
    assert (_errors(running, "Translate", "DEADLINE_EXCEEDED"), _errors(running, "Translate", "CANCELLED")) == (
        counted[0] + 1, counted[1]
    )


def test_cancelled_request_stops_consuming_decode_steps(running, inference, full_run):
    before = _settled_steps(running, "tiny-lstm")
    future = inference.Translate.future(_long_request(), timeout=120)
    deadline = time.monotonic() + 30
    while _steps(running, "tiny-lstm") == before and time.monotonic() < deadline:
        time.sleep(0.002)
    assert future.cancel()
    taken = _settled_steps(running, "tiny-lstm") - before
    assert 0 < taken < full_run[1] / 2
    ok = inference.Translate(pb.TranslateRequest(model=pb.ModelSpec(name="tiny-lstm"), texts=["a b"]))
    assert ok.translations[0].hypotheses[0].text.split() == ["b", "a"]


def test_stream_read_ahead_bounds_the_items_in_flight(tiny_repository):
    # With a read-ahead of one the server takes the next item only after answering the previous one, so no batch
    # ever holds two of this stream's items although the client sends them all at once.
    config = ServerConfig(port=0, metrics_port=None, instances=1, threads=1, limits=Limits(stream_read_ahead=1),
                          batching=BatchingConfig(max_queue_delay_ms=20.0), models=("tiny-lstm",))  # fmt: skip
    spec = pb.ModelSpec(name="tiny-lstm")
    items = [pb.TranslateStreamRequest(id=str(i), model=spec, text="a b c") for i in range(12)]
    with ServerThread(config, ModelRepository(tiny_repository)) as running:
        with grpc.insecure_channel(running.address) as ch:
            responses = list(pb_grpc.InferenceStub(ch).TranslateStream(iter(items)))
        registry = running.server.metrics.registry
        batches = registry.get_sample_value("seqserve_batch_sequences_count", {"model": "tiny-lstm"})
        sequences = registry.get_sample_value("seqserve_batch_sequences_sum", {"model": "tiny-lstm"})
    assert sorted(int(r.id) for r in responses) == list(range(12))
    assert batches == sequences == 12


def test_version_zero_is_the_highest_ready_version(tiny_repository, tmp_path):
    root = _two_versions(tiny_repository, tmp_path)
    config = ServerConfig(port=0, metrics_port=None, instances=1, threads=1)

    def translate(stub, version: int) -> pb.TranslateResponse:
        return stub.Translate(pb.TranslateRequest(model=pb.ModelSpec(name="tiny-lstm", version=version), texts=["a"]))

    with ServerThread(config, ModelRepository(root)) as running, grpc.insecure_channel(running.address) as ch:
        stub, admin = pb_grpc.InferenceStub(ch), pb_grpc.ModelsStub(ch)
        assert translate(stub, 0).model.version == 2  # at start only the highest version is loaded
        with pytest.raises(grpc.RpcError) as info:
            translate(stub, 1)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "version 1" in info.value.details()
        admin.LoadModel(pb.LoadModelRequest(model=pb.ModelSpec(name="tiny-lstm", version=1)))
        assert translate(stub, 1).model.version == 1
        assert translate(stub, 0).model.version == 2
        admin.UnloadModel(pb.UnloadModelRequest(model=pb.ModelSpec(name="tiny-lstm", version=2)))
        assert translate(stub, 0).model.version == 1
        states = {s.version: s.state for s in admin.ListModels(pb.ListModelsRequest(name="tiny-lstm")).models}
        assert states == {1: pb.MODEL_STATE_READY, 2: pb.MODEL_STATE_AVAILABLE}


@pytest.mark.parametrize("model", ["tiny-transformer", "tiny-lstm"])
def test_max_batch_size_bounds_a_decode_with_its_joiners(tiny_repository, model):
    """--max-batch-size 1 (batching off) holds for families whose running decode takes newcomers too."""
    config = ServerConfig(port=0, metrics_port=0, instances=1, threads=1,
                          batching=BatchingConfig(max_batch_size=1, max_queue_delay_ms=50.0))  # fmt: skip
    with ServerThread(config, ModelRepository(tiny_repository)) as server, \
            grpc.insecure_channel(server.address) as channel:  # fmt: skip
        stub = pb_grpc.InferenceStub(channel)
        request = pb.TranslateRequest(model=pb.ModelSpec(name=model), texts=["h g f e d c b a h g f"])
        with ThreadPoolExecutor(6) as pool:
            list(pool.map(lambda _: stub.Translate(request, timeout=60), range(12)))
        sample = server.server.metrics.registry.get_sample_value
        rows, steps = (sample(f"seqserve_decode_{kind}_total", {"model": model}) for kind in ("rows", "steps"))
        assert steps > 0 and rows == steps  # one greedy row a step: never two sentences together


def test_an_unload_drops_the_sessions_and_trims_the_heap(running, models, monkeypatch):
    """After UnloadModel nothing holds the version's sessions (a caller's frame did) and the freed heap is handed
    back once; two unloads at once unload it once."""
    import asyncio
    import weakref

    from seqserve.server import manager as manager_module

    trims: list[int] = []
    trim = manager_module.release_freed_memory
    monkeypatch.setattr(manager_module, "release_freed_memory", lambda: (trims.append(1), trim()))
    spec = pb.ModelSpec(name="tiny-gru")
    served = weakref.ref(running.server.manager.get("tiny-gru"))

    async def unload_twice() -> list[str]:
        statuses = await asyncio.gather(*(running.server.manager.unload("tiny-gru") for _ in range(2)))
        return [s.state for s in statuses]

    assert running.call(unload_twice()) == ["AVAILABLE", "AVAILABLE"]
    assert served() is None and trims == [1]
    assert models.LoadModel(pb.LoadModelRequest(model=spec)).state == pb.MODEL_STATE_READY


TRIM_PROBE = """
import threading
from seqserve.server.manager import _malloc_trim, release_freed_memory
def rss():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS")) // 1024
def churn():  # as a load does: many mid-sized allocations in a worker thread's arena, most of them freed
    blocks = [bytes(2000) + bytes([i % 256]) for i in range(150_000)]
    keep = blocks[::1000]
    del blocks
    return keep
held = []
thread = threading.Thread(target=lambda: held.append(churn()))
thread.start()
thread.join()
freed = rss()
release_freed_memory()
print(_malloc_trim is not None, freed, rss())
"""


def test_memory_an_unload_frees_goes_back_to_the_system():
    """glibc keeps what an unloaded version's sessions freed (in the arenas of the threads that loaded them): after
    unloading every model of make serve's repository the server held 298 MB untrimmed, 93 MB trimmed
    (docs/checks/unload-memory). release_freed_memory hands such memory back."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", TRIM_PROBE], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    glibc, freed, trimmed = done.stdout.split()
    if glibc != "True":
        pytest.skip("not glibc: no malloc_trim, nothing kept that a trim would return")
    assert int(freed) - int(trimmed) > 150, (freed, trimmed)  # ~300 MB freed but held, then given back
