"""The model repository, read side: manifests, hash checks and onnxruntime sessions. No torch.

Layout (docs/design.md)::

    REPO/NAME/VERSION/manifest.json + the files it lists     NAME: [a-z0-9][a-z0-9._-]*, VERSION: positive integer
    REPO/NAME/config.json                                    optional serving settings

Only folders whose name is a positive integer and that hold a ``manifest.json`` are versions; the export writes a
version into a hidden temporary folder and renames it into place, so a half-written version is never listed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnxruntime as ort
from tokenizers import Tokenizer

from seqserve.server.config import SERVING_CONFIG_KEYS, ConfigError, check_batching_setting

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
# A decoder step graph may end in TopK over its log_probs (export/graphs.add_top_k): K from the int64 [1] input, the
# best K log-probabilities and their token ids per row, best first, ties to the lower id. Older graphs lack it.
DECODER_TOP_K_INPUT = "topk"
DECODER_TOP_K_OUTPUTS = ("topk_log_probs", "topk_ids")
# A decoder step input (Transformers): (batch, cache_len) True at cached positions a row must not see, so that a
# sentence can join a running batch with its cache padded in front (models/transformer.py decode_step).
DECODER_CACHE_PAD_MASK = "cache_pad_mask"
# Row gathers over the decoder's state and memory tensors (export/graphs.add_row_gather), so a decoder on a GPU keeps
# them there between steps (server/translation.py): graph "gather_<group>" takes int64 `rows` (R',) and the group's
# tensors as the decoder step takes them, and returns `gathered_<name>` = tensor[rows] for each. Older exports lack
# them and keep the state on the host.
GATHER_GRAPHS = {"state": "gather_state", "memory": "gather_memory"}
GATHER_ROWS_INPUT = "rows"
GATHERED_PREFIX = "gathered_"
MANIFEST_FILE = "manifest.json"
SERVING_CONFIG_FILE = "config.json"
NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]*\Z")
NAME_MAX_CHARS = 255  # a folder name: longer is no model (and the file system would refuse to look it up)
VERSION_PATTERN = re.compile(r"[1-9][0-9]*\Z")
MAX_VERSION = 2**32 - 1  # the API's version fields are uint32: a folder numbered above is no version
TASKS = ("translation", "bert")

_OPTIMIZATION_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


# --------------------------------------------------------------------------------------------------------------
# Errors


class RepositoryError(Exception):
    """A model repository, model or version that cannot be read or trusted."""


def shown_name(name: str, limit: int = 80) -> str:
    """A client-given model name as messages and logs show it: as it is when it could be a model name, else quoted
    with its control characters escaped, and cut to `limit` characters (a client can send 4 MB of name)."""
    if NAME_PATTERN.match(name) and len(name) <= limit:
        return name
    clipped = repr(name[:limit])
    return clipped + f"... ({len(name)} characters)" if len(name) > limit else clipped


class ModelNotFound(RepositoryError):
    """No such model or version; the message lists what exists."""

    def __init__(self, name: str, version: int | None, available: dict[str, list[int]]):
        self.name, self.version, self.available = name, version, available
        shown = shown_name(name)
        what = shown if version is None else f"{shown} version {version}"
        listing = "; ".join(
            f"{n} (versions {', '.join(map(str, v))})" for n, v in sorted(available.items())
        ) or "none"
        super().__init__(f"model {what} is not in the repository; available: {listing}")


class TamperedFile(RepositoryError):
    """A file whose sha256 (or size) differs from the manifest, or that is missing."""

    def __init__(self, path: Path, expected: str, actual: str | None):
        self.path, self.expected, self.actual = path, expected, actual
        if actual is None:
            super().__init__(f"{path.name} is listed in the manifest but missing from {path.parent}")
        else:
            super().__init__(
                f"{path.name} in {path.parent} does not match its manifest: sha256 {actual} != expected {expected}"
            )


class UnknownFormatVersion(RepositoryError):
    def __init__(self, path: Path, found: Any, supported: int = FORMAT_VERSION):
        self.path, self.found, self.supported = path, found, supported
        super().__init__(
            f"{path}: manifest format_version {found!r} is not supported (this server reads format_version "
            f"{supported}); re-export the model with a matching seqserve"
        )


class ProviderUnavailable(RepositoryError):
    def __init__(self, provider: str, available: list[str]):
        self.provider, self.available = provider, available
        # seqserve is not on PyPI: its [cuda] extra installs from a checkout (or a built wheel).
        hint = (" (install onnxruntime-gpu: pip install '.[cuda]' in a seqserve checkout, or pip install "
                "onnxruntime-gpu)") if provider == "cuda" else ""
        super().__init__(
            f"execution provider {provider!r} ({_PROVIDERS.get(provider, provider)}) is not available in this "
            f"onnxruntime; available: {', '.join(available)}{hint}"
        )


class ProviderFailed(RepositoryError):
    """onnxruntime lists the provider but started the session without it, or on another GPU than asked (it falls back
    to the CPU when, say, the CUDA provider's libraries do not load or the GPU asked for is not there), which would
    serve elsewhere than the operator asked (placement_error)."""

    def __init__(self, provider: str, path: str | os.PathLike, got: list[str], message: str = ""):
        self.provider, self.path, self.got = provider, Path(path), got
        super().__init__(message or (
            f"{path}: onnxruntime {ort.__version__} lists {_PROVIDERS[provider]} but did not start it for this graph "
            f"(the session runs on {', '.join(got)}; onnxruntime's log above says why, usually CUDA or cuDNN libraries "
            f"missing or of another major version than the onnxruntime-gpu build links); install the CUDA that this "
            f"onnxruntime-gpu was built for, or serve with --device cpu"
        ))


def placement_error(
    options: SessionOptions, path: str | os.PathLike, providers: list[str], provider_options: dict[str, dict[str, str]]
) -> ProviderFailed | None:
    """Why a session that onnxruntime started (its `get_providers()` and `get_provider_options()`) does not run where
    `options` asked, or None. onnxruntime retries a session it could not start with fallback providers and says so
    only on standard output: onnxruntime-gpu 1.31 on a one-GPU H100 asked for GPU 99 fell back to the CPU. A session
    on CUDA but on another GPU than asked (a fallback to CUDA's default options would be GPU 0) is refused too."""
    asked = _PROVIDERS[options.provider]
    gpu = options.device_id
    advice = "GPUs are numbered from 0, after CUDA_VISIBLE_DEVICES; give --device-id a GPU this machine has"
    if providers[0] != asked:
        if not gpu:  # GPU 0 is there wherever CUDA runs at all: the libraries are the likely cause
            return ProviderFailed(options.provider, path, providers)
        return ProviderFailed(options.provider, path, providers, message=(
            f"{path}: onnxruntime {ort.__version__} could not start {asked} on GPU {gpu} (the session runs on "
            f"{', '.join(providers)}; onnxruntime's output above says why: a GPU number this machine lacks, or CUDA "
            f"libraries missing); {advice}"
        ))  # fmt: skip
    got = provider_options.get(asked, {}).get("device_id", "0") if options.provider == "cuda" else "0"
    if got != str(gpu):
        return ProviderFailed(options.provider, path, providers, message=(
            f"{path}: onnxruntime {ort.__version__} started {asked} on GPU {got}, not on GPU {gpu} as asked "
            f"(onnxruntime's output above says why); {advice}"
        ))  # fmt: skip
    return None


# --------------------------------------------------------------------------------------------------------------
# Manifest


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name: "int64", "bool", "float32"
    shape: tuple[str | int, ...]  # symbolic axes are names ("batch", "src_len"), fixed ones ints

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TensorSpec":
        return cls(d["name"], d["dtype"], tuple(d["shape"]))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class GraphSpec:
    file: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GraphSpec":
        return cls(
            d["file"],
            tuple(TensorSpec.from_dict(t) for t in d["inputs"]),
            tuple(TensorSpec.from_dict(t) for t in d["outputs"]),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
        }

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]


@dataclass(frozen=True)
class Manifest:
    """manifest.json of one model version (docs/design.md); `raw` keeps every field, known or not."""

    format_version: int
    name: str
    version: int
    task: str  # "translation" | "bert"
    architecture: str
    config: dict[str, Any]
    files: dict[str, dict[str, Any]]  # file -> {"sha256", "bytes"}
    graphs: dict[str, GraphSpec]  # "encoder"/"decoder" for translators, "model" for BERT
    tokenizers: dict[str, str]  # role ("source"/"target" or "text") -> file
    special_tokens: dict[str, int]
    limits: dict[str, int]
    decoder: dict[str, list[str]] | None = None  # translators: {"memory": [...], "state": [...]}
    outputs: tuple[str, ...] = ()  # BERT: the outputs model.onnx has
    pooling: str | None = None  # BERT: "cls" | "mean"
    quantization: str | None = None
    parity: dict[str, Any] = field(default_factory=dict)
    quality: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    created: str = ""
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any], path: Path | None = None) -> "Manifest":
        where = path or Path(MANIFEST_FILE)
        if not isinstance(d, dict):
            raise RepositoryError(f"{where}: malformed manifest (a JSON {type(d).__name__}, not an object)")
        if d.get("format_version") != FORMAT_VERSION:
            raise UnknownFormatVersion(where, d.get("format_version"))
        try:
            manifest = cls(
                format_version=d["format_version"],
                name=d["name"],
                version=int(d["version"]),
                task=d["task"],
                architecture=d["architecture"],
                config=d["config"],
                files=d["files"],
                graphs={k: GraphSpec.from_dict(g) for k, g in d["graphs"].items()},
                tokenizers=d["tokenizers"],
                special_tokens=d["special_tokens"],
                limits=d.get("limits", {}),
                decoder=d.get("decoder"),
                outputs=tuple(d.get("outputs") or ()),
                pooling=d.get("pooling"),
                quantization=d.get("quantization"),
                parity=d.get("parity") or {},
                quality=d.get("quality") or {},
                metrics=d.get("metrics") or {},
                created=d.get("created", ""),
                raw=d,
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:  # AttributeError: a list where an object goes
            raise RepositoryError(f"{where}: malformed manifest ({type(exc).__name__}: {exc})") from exc
        for file, entry in manifest.files.items():
            # Every file is the version's own: a listed path that leaves the folder is not part of the version.
            if Path(file).is_absolute() or ".." in Path(file).parts:
                raise RepositoryError(f"{where}: file {file!r} is outside the version folder")
            if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
                raise RepositoryError(f"{where}: file {file!r} has no sha256 in the manifest's file list")
        if manifest.task not in TASKS:
            raise RepositoryError(f"{where}: unknown task {manifest.task!r}; known: {', '.join(TASKS)}")
        for role, file in manifest.tokenizers.items():
            if file not in manifest.files:
                raise RepositoryError(f"{where}: tokenizer {role} file {file} is not in the manifest's file list")
        for graph, spec in manifest.graphs.items():
            if spec.file not in manifest.files:
                raise RepositoryError(f"{where}: graph {graph} file {spec.file} is not in the manifest's file list")
        return manifest

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.raw)
        d.update(
            format_version=self.format_version, name=self.name, version=self.version, task=self.task,
            architecture=self.architecture, config=self.config, files=self.files,
            graphs={k: g.to_dict() for k, g in self.graphs.items()}, tokenizers=self.tokenizers,
            special_tokens=self.special_tokens, limits=self.limits, decoder=self.decoder,
            outputs=list(self.outputs), pooling=self.pooling, quantization=self.quantization, parity=self.parity,
            quality=self.quality, metrics=self.metrics, created=self.created,
        )  # fmt: skip
        return d

    @classmethod
    def read(cls, version_dir: str | os.PathLike) -> "Manifest":
        path = Path(version_dir) / MANIFEST_FILE
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise RepositoryError(f"{path.parent} is not a model version: {MANIFEST_FILE} is missing") from exc
        except json.JSONDecodeError as exc:
            raise RepositoryError(f"{path}: not valid JSON ({exc})") from exc
        except UnicodeDecodeError as exc:
            raise RepositoryError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
        except OSError as exc:  # a folder named manifest.json, no permission to read it...
            raise RepositoryError(f"{path}: cannot be read ({exc.strerror or exc})") from exc
        return cls.from_dict(data, path)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def verify_files(version_dir: str | os.PathLike, manifest: Manifest) -> None:
    """Check the size and sha256 of every file the manifest lists; raise TamperedFile naming the first bad one."""
    root = Path(version_dir)
    for name, entry in sorted(manifest.files.items()):
        path = root / name
        if not path.is_file():
            raise TamperedFile(path, entry["sha256"], None)
        # Size first: a cheap check that catches truncation without hashing.
        if "bytes" in entry and path.stat().st_size != entry["bytes"]:
            raise TamperedFile(path, entry["sha256"], f"(size {path.stat().st_size} != {entry['bytes']} bytes)")
        actual = sha256_file(path)
        if actual != entry["sha256"]:
            raise TamperedFile(path, entry["sha256"], actual)


