"""Checkpoint folders: weights (safetensors), config JSON, tokenizers, metrics. No pickles.

Layout (see docs/design.md)::

    model.safetensors   config.json   source_tokenizer.json + target_tokenizer.json | tokenizer.json   metrics.json
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

# family -> (module, config class, model class)
FAMILIES: dict[str, tuple[str, str, str]] = {
    "rnn": ("seqserve.models.rnn", "RNNConfig", "RNNTranslator"),
    "transformer": ("seqserve.models.transformer", "TransformerConfig", "TransformerTranslator"),
    "bert": ("seqserve.models.bert", "BertConfig", "Bert"),
}

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
METRICS_FILE = "metrics.json"
# What `seqserve evaluate` (models/evaluate.py) merges into metrics.json: scores of the weights it read, stale once
# new weights are saved. Training's own keys (dev_*, step, train_loss, steps_trained, ...) are not among them.
EVALUATION_KEYS = frozenset({"bleu", "chrf", "exact_match", "mlm_accuracy", "nsp_accuracy"})
EVALUATION_PREFIX = "eval_"
TOKENIZER_FILES = {"source": "source_tokenizer.json", "target": "target_tokenizer.json", "text": "tokenizer.json"}
# The tokenizers each family needs: a checkpoint without one is incomplete.
FAMILY_TOKENIZERS = {"rnn": ("source", "target"), "transformer": ("source", "target"), "bert": ("text",)}


class CheckpointError(Exception):
    """A checkpoint folder is missing a file or holds something we cannot read."""


@dataclass
class Checkpoint:
    family: str
    config: Any  # the family's frozen dataclass config
    model: torch.nn.Module
    tokenizers: dict[str, Tokenizer]  # "source"/"target" for translators, "text" for BERT
    metrics: dict[str, Any]
    path: Path

    def require_tokenizers(self) -> "Checkpoint":
        """This checkpoint, or CheckpointError naming the tokenizer files it lacks (export and evaluation need them; a
        weights-only checkpoint is fine for loading the model)."""
        missing = [TOKENIZER_FILES[r] for r in FAMILY_TOKENIZERS[self.family] if r not in self.tokenizers]
        if missing:
            files = ", ".join(missing)
            raise CheckpointError(f"{self.path} is not a complete {self.family} checkpoint: {files} missing")
        return self


def load_weights(
    model: torch.nn.Module, state: dict[str, torch.Tensor], misfit: str, error: type[Exception]
) -> tuple[list[str], list[str]]:
    """`model.load_state_dict(state, strict=False)` -> (missing, unexpected); a weight whose shape is not the
    config's raises `error` as "MISFIT: the first size mismatch (and how many more)"."""
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        sizes = [line.strip() for line in str(e).splitlines() if "size mismatch" in line] or [str(e).strip()]
        more = f" (and {len(sizes) - 1} more)" if len(sizes) > 1 else ""
        raise error(f"{misfit}: {sizes[0]}{more}") from None
    return list(missing), list(unexpected)


def family_of(model: torch.nn.Module) -> str:
    for family, (module, _, cls) in FAMILIES.items():
        if type(model).__name__ == cls and type(model).__module__ == module:
            return family
    raise CheckpointError(f"{type(model).__name__} is not a seqserve model family ({', '.join(FAMILIES)})")


def build_model(family: str, config_dict: dict[str, Any]) -> tuple[Any, torch.nn.Module]:
    """The config dataclass and a freshly initialised model of a family."""
    if family not in FAMILIES:
        raise CheckpointError(f"unknown model family {family!r}; known: {', '.join(FAMILIES)}")
    module_name, config_name, model_name = FAMILIES[family]
    module = importlib.import_module(module_name)
    config_cls = getattr(module, config_name)
    fields = {f.name for f in dataclasses.fields(config_cls)}
    if not isinstance(config_dict, dict):
        raise CheckpointError(f"the {family} config is a {type(config_dict).__name__}, not an object of fields")
    unknown = sorted(set(config_dict) - fields)
    if unknown:
        raise CheckpointError(f"{config_name} has no field(s) {unknown}")
    try:
        config = config_cls(**config_dict)
        return config, getattr(module, model_name)(config)
    except (TypeError, ValueError) as e:  # a missing field, or the family's own *ConfigError naming the numbers
        raise CheckpointError(f"{config_name}: {e}") from None


