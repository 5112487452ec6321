"""`seqserve serve` as a real process: SIGTERM drains (in-flight requests finish, exit 0), bad device refused."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import onnxruntime as ort
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import cuda_starts
from seqserve.protos.v1 import seqserve_pb2 as pb
from seqserve.protos.v1 import seqserve_pb2_grpc as pb_grpc

TEXTS = ["h g f e d c b a h g f e d c b"] * 32


def _serve(root: Path, *extra: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "seqserve.cli", "serve", "--repository", str(root), "--port", "0",
               "--metrics-port", "-1", "--instances", "1", "--threads", "1", *extra]  # fmt: skip
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    return subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)


def _wait_ready(proc: subprocess.Popen, lines: list[str], timeout: float = 120) -> int:
    """Read the log until the ready line; keep draining it in a thread afterwards so the pipe never fills."""
    deadline = time.monotonic() + timeout
    for line in proc.stderr:
        lines.append(line)
        if match := re.search(r"ready: gRPC port (\d+)", line):
            threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True).start()
            return int(match.group(1))
        if time.monotonic() > deadline:
            break
    proc.kill()
    raise AssertionError("server did not become ready:\n" + "".join(lines))


def test_sigterm_drains_without_losing_in_flight_requests(tiny_repository):
    root = tiny_repository if isinstance(tiny_repository, Path) else Path(tiny_repository.root)
    proc = _serve(root, "--models", "tiny-lstm", "--grace-period", "60", "--max-batch-tokens", "200",
                  "--log-format", "json")  # fmt: skip
    lines: list[str] = []
    try:
        port = _wait_ready(proc, lines)
        with grpc.insecure_channel(f"localhost:{port}") as channel:
            stub = pb_grpc.InferenceStub(channel)
            health = health_pb2_grpc.HealthStub(channel)
            assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
            request = pb.TranslateRequest(
                model=pb.ModelSpec(name="tiny-lstm"), texts=TEXTS, options=pb.DecodingOptions(beam_size=8)
            )
            watch = health.Watch(health_pb2.HealthCheckRequest(service="tiny-lstm"), timeout=120)
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            futures = [stub.Translate.future(request, timeout=120) for _ in range(6)]
            time.sleep(0.3)
            in_flight = [f for f in futures if not f.done()]
            proc.send_signal(signal.SIGTERM)
            assert in_flight, "every request finished before SIGTERM: the test proves nothing"
            assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
            for future in futures:
                assert len(future.result(timeout=120).translations) == len(TEXTS)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    records = [json.loads(line) for line in lines if line.startswith("{")]
    messages = [r["message"] for r in records]
    assert all({"time", "level", "logger", "message"} <= set(r) for r in records)
    assert "SIGTERM received" in messages and "stopped" in messages
    assert any(m.startswith("draining") for m in messages)


def test_sigterm_while_the_models_load_stops_the_start_and_exits(tiny_repository):
    """A signal before ready (a pod deleted while starting): the start stops, nothing is served or announced, the
    process exits. It went on loading, logged "ready" after "stopped", and hung with its port unanswered."""
    root = tiny_repository if isinstance(tiny_repository, Path) else Path(tiny_repository.root)
    proc = _serve(root, "--grace-period", "5", "--drain-delay", "30")  # the delay must not apply: nothing served
    lines: list[str] = []
    try:
        for line in proc.stderr:
            lines.append(line)
            if " is READY " in line:  # the first of the repository's versions: the others are still to load
                proc.send_signal(signal.SIGTERM)
                break
        assert proc.wait(timeout=30) == 0, "".join(lines)
        lines.extend(proc.stderr)
        log = "".join(lines)
        assert "SIGTERM received while starting: not serving" in log and "stopped" in log
        assert "ready: gRPC port" not in log and "Traceback" not in log and "never awaited" not in log
    finally:
        if proc.poll() is None:
            proc.kill()


def test_an_open_health_watch_ends_at_sigterm_and_does_not_hold_the_shutdown(tiny_repository):
    """A load balancer's Watch stream gets NOT_SERVING, then its end; the process does not wait out the grace."""
    root = tiny_repository if isinstance(tiny_repository, Path) else Path(tiny_repository.root)
    proc = _serve(root, "--models", "tiny-lstm", "--grace-period", "60")
    lines: list[str] = []
    try:
        port = _wait_ready(proc, lines)
        with grpc.insecure_channel(f"localhost:{port}") as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""), timeout=120)
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            started = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            assert [r.status for r in watch] == [health_pb2.HealthCheckResponse.NOT_SERVING]  # then the stream ends
            assert proc.wait(timeout=60) == 0
            assert time.monotonic() - started < 20  # not the 60 s grace period
    finally:
        if proc.poll() is None:
            proc.kill()