# --------------------------------------------------------------------------------------------------------------
# Sessions


_shared_pool_lock = threading.Lock()
_shared_pool_sizes: tuple[int, int] | None = None  # (intra, inter) of this process's shared pools, once created


def shared_thread_pool(intra_op_threads: int, inter_op_threads: int) -> tuple[int, int]:
    """Create this process's shared onnxruntime thread pools (once); returns their (intra, inter) sizes.

    onnxruntime can give every session of a process one intra-op pool instead of a pool each. Its threads spin a
    little after each run, so a decoder's next step (or the next request) finds them awake, and, being one pool,
    they never spin against another session's. It is a decision for the whole process: once the pools exist,
    onnxruntime refuses sessions with pools of their own, and the sizes cannot change. `seqserve serve` makes it
    at start (`--per-session-threads` to keep a pool per session); library users opt in by calling this first."""
    global _shared_pool_sizes
    wanted = (intra_op_threads, inter_op_threads)
    with _shared_pool_lock:
        if _shared_pool_sizes is None:
            ort.set_global_thread_pool_sizes(*wanted)
            _shared_pool_sizes = wanted
            log.info("onnxruntime: one shared pool of %d intra-op threads for every session", intra_op_threads)
        elif _shared_pool_sizes != wanted:
            log.warning(
                "onnxruntime's shared pools have %d intra-op / %d inter-op threads for the life of this process; "
                "%d / %d asked for are ignored", *_shared_pool_sizes, *wanted,
            )  # fmt: skip
        return _shared_pool_sizes