def _write_json(path: Path, data: Any) -> None:
    # Write then rename, so a reader never sees half a file.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def save_checkpoint(
    directory: str | os.PathLike,
    model: torch.nn.Module,
    tokenizers: dict[str, Tokenizer],
    metrics: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint folder (weights, config, tokenizers, metrics); the evaluation scores of the weights it
    replaces leave metrics.json."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    # Before the weights change, so that metrics.json never shows old scores beside new weights (--resume, export).
    _forget_evaluation(path)
    family = family_of(model)
    config = model.config
    _write_json(path / CONFIG_FILE, {"family": family, "config": dataclasses.asdict(config)})
    # safetensors refuses tensors that share storage (tied embeddings): store contiguous clones.
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    tmp = path / f".{WEIGHTS_FILE}.tmp"
    save_file(state, str(tmp))
    os.replace(tmp, path / WEIGHTS_FILE)
    for role, tok in tokenizers.items():
        if role not in TOKENIZER_FILES:
            raise CheckpointError(f"tokenizer role {role!r} is not one of {sorted(TOKENIZER_FILES)}")
        tok.save(str(path / TOKENIZER_FILES[role]))
    if metrics is not None:
        save_metrics(path, metrics)
    return path


def save_metrics(directory: str | os.PathLike, metrics: dict[str, Any]) -> None:
    """Merge `metrics` into the checkpoint's metrics.json."""
    path = Path(directory) / METRICS_FILE
    current = json.loads(path.read_text()) if path.exists() else {}
    current.update(metrics)
    _write_json(path, current)


def is_evaluation_key(key: str) -> bool:
    """Whether a metrics.json key is a score `seqserve evaluate` gave particular weights."""
    return key in EVALUATION_KEYS or key.startswith(EVALUATION_PREFIX)


def _forget_evaluation(directory: Path) -> None:
    path = directory / METRICS_FILE
    if not path.exists():
        return
    current = json.loads(path.read_text())
    kept = {k: v for k, v in current.items() if not is_evaluation_key(k)}
    if kept != current:
        _write_json(path, kept)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} cannot be read as JSON: {e}") from None


def load_checkpoint(directory: str | os.PathLike, map_location: str = "cpu") -> Checkpoint:
    """Read a checkpoint folder back into a model in eval mode; CheckpointError names the file at fault."""
    path = Path(directory)
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        raise CheckpointError(f"{path} is not a checkpoint: {CONFIG_FILE} is missing")
    meta = _read_json(config_path)
    if not isinstance(meta, dict) or "family" not in meta or "config" not in meta:
        raise CheckpointError(f"{config_path}: expected an object with \"family\" and \"config\"")
    try:
        config, model = build_model(meta["family"], meta["config"])
    except CheckpointError as e:
        raise CheckpointError(f"{config_path}: {e}") from None
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{path} is not a checkpoint: {WEIGHTS_FILE} is missing")
    try:
        state = load_file(str(weights), device=map_location)
    except Exception as e:  # safetensors raises its own SafetensorError (truncated file, bad header) or OSError
        raise CheckpointError(f"{weights} cannot be read as safetensors: {e}") from None
    missing, unexpected = load_weights(model, state, f"{weights} does not fit {config_path}", CheckpointError)
    # Tied weights are stored twice and loaded once; anything else missing is an error.
    missing = [k for k in missing if k not in state]
    if missing or unexpected:
        raise CheckpointError(f"{weights}: missing weights {missing[:5]}, unexpected weights {unexpected[:5]}")
    model.eval()
    tokenizers = {}
    for role, name in TOKENIZER_FILES.items():
        if (path / name).is_file():
            try:
                tokenizers[role] = Tokenizer.from_file(str(path / name))
            except Exception as e:  # the tokenizers library raises a bare Exception
                raise CheckpointError(f"{path / name} is not a tokenizer: {e}") from None
    metrics_path = path / METRICS_FILE
    metrics = _read_json(metrics_path) if metrics_path.is_file() else {}
    if not isinstance(metrics, dict):
        raise CheckpointError(f"{metrics_path}: expected an object of metrics, got a {type(metrics).__name__}")
    return Checkpoint(meta["family"], config, model, tokenizers, metrics, path)