def test_during_the_drain_delay_probes_say_not_serving_and_requests_are_still_served(tiny_repository):
    """--drain-delay: after SIGTERM the readiness signals turn at once while work is still taken (what a load
    balancer routes before it notices is served, not refused); then the port closes and the process exits."""
    from seqserve.protos.inference import open_inference_pb2 as v2
    from seqserve.protos.inference import open_inference_pb2_grpc as v2_grpc

    root = tiny_repository if isinstance(tiny_repository, Path) else Path(tiny_repository.root)
    proc = _serve(root, "--models", "tiny-lstm", "--drain-delay", "60", "--grace-period", "5")
    lines: list[str] = []
    try:
        port = _wait_ready(proc, lines)
        with grpc.insecure_channel(f"localhost:{port}") as channel:
            health, stub = health_pb2_grpc.HealthStub(channel), pb_grpc.InferenceStub(channel)
            open_inference = v2_grpc.GRPCInferenceServiceStub(channel)
            assert open_inference.ServerReady(v2.ServerReadyRequest()).ready
            request = pb.TranslateRequest(model=pb.ModelSpec(name="tiny-lstm"), texts=["a b"])
            proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 10
            while health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING:
                assert time.monotonic() < deadline, "health never turned NOT_SERVING"
                time.sleep(0.05)
            assert not open_inference.ServerReady(v2.ServerReadyRequest()).ready
            assert open_inference.ServerLive(v2.ServerLiveRequest()).live
            assert not open_inference.ModelReady(v2.ModelReadyRequest(name="tiny-lstm")).ready
            assert stub.Translate(request).translations[0].hypotheses[0].text.split() == ["b", "a"]
            proc.send_signal(signal.SIGTERM)  # a second signal skips the rest of the 60 s delay
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    deadline = time.monotonic() + 10  # the log's reader thread may still be at work
    while not any("skipping the rest of the drain delay" in line for line in lines) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert any("still serving for 60.0 s" in line for line in lines)
    assert any("skipping the rest of the drain delay" in line for line in lines)


def test_device_cuda_uses_the_cuda_provider_or_is_refused_clearly(tiny_repository):
    root = tiny_repository if isinstance(tiny_repository, Path) else Path(tiny_repository.root)
    proc = _serve(root, "--device", "cuda", "--models", "tiny-lstm")
    if cuda_starts(root / "tiny-lstm/1/encoder.onnx"):
        lines: list[str] = []
        _wait_ready(proc, lines)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        log = "".join(lines)
        assert "device cuda" in log and "model tiny-lstm version 1 is READY" in log
        return
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert "CUDAExecutionProvider" in err and "--device cpu" in err
    if "CUDAExecutionProvider" in ort.get_available_providers():  # listed, but it did not start: not served on CPU
        assert "did not start it" in err and "ready: gRPC port" not in err


@pytest.mark.parametrize(("device", "device_id"), [("cpu", "1"), ("cuda", "-1")])
def test_a_device_id_without_cuda_or_below_zero_is_refused(tiny_repository, device, device_id):
    root = tiny_repository if isinstance(tiny_repository, Path) else Path(tiny_repository.root)
    proc = _serve(root, "--device", device, "--device-id", device_id)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert f"--device-id: device id {device_id}: a GPU's number (0 or more), with device cuda" in err
    assert "Traceback" not in err