def device_id_error(device: str, device_id: int) -> str | None:
    """Why `device_id` cannot go with `device` ("cpu" | "cuda"), or None: a GPU's number, 0 or more, for cuda only."""
    if device_id < 0 or (device_id and device != "cuda"):
        return f"device id {device_id}: a GPU's number (0 or more), with device cuda"
    return None


@dataclass(frozen=True)
class SessionOptions:
    """How onnxruntime runs a model: execution provider, threads, spinning, graph optimisation."""

    provider: str = "cpu"  # "cpu" | "cuda"
    device_id: int = 0  # which GPU, with provider "cuda" (onnxruntime's numbering: CUDA_VISIBLE_DEVICES applies)
    intra_op_threads: int = 1
    inter_op_threads: int = 1
    # Per-session pools: spinning threads burn idle CPU between requests and the pools of several sessions spin
    # against each other, so spinning is off unless asked for.
    allow_spinning: bool = False
    # Once the process has made its shared pools (shared_thread_pool), every session uses them instead, and the
    # thread counts and spinning here are ignored.
    graph_optimization: str = "all"  # "disable" | "basic" | "extended" | "all"
    # onnxruntime's CPU memory arena: off saves ~135 MiB peak RSS on a batch 32 x 128 BERT but ran those batches
    # ~1.5-2x slower here (docs/benchmarks.md, Levers adopted), so it stays on unless memory matters more.
    cpu_mem_arena: bool = True
    verify_hashes: bool = True

    def __post_init__(self) -> None:
        if self.provider not in _PROVIDERS:
            raise ValueError(f"provider {self.provider!r} is not one of {sorted(_PROVIDERS)}")
        if self.graph_optimization not in _OPTIMIZATION_LEVELS:
            raise ValueError(
                f"graph_optimization {self.graph_optimization!r} is not one of {sorted(_OPTIMIZATION_LEVELS)}"
            )
        if (error := device_id_error(self.provider, self.device_id)) is not None:
            raise ValueError(error)
        if self.intra_op_threads < 0 or self.inter_op_threads < 0:
            raise ValueError(
                f"thread counts must be >= 0 (0 = onnxruntime's default), got intra {self.intra_op_threads}, "
                f"inter {self.inter_op_threads}"
            )

    def providers(self) -> list[str | tuple[str, dict[str, str]]]:
        """onnxruntime's providers argument for these options; raises ProviderUnavailable when this onnxruntime has
        no such provider."""
        available = ort.get_available_providers()
        if _PROVIDERS[self.provider] not in available:
            raise ProviderUnavailable(self.provider, available)
        return self.provider_entries()

    def provider_entries(self) -> list[str | tuple[str, dict[str, str]]]:
        """The providers argument, unchecked: CUDA with its device id, then the CPU for the operators it lacks."""
        if self.provider == "cpu":
            return [_PROVIDERS["cpu"]]
        return [(_PROVIDERS[self.provider], {"device_id": str(self.device_id)}), "CPUExecutionProvider"]

    def disabled_optimizers(self) -> list[str]:
        """onnxruntime graph transformers these sessions skip. On CPU, SkipLayerNormFusion: onnxruntime's CPU
        SkipLayerNormalization costs ~5x the Add + LayerNormalization it would replace (export/quantize.py
        optimize_graph), and the export leaves those unfused in encoders for this; CUDA's fused kernel is fast."""
        return ["SkipLayerNormFusion"] if self.provider == "cpu" else []

    def open(
        self, path: str | os.PathLike, *, log_severity_level: int | None = None,
        optimized_model_filepath: str | os.PathLike | None = None, profile_file_prefix: str | None = None,
    ) -> ort.InferenceSession:  # fmt: skip
        """An onnxruntime session on the graph at `path` with these options; for inspection, `optimized_model_filepath`
        also saves the graph as onnxruntime runs it (after its own optimisations) and `profile_file_prefix` turns on
        onnxruntime's profiler (its JSON trace is written where `session.end_profiling()` says)."""
        so = self.ort_options()
        if log_severity_level is not None:
            so.log_severity_level = log_severity_level
        if optimized_model_filepath is not None:
            so.optimized_model_filepath = str(optimized_model_filepath)
        if profile_file_prefix is not None:
            so.enable_profiling = True
            so.profile_file_prefix = profile_file_prefix
        providers = self.providers()
        session = ort.InferenceSession(
            str(path), sess_options=so, providers=providers, disabled_optimizers=self.disabled_optimizers()
        )
        # onnxruntime fell back to the CPU, or to another GPU: refuse rather than serve elsewhere than asked
        if (error := placement_error(self, path, session.get_providers(), session.get_provider_options())) is not None:
            raise error
        return session

    def ort_options(self) -> ort.SessionOptions:
        so = ort.SessionOptions()
        so.graph_optimization_level = _OPTIMIZATION_LEVELS[self.graph_optimization]
        so.enable_cpu_mem_arena = self.cpu_mem_arena
        if _shared_pool_sizes is not None:
            if _shared_pool_sizes != (self.intra_op_threads, self.inter_op_threads):
                log.debug("session asks for %d / %d threads; the process's shared pools have %d / %d",
                          self.intra_op_threads, self.inter_op_threads, *_shared_pool_sizes)  # fmt: skip
            so.use_per_session_threads = False  # thread counts and spinning are the shared pools'
            return so
        so.intra_op_num_threads = self.intra_op_threads
        so.inter_op_num_threads = self.inter_op_threads
        spin = "1" if self.allow_spinning else "0"
        so.add_session_config_entry("session.intra_op.allow_spinning", spin)
        so.add_session_config_entry("session.inter_op.allow_spinning", spin)
        return so


@dataclass
class LoadedModel:
    manifest: Manifest
    sessions: dict[str, ort.InferenceSession]  # graph name ("encoder", "decoder", "model") -> session
    tokenizers: dict[str, Tokenizer]  # role -> tokenizer
    path: Path


def load_model(
    version_dir: str | os.PathLike, options: SessionOptions | None = None, in_repository: bool = False
) -> LoadedModel:
    """Read a version's manifest, verify its files and open one onnxruntime session per graph. `in_repository`: the
    folder is REPO/NAME/VERSION, and its manifest must name that model and version (check_location)."""
    options = options or SessionOptions()
    root = Path(version_dir)
    manifest = Manifest.read(root)
    if in_repository:
        check_location(manifest, root)
    if options.verify_hashes:
        verify_files(root, manifest)
    options.providers()  # a missing provider fails here, before any graph is opened
    sessions: dict[str, ort.InferenceSession] = {}
    for graph, spec in manifest.graphs.items():
        try:
            session = options.open(root / spec.file)
        except ProviderFailed:
            raise
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise RepositoryError(f"{root / spec.file}: onnxruntime could not load the graph: {exc}") from exc
        got_in = [i.name for i in session.get_inputs()]
        got_out = [o.name for o in session.get_outputs()]
        if got_in != spec.input_names or got_out != spec.output_names:
            raise RepositoryError(
                f"{root / spec.file}: graph inputs {got_in} / outputs {got_out} differ from the manifest's "
                f"{spec.input_names} / {spec.output_names}"
            )
        sessions[graph] = session
    tokenizers = {}
    for role, file in manifest.tokenizers.items():
        try:
            tokenizers[role] = Tokenizer.from_file(str(root / file))
        except Exception as exc:  # tokenizers raises a bare Exception naming no file
            raise RepositoryError(f"{root / file}: not a tokenizer the tokenizers library can read ({exc})") from exc
    log.info(
        "loaded %s version %d from %s (provider %s, intra-op threads %d, inter-op threads %d, optimisation %s)",
        manifest.name, manifest.version, root, options.provider, options.intra_op_threads,
        options.inter_op_threads, options.graph_optimization,
    )  # fmt: skip
    return LoadedModel(manifest, sessions, tokenizers, root)