def test_json_log_lines_carry_extra_fields():
    import logging

    from seqserve.server.logs import JsonFormatter

    record = logging.makeLogRecord({"name": "x", "levelname": "INFO", "msg": "Translate for %s", "args": ("m",),
                                    "rpc": "Translate", "code": "NOT_FOUND"})  # fmt: skip
    line = json.loads(JsonFormatter().format(record))
    assert line["message"] == "Translate for m" and line["rpc"] == "Translate" and line["code"] == "NOT_FOUND"


def test_an_open_stream_stops_being_read_at_the_drain_and_ends_unavailable(tiny_repository):
    """After the drain delay an open TranslateStream answers what it read and ends UNAVAILABLE "shutting down", so
    its client sends the rest elsewhere. It was read on until the grace period ran out and then cut off by gRPC
    ("Cancelling all calls"), holding the shutdown for the whole grace period."""
    from seqserve.server.config import ServerConfig
    from seqserve.server.repository import ModelRepository
    from seqserve.server.testing import ServerThread

    config = ServerConfig(port=0, metrics_port=None, instances=1, threads=1, models=("tiny-gru",))
    running = ServerThread(config, ModelRepository(tiny_repository))
    sending = threading.Event()
    sending.set()

    def items():
        n = 0
        while sending.is_set():
            yield pb.TranslateStreamRequest(id=str(n), model=pb.ModelSpec(name="tiny-gru"), text="c b a")
            n += 1
            time.sleep(0.03)

    stopper = threading.Thread(target=running.stop, kwargs={"grace": 60.0})
    answered, began = [], 0.0
    try:
        with grpc.insecure_channel(running.address) as channel:
            stream = pb_grpc.InferenceStub(channel).TranslateStream(items(), timeout=120)
            with pytest.raises(grpc.RpcError) as ended:
                for response in stream:
                    assert not response.error_code, response.error_message
                    answered.append(response.id)
                    if len(answered) == 3:
                        began = time.monotonic()
                        stopper.start()  # SIGTERM's drain, no delay: from now on no new work
        assert ended.value.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in ended.value.details()
        assert time.monotonic() - began < 30  # not the 60 s grace period
        assert len(set(answered)) == len(answered) >= 3
    finally:
        sending.clear()
        if stopper.ident:
            stopper.join(90)
        else:
            running.stop(0.1)


def test_a_stream_cancelled_while_waiting_for_its_next_item_leaves_nothing_behind(tiny_repository, caplog):
    """The read waiting for the next item is dropped with the stream: it was left pending, and asyncio logged "Task
    exception was never retrieved" for every stream a client cancelled or let run past its deadline."""
    import gc
    import logging

    from seqserve.server.config import ServerConfig
    from seqserve.server.repository import ModelRepository
    from seqserve.server.testing import ServerThread

    config = ServerConfig(port=0, metrics_port=None, instances=1, threads=1, models=("tiny-gru",))
    caplog.set_level(logging.ERROR, logger="asyncio")
    with ServerThread(config, ModelRepository(tiny_repository)) as running, \
            grpc.insecure_channel(running.address) as channel:  # fmt: skip
        stub = pb_grpc.InferenceStub(channel)
        for timeout in (30.0, 0.5):  # the client cancels; the deadline passes
            hold = threading.Event()

            def items():
                yield pb.TranslateStreamRequest(id="1", model=pb.ModelSpec(name="tiny-gru"), text="c b a")
                hold.wait(10)  # the stream stays open: the server waits for the next item

            call = stub.TranslateStream(items(), timeout=timeout)
            assert next(call).id == "1"
            if timeout > 1:
                call.cancel()
            with pytest.raises(grpc.RpcError) as ended:
                list(call)
            hold.set()
            assert ended.value.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED)
        time.sleep(0.3)

        async def collect() -> None:  # on the server's loop, where a dropped task's error would be reported
            gc.collect()

        running.call(collect())
        time.sleep(0.2)
    assert not [r for r in caplog.records if r.name == "asyncio"], [r.getMessage() for r in caplog.records]