def check_location(manifest: Manifest, version_dir: str | os.PathLike) -> None:
    """A version is served under its folder's name and number (REPO/NAME/VERSION), and answers name the manifest's:
    the two must agree. A copied folder (`cp -r en-de/1 en-de/2`) that kept its manifest is refused, not served as a
    second copy of another version (its answers naming that version, and unloading one taking down the other)."""
    folder = Path(version_dir)
    if (manifest.name, str(manifest.version)) != (folder.parent.name, folder.name):
        raise RepositoryError(
            f"{folder}: its manifest says model {manifest.name!r} version {manifest.version}, the folder is "
            f"{folder.parent.name}/{folder.name}; a version must be exported into its own folder (seqserve export "
            "--version), or its manifest's name and version set to the folder's"
        )


# --------------------------------------------------------------------------------------------------------------
# Repository


class ModelRepository:
    """A folder of models, each a folder of numbered versions."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        if not self.root.is_dir():
            raise RepositoryError(f"model repository {self.root} does not exist or is not a folder")

    def versions(self, name: str) -> list[int]:
        """Complete versions of a model (those with a manifest), ascending."""
        folder = self.root / name
        if len(name) > NAME_MAX_CHARS or not NAME_PATTERN.match(name) or not folder.is_dir():
            return []
        return sorted(
            int(p.name) for p in folder.iterdir()
            if VERSION_PATTERN.match(p.name) and int(p.name) <= MAX_VERSION and (p / MANIFEST_FILE).is_file()
        )

    def models(self) -> dict[str, list[int]]:
        """Every model with at least one complete version -> its versions, ascending."""
        found = {}
        for p in sorted(self.root.iterdir()):
            if p.is_dir() and NAME_PATTERN.match(p.name) and (versions := self.versions(p.name)):
                found[p.name] = versions
        return found

    def version_dir(self, name: str, version: int | None = None) -> Path:
        """The folder of a version (the highest when `version` is None or 0)."""
        versions = self.versions(name)
        if not versions or (version and version not in versions):
            raise ModelNotFound(name, version or None, self.models())
        return self.root / name / str(version or versions[-1])

    def manifest(self, name: str, version: int | None = None) -> Manifest:
        version_dir = self.version_dir(name, version)
        manifest = Manifest.read(version_dir)
        check_location(manifest, version_dir)
        return manifest

    def load(self, name: str, version: int | None = None, options: SessionOptions | None = None) -> LoadedModel:
        return load_model(self.version_dir(name, version), options, in_repository=True)

    def serving_config(self, name: str) -> dict[str, Any]:
        """REPO/NAME/config.json, checked (a model's batching settings, SERVING_CONFIG_KEYS), or {} when absent."""
        path = self.root / name / SERVING_CONFIG_FILE
        if not path.is_file():
            return {}
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise RepositoryError(f"{path}: not valid JSON ({exc})") from exc
        if not isinstance(data, dict):
            kind = type(data).__name__
            raise RepositoryError(f"{path}: a JSON object of batching settings is expected, not a {kind}")
        for key, value in data.items():
            if key not in SERVING_CONFIG_KEYS:
                raise RepositoryError(f"{path}: unknown setting {key!r}; known: {', '.join(SERVING_CONFIG_KEYS)}")
            try:
                check_batching_setting(key, value, name=key)
            except ConfigError as exc:
                raise RepositoryError(f"{path}: {exc}") from None
        return data
