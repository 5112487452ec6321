"""`seqserve train translator|bert`: teacher-forced training with validation, best checkpoint, resume and time budget.

One loop (``_fit``) trains every family: Adam with gradient-norm clipping and a learning-rate schedule, batches from
``models/batching.py``, validation every N steps keeping the checkpoint with the lowest dev loss, and a
``train_state.pt`` (latest weights, optimizer, scheduler, step, data position, RNG states; plain tensors and numbers, so
it loads with ``weights_only=True``) from which ``--resume`` continues exactly as if never stopped.

The command line is ``models/train_cli.py``; the synthetic tasks and tiny checkpoints are ``models/synthetic.py``.

Letters: B batch, S source length, T target length, V vocabulary.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import random
import re
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from tqdm import tqdm

from seqserve.models.batching import BatchPosition, BatchStream, token_budget_batches
from seqserve.models.checkpoint import build_model, save_checkpoint, save_metrics
from seqserve.models.tokenization import WORDPIECE_WRITES_BADLY

logger = logging.getLogger(__name__)

TRAIN_STATE_FILE = "train_state.pt"
TRANSLATOR_ARCHS = ("lstm", "gru", "birnn-lstm", "birnn-gru", "transformer")
ATTENTIONS = ("dot", "general", "additive", "scaled_dot")
SCHEDULES = ("auto", "constant", "inverse-sqrt", "linear")
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2  # translator special ids, fixed by docs/design.md
RUN_ONLY_SETTINGS = frozenset({"time_budget", "threads", "progress"})  # may change on --resume without changing results
# Settings that make the model and its vocabulary: a resumed run takes them from the checkpoint, whatever is asked.
MODEL_SETTINGS = frozenset({"arch", "embed_size", "hidden_size", "layers", "heads", "ff_size", "dropout", "attention",
                            "peephole", "norm", "vocab_size", "vocab_kind", "joint_vocab"})  # fmt: skip
# What a run writes into its output folder: training into a folder holding one of them needs --resume or --force.
OUTPUT_FILES = ("config.json", "model.safetensors", "metrics.json", "train_state.pt", "tokenizer.json",
                "source_tokenizer.json", "target_tokenizer.json")  # fmt: skip


class TrainingError(ValueError):
    """Training cannot start or continue with these settings or files."""


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on; saved in train_state.pt so a resumed run can be checked against it."""

    arch: str = "lstm"  # lstm | gru | birnn-lstm | birnn-gru | transformer | bert
    # model sizes
    embed_size: int = 256
    hidden_size: int = 256
    layers: int = 2
    heads: int = 4
    ff_size: int = 1024
    dropout: float = 0.1
    attention: str = "general"  # RNN attention score
    peephole: bool = False  # LSTM gates see the cell state
    norm: str = "pre"  # the Transformer translator's layer norm placement (BERT is post-norm)
    max_len: int = 128  # longer training examples are dropped (tokens, per side)
    # tokenizers (used only when none are given)
    vocab_size: int = 8000
    vocab_kind: str = "bpe"  # bpe | wordpiece (bert only; the tokenizers library's WordPiece trainer is not repeatable)
    joint_vocab: bool = False
    # optimisation
    token_budget: int = 4096  # padded tokens per batch
    lr: float = 1e-3  # peak learning rate
    schedule: str = "auto"  # auto: constant for RNNs, inverse-sqrt for the Transformer, linear decay for BERT
    warmup: int | None = None  # steps; None: 0 for RNNs, min(4000, steps // 10) otherwise
    label_smoothing: float = 0.0
    clip_norm: float = 1.0
    steps: int = 10000
    validate_every: int = 500
    bleu_sample: int = 200  # dev sentences greedily translated at each validation
    seed: int = 1
    time_budget: float | None = None  # seconds of wall clock for this run
    threads: int | None = None
    progress: bool = True
    # BERT
    mlm_probability: float = 0.15
    dev_fraction: float = 0.05  # documents held out for validation when no dev corpus is given

    def __post_init__(self) -> None:
        if self.arch not in (*TRANSLATOR_ARCHS, "bert"):
            raise TrainingError(f"unknown arch {self.arch!r}; known: {', '.join((*TRANSLATOR_ARCHS, 'bert'))}")
        if self.vocab_kind not in ("bpe", "wordpiece"):
            raise TrainingError(f"unknown vocab_kind {self.vocab_kind!r}; known: bpe, wordpiece")
        if self.vocab_kind == "wordpiece" and self.arch != "bert":
            raise TrainingError(f"vocab_kind wordpiece is for bert only, not {self.arch}: {WORDPIECE_WRITES_BADLY}")
        if self.schedule not in SCHEDULES:
            raise TrainingError(f"unknown schedule {self.schedule!r}; known: {', '.join(SCHEDULES)}")
        for name in ("steps", "validate_every", "token_budget", "max_len", "vocab_size", "embed_size", "hidden_size",
                     "layers", "heads", "ff_size"):  # fmt: skip
            if getattr(self, name) < 1:
                raise TrainingError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.threads is not None and self.threads < 1:
            raise TrainingError(f"threads must be at least 1, got {self.threads}")
        for name in ("warmup", "bleu_sample"):
            if (getattr(self, name) or 0) < 0:
                raise TrainingError(f"{name} must be at least 0, got {getattr(self, name)}")
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise TrainingError(f"lr must be positive, got {self.lr}")
        if not self.clip_norm > 0:
            raise TrainingError(f"clip_norm must be positive, got {self.clip_norm}")
        if self.time_budget is not None and not self.time_budget > 0:
            raise TrainingError(f"time_budget must be positive, got {self.time_budget}")
        for name in ("mlm_probability", "dev_fraction"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise TrainingError(f"{name} must be in (0, 1), got {getattr(self, name)}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise TrainingError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if not 0.0 <= self.dropout < 1.0:
            raise TrainingError(f"dropout must be in [0, 1), got {self.dropout}")

    def resolved_schedule(self) -> str:
        if self.schedule != "auto":
            return self.schedule
        return {"transformer": "inverse-sqrt", "bert": "linear"}.get(self.arch, "constant")

    def resolved_warmup(self) -> int:
        if self.warmup is not None:
            return self.warmup
        return 0 if self.resolved_schedule() == "constant" else min(4000, self.steps // 10)


def parse_duration(text: str) -> float:
    """Seconds in ``90``, ``90s``, ``20m``, ``1.5h``."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([smh]?)\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"duration {text!r} is not a number followed by s, m or h (e.g. 20m)")
    return float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[match.group(2)]


def lr_factor(schedule: str, warmup: int, total_steps: int) -> Callable[[int], float]:
    """The multiplier of the peak learning rate after ``step`` optimizer steps."""

    def factor(step: int) -> float:
        s = step + 1  # the step about to be taken
        ramp = min(1.0, s / warmup) if warmup > 0 else 1.0
        if schedule == "constant":
            return ramp
        if schedule == "inverse-sqrt":
            return ramp if s <= warmup else math.sqrt(max(warmup, 1) / s)
        if schedule == "linear":
            return ramp if s <= warmup else max(0.0, (total_steps - step) / max(1, total_steps - warmup))
        raise TrainingError(f"unknown schedule {schedule!r}; known: {', '.join(SCHEDULES)}")

    return factor


# ---------------------------------------------------------------------------------------------------------------------
# The training loop shared by every family


class _Task(Protocol):
    lengths: list[int | tuple[int, ...]]

    def loss(self, model: torch.nn.Module, indices: list[int]) -> tuple[torch.Tensor, int]: ...

    def validate(self, model: torch.nn.Module) -> dict[str, float]: ...

    def rng_state(self) -> dict[str, Any]: ...

    def set_rng_state(self, state: dict[str, Any]) -> None: ...


def _save_state(path: Path, state: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _fit(
    task: _Task,
    model: torch.nn.Module,
    config: TrainConfig,
    output_dir: Path,
    tokenizers: dict[str, Tokenizer],
    resume: bool,
    stop_at: int | None = None,
) -> dict[str, Any]:
    """Train ``model`` on ``task`` up to ``config.steps`` (this run: up to ``stop_at``, as if interrupted there);
    the best checkpoint and train_state.pt go to ``output_dir``."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TrainingError(f"cannot create the output folder {output_dir}: {e.strerror or e}") from None
    state_path = output_dir / TRAIN_STATE_FILE
    schedule, warmup = config.resolved_schedule(), config.resolved_warmup()
    betas = (0.9, 0.999) if schedule == "constant" else (0.9, 0.98)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, betas=betas)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(schedule, warmup, config.steps))
    step, position, elapsed_before = 0, BatchPosition(), 0.0
    best: dict[str, Any] = {"dev_loss": math.inf, "step": 0}
    if resume:
        if not state_path.is_file():
            raise TrainingError(f"cannot resume: {state_path} does not exist")
        saved = torch.load(state_path, weights_only=True)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        step, elapsed_before, best = saved["step"], saved["elapsed"], saved["best"]
        position = BatchPosition(saved["epoch"], saved["batch"])
        torch.set_rng_state(saved["torch_rng"])
        task.set_rng_state(saved["task_rng"])
        changed = sorted(k for k, v in dataclasses.asdict(config).items()
                         if saved["config"].get(k) != v and k not in RUN_ONLY_SETTINGS)
        ignored = [k for k in changed if k in MODEL_SETTINGS and k in saved["config"]]
        if ignored:
            logger.warning("resuming: the model and its vocabulary are the checkpoint's (%s); the options for them "
                           "(%s), given or by default, do not apply; train without --resume to change them",
                           ", ".join(f"{k}={saved['config'][k]!r}" for k in ignored),
                           ", ".join(f"--{k.replace('_', '-')}" for k in ignored))  # fmt: skip
            config = dataclasses.replace(config, **{k: saved["config"][k] for k in ignored})
        changed = [k for k in changed if k not in ignored]
        if changed:
            logger.warning("resuming with changed settings %s: the run will not match an uninterrupted one", changed)
        logger.info("resuming %s at step %d (epoch %d, batch %d)", output_dir, step, position.epoch, position.batch)
    stream = BatchStream(task.lengths, config.token_budget, config.seed, position=position)
    logger.info("training %s: %d parameters, schedule %s, warmup %d, %d steps",
                config.arch, sum(p.numel() for p in model.parameters()), schedule, warmup, config.steps)

    start = time.monotonic()
    last_validated, interval_loss, interval_steps, tokens, tick = -1, 0.0, 0, 0, time.monotonic()
    dev: dict[str, float] = {}
    train_loss: float | None = None  # mean over the steps since the last validation
    stopped_by_time = False
    step_losses: list[float] = []  # this run's, for callers that compare runs
    bar = tqdm(total=config.steps, initial=step, disable=not config.progress, unit="step", dynamic_ncols=True)

    def validate_and_save() -> None:
        nonlocal last_validated, dev, interval_loss, interval_steps, train_loss, best
        train_loss = interval_loss / interval_steps if interval_steps else train_loss
        interval_loss, interval_steps = 0.0, 0
        dev = task.validate(model)
        elapsed = elapsed_before + time.monotonic() - start
        progress = {"steps_trained": step, "train_seconds": round(elapsed, 3), "arch": config.arch}
        if dev["dev_loss"] < best["dev_loss"] or not (output_dir / "model.safetensors").exists():
            best = {**dev, "step": step, "train_loss": train_loss}
            save_checkpoint(output_dir, model, tokenizers, {**best, **progress})
            logger.info("step %d: %s (best so far, saved)", step, _fmt(dev))
        else:
            save_metrics(output_dir, progress)
            logger.info("step %d: %s (best remains step %d)", step, _fmt(dev), best["step"])
        _save_state(state_path, {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "step": step, "epoch": stream.position.epoch, "batch": stream.position.batch,
            "torch_rng": torch.get_rng_state(), "task_rng": task.rng_state(), "elapsed": elapsed,
            "best": best, "config": dataclasses.asdict(config),
        })
        last_validated = step

    # Ctrl-C ends the run at a step boundary, where the saved state is exact; a second Ctrl-C stops at once.
    interrupted = False

    def on_interrupt(signum: int, frame: Any) -> None:
        nonlocal interrupted
        if interrupted:
            raise KeyboardInterrupt
        interrupted = True

    previous_handler = _install_sigint(on_interrupt)
    end = config.steps if stop_at is None else min(stop_at, config.steps)
    try:
        while step < end:
            if config.time_budget is not None and time.monotonic() - start >= config.time_budget:
                logger.info("time budget of %.0fs spent at step %d", config.time_budget, step)
                stopped_by_time = True
                break
            if interrupted:
                logger.warning("interrupted at step %d; saving so that --resume continues from here", step)
                break
            model.train()
            loss, batch_tokens = task.loss(model, next(stream))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip_norm)
            optimizer.step()
            scheduler.step()
            step += 1
            value = loss.item()
            if not math.isfinite(value):
                raise TrainingError(f"loss became {value} at step {step}; lower --lr (now {config.lr}) or --clip-norm")
            step_losses.append(value)
            interval_loss, interval_steps, tokens = interval_loss + value, interval_steps + 1, tokens + batch_tokens
            bar.update(1)
            now = time.monotonic()
            if now - tick >= 1.0:
                rate, lr = tokens / (now - tick), scheduler.get_last_lr()[0]
                bar.set_postfix(loss=f"{value:.3f}", tok_s=f"{rate:.0f}", lr=f"{lr:.2e}")
                tokens, tick = 0, now
            if step % config.validate_every == 0:
                validate_and_save()
    finally:
        _install_sigint(previous_handler)
    bar.close()
    if last_validated != step:
        validate_and_save()
    return {**best, "best_step": best["step"], "steps_trained": step, "last_dev": dev, "last_train_loss": train_loss,
            "stopped_by_time_budget": stopped_by_time, "interrupted": interrupted, "step_losses": step_losses}


def _install_sigint(handler: Any) -> Any:
    """Install a SIGINT handler and return the previous one; a no-op off the main thread, where Python forbids it."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGINT, handler) if handler is not None else None


def _fmt(metrics: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in metrics.items())


# ---------------------------------------------------------------------------------------------------------------------
# Translators


def _pad(rows: Sequence[Sequence[int]], pad_id: int) -> torch.Tensor:
    out = torch.full((len(rows), max(len(r) for r in rows)), pad_id, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out


def encode_pairs(
    pairs: Sequence[tuple[str, str]], source: Tokenizer, target: Tokenizer, max_len: int | None = None
) -> list[tuple[list[int], list[int]]]:
    """Source ids (ending in </s>) and bare target ids; pairs with a side longer than ``max_len`` are dropped."""
    src = source.encode_batch([s for s, _ in pairs])
    tgt = target.encode_batch([t for _, t in pairs], add_special_tokens=False)
    examples = [(s.ids, t.ids) for s, t in zip(src, tgt)]
    if max_len is not None:
        kept = [(s, t) for s, t in examples if len(s) <= max_len and len(t) + 1 <= max_len and len(t) > 0]
        if len(kept) < len(examples):
            dropped = len(examples) - len(kept)
            logger.info("dropped %d of %d pairs longer than %d tokens", dropped, len(examples), max_len)
        examples = kept
    return examples


def translation_batch(examples: Sequence[tuple[list[int], list[int]]]) -> tuple[torch.Tensor, ...]:
    """``src_ids (B,S)``, ``src_pad_mask (B,S)``, decoder input ``<s> y`` (B,T) and decoder output ``y </s>`` (B,T)."""
    src = _pad([s for s, _ in examples], PAD_ID)  # (B, S)
    tgt_in = _pad([[BOS_ID] + t for _, t in examples], PAD_ID)  # (B, T)
    tgt_out = _pad([t + [EOS_ID] for _, t in examples], PAD_ID)  # (B, T)
    return src, src.eq(PAD_ID), tgt_in, tgt_out


def translation_loss(
    model: torch.nn.Module, batch: tuple[torch.Tensor, ...], label_smoothing: float = 0.0, reduction: str = "mean"
) -> torch.Tensor:
    """Teacher-forced cross-entropy per target token (padding ignored)."""
    src, src_pad_mask, tgt_in, tgt_out = batch
    logits = model(src, src_pad_mask, tgt_in)  # (B, T, V)
    return F.cross_entropy(
        logits.reshape(-1, logits.size(-1)), tgt_out.reshape(-1),  # (B*T, V), (B*T,)
        ignore_index=PAD_ID, label_smoothing=label_smoothing, reduction=reduction,
    )


class _TranslationTask:
    def __init__(
        self,
        train: list[tuple[list[int], list[int]]],
        dev: list[tuple[list[int], list[int]]],
        dev_pairs: Sequence[tuple[str, str]],
        tokenizers: dict[str, Tokenizer],
        config: TrainConfig,
    ) -> None:
        self.train, self.dev, self.config, self.tokenizers = train, dev, config, tokenizers
        self.dev_sample = list(dev_pairs[: config.bleu_sample])
        self.lengths = [(len(s), len(t) + 1) for s, t in train]  # padded source and target (in and out align)

    def loss(self, model: torch.nn.Module, indices: list[int]) -> tuple[torch.Tensor, int]:
        batch = translation_batch([self.train[i] for i in indices])
        tokens = int(batch[1].logical_not().sum()) + int(batch[3].ne(PAD_ID).sum())
        return translation_loss(model, batch, self.config.label_smoothing), tokens

    @torch.no_grad()
    def validate(self, model: torch.nn.Module) -> dict[str, float]:
        from seqserve.models.evaluate import score_translations, translate

        model.eval()
        total, count = 0.0, 0
        lengths = [(len(s), len(t) + 1) for s, t in self.dev]
        for indices in token_budget_batches(lengths, self.config.token_budget, seed=0, shuffle=False):
            batch = translation_batch([self.dev[i] for i in indices])
            total += float(translation_loss(model, batch, reduction="sum"))
            count += int(batch[3].ne(PAD_ID).sum())
        metrics = {"dev_loss": total / max(count, 1)}
        if self.dev_sample:
            hyps = translate(model, self.tokenizers["source"], self.tokenizers["target"],
                             [s for s, _ in self.dev_sample], self.config.token_budget, self.config.max_len)
            scores = score_translations(hyps, [t for _, t in self.dev_sample])
            metrics.update(dev_bleu=scores.bleu, dev_chrf=scores.chrf, dev_exact_match=scores.exact_match)
        return metrics

    def rng_state(self) -> dict[str, Any]:
        return {}  # batches come from the seeded stream; dropout from torch's global generator

    def set_rng_state(self, state: dict[str, Any]) -> None:
        pass


def translator_model_config(config: TrainConfig, source_vocab: int, target_vocab: int) -> tuple[str, dict[str, Any]]:
    """The checkpoint family and model config dict that ``config`` asks for."""
    if config.arch not in TRANSLATOR_ARCHS:
        raise TrainingError(f"unknown translator architecture {config.arch!r}; known: {', '.join(TRANSLATOR_ARCHS)}")
    limit = max(config.max_len, 256)  # serving may see longer inputs than training kept
    if config.arch == "transformer":
        return "transformer", {
            "src_vocab_size": source_vocab, "tgt_vocab_size": target_vocab, "d_model": config.hidden_size,
            "n_heads": config.heads, "d_ff": config.ff_size, "n_encoder_layers": config.layers,
            "n_decoder_layers": config.layers, "dropout": config.dropout, "normalize_before": config.norm == "pre",
            "share_embeddings": config.joint_vocab and source_vocab == target_vocab,
            "max_positions": limit, "max_src_len": limit, "max_tgt_len": limit,
        }
    cell = config.arch.removeprefix("birnn-")
    if config.peephole and cell != "lstm":
        raise TrainingError(f"peephole connections need an LSTM cell, not {cell}")
    return "rnn", {
        "src_vocab_size": source_vocab, "tgt_vocab_size": target_vocab, "cell": cell,
        "bidirectional": config.arch.startswith("birnn-"), "emb_dim": config.embed_size,
        "hidden_size": config.hidden_size, "num_layers": config.layers, "attention": config.attention,
        "peephole": config.peephole, "dropout": config.dropout, "max_src_len": limit, "max_tgt_len": limit,
    }


PairsArg = Sequence[tuple[str, str]] | str | os.PathLike


def _load_pairs(pairs: PairsArg) -> list[tuple[str, str]]:
    if isinstance(pairs, (str, os.PathLike)):
        from seqserve.models.data import read_pairs

        return list(read_pairs(pairs))
    return list(pairs)


def check_output(output_dir: Path, resume: bool, force: bool) -> list[Path]:
    """Refuse an output that is a file, or one holding a checkpoint unless resuming it or `force`; returns the old
    checkpoint's files that `force` replaces (removed by `remove_replaced` once the new run's data has loaded)."""
    if output_dir.exists() and not output_dir.is_dir():
        raise TrainingError(f"--output {output_dir} is not a folder")
    if resume:
        return []
    found = [name for name in OUTPUT_FILES if (output_dir / name).exists()]
    if found and not force:
        raise TrainingError(f"{output_dir} holds a checkpoint already ({', '.join(found)}): pass --resume to continue "
                            f"it, --force to train a new one in its place, or choose another --output")  # fmt: skip
    return [output_dir / name for name in found]


def remove_replaced(files: list[Path]) -> None:
    """Remove the old checkpoint `--force` replaces: only once the new run's data and tokenizers are ready, so that a
    wrong data path does not leave the user with no checkpoint at all."""
    for path in files:
        logger.warning("--force: removing %s", path)
        path.unlink(missing_ok=True)


def _seed_everything(config: TrainConfig) -> None:
    if config.threads:
        torch.set_num_threads(config.threads)
    random.seed(config.seed)
    torch.manual_seed(config.seed)


def train_translator(
    config: TrainConfig,
    train: PairsArg,
    dev: PairsArg,
    output_dir: str | os.PathLike,
    tokenizers: dict[str, Tokenizer] | None = None,
    resume: bool = False,
    stop_at: int | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Train a translator on ``train`` pairs (or a TSV path), validating on ``dev``; returns the best metrics.

    Tokenizers are trained on the training pairs unless given (``{"source", "target"}``); on ``resume`` those of the
    checkpoint in ``output_dir`` are used. ``stop_at`` ends this run early at that step (the learning-rate schedule
    still plans for ``config.steps``), so a later ``resume`` continues the same run. An ``output_dir`` that holds a
    checkpoint is refused unless ``resume`` (continue it) or ``force`` (replace it).
    """
    from seqserve.models.checkpoint import load_checkpoint

    output_dir = Path(output_dir)
    replaced = check_output(output_dir, resume, force)
    _seed_everything(config)
    train_pairs, dev_pairs = _load_pairs(train), _load_pairs(dev)
    if resume:
        checkpoint = load_checkpoint(output_dir)
        tokenizers, model = checkpoint.tokenizers, checkpoint.model
    else:
        if tokenizers is None:
            from seqserve.models.tokenization import train_translation_tokenizers

            source, target = train_translation_tokenizers(
                train_pairs, kind=config.vocab_kind, vocab_size=config.vocab_size, joint=config.joint_vocab)
            tokenizers = {"source": source, "target": target}
        family, model_config = translator_model_config(
            config, tokenizers["source"].get_vocab_size(), tokenizers["target"].get_vocab_size())
        _, model = build_model(family, model_config)
    train_examples = encode_pairs(train_pairs, tokenizers["source"], tokenizers["target"], config.max_len)
    dev_examples = encode_pairs(dev_pairs, tokenizers["source"], tokenizers["target"], None)
    if not train_examples:
        raise TrainingError(f"no training pairs within {config.max_len} tokens")
    logger.info("%d training pairs, %d dev pairs", len(train_examples), len(dev_examples))
    remove_replaced(replaced)
    task = _TranslationTask(train_examples, dev_examples, dev_pairs, tokenizers, config)
    return _fit(task, model, config, output_dir, tokenizers, resume, stop_at)


# ---------------------------------------------------------------------------------------------------------------------
# BERT


class _BertTask:
    def __init__(self, train: list[Any], dev: list[Any], tokenizer: Tokenizer, config: TrainConfig) -> None:
        from seqserve.models.evaluate import bert_special_ids

        self.train, self.dev, self.tokenizer, self.config = train, dev, tokenizer, config
        self.ids = bert_special_ids(tokenizer)
        self.lengths = [len(e.input_ids) for e in train]
        # Masking is drawn afresh for every batch (dynamic masking) from a generator of our own, saved for resume.
        self.generator = torch.Generator().manual_seed(config.seed)

    def loss(self, model: torch.nn.Module, indices: list[int]) -> tuple[torch.Tensor, int]:
        from seqserve.models.bert import mask_tokens, pretraining_loss
        from seqserve.models.evaluate import bert_batch

        batch = bert_batch([self.train[i] for i in indices], self.ids["pad"])
        input_ids, attention_mask, type_ids, special, labels = batch  # (B, S) each, labels (B,)
        masked, mlm_labels = mask_tokens(input_ids, special, self.tokenizer.get_vocab_size(), self.ids["mask"],
                                         self.generator, self.config.mlm_probability)  # (B, S)
        output = model(masked, attention_mask, type_ids)
        return pretraining_loss(output, mlm_labels, labels).total, int(attention_mask.sum())

    def validate(self, model: torch.nn.Module) -> dict[str, float]:
        from seqserve.models.evaluate import bert_scores

        scores = bert_scores(model, self.tokenizer, self.dev, self.config.token_budget, self.config.seed,
                             self.config.mlm_probability)
        return {"dev_loss": scores["mlm_loss"] + scores["nsp_loss"],
                **{f"dev_{k}": float(scores[k]) for k in ("mlm_loss", "nsp_loss", "mlm_accuracy", "nsp_accuracy")}}

    def rng_state(self) -> dict[str, Any]:
        return {"mask_generator": self.generator.get_state()}

    def set_rng_state(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["mask_generator"])


def bert_model_config(config: TrainConfig, tokenizer: Tokenizer) -> dict[str, Any]:
    """The BertConfig fields that ``config`` asks for (post-norm, as BERT is)."""
    from seqserve.models.evaluate import bert_special_ids

    return {
        "vocab_size": tokenizer.get_vocab_size(), "hidden_size": config.hidden_size,
        "num_hidden_layers": config.layers, "num_attention_heads": config.heads, "intermediate_size": config.ff_size,
        "max_position_embeddings": config.max_len, "hidden_dropout_prob": config.dropout,
        "attention_probs_dropout_prob": config.dropout, "pad_token_id": bert_special_ids(tokenizer)["pad"],
    }


DocumentsArg = Sequence[Sequence[str]] | str | os.PathLike


def _load_documents(documents: DocumentsArg) -> list[list[str]]:
    if isinstance(documents, (str, os.PathLike)):
        from seqserve.models.data import read_documents

        return [list(d) for d in read_documents(documents)]
    return [list(d) for d in documents]


def train_bert(
    config: TrainConfig,
    corpus: DocumentsArg,
    output_dir: str | os.PathLike,
    dev: DocumentsArg | None = None,
    tokenizer: Tokenizer | None = None,
    resume: bool = False,
    stop_at: int | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Pretrain a BERT (masked LM + next sentence) on documents (lists of sentences) or a prose file.

    Without ``dev``, the last ``config.dev_fraction`` of the documents (at least one) is held out for validation.
    ``tokenizer``, ``resume``, ``stop_at`` and ``force`` work as for ``train_translator``.
    """
    from seqserve.models.bert import make_nsp_pairs
    from seqserve.models.checkpoint import load_checkpoint
    from seqserve.models.evaluate import bert_examples

    output_dir = Path(output_dir)
    replaced = check_output(output_dir, resume, force)
    config = dataclasses.replace(config, arch="bert")
    _seed_everything(config)
    documents = _load_documents(corpus)
    if dev is None:
        held = max(1, round(len(documents) * config.dev_fraction))
        if held >= len(documents):
            raise TrainingError(f"{len(documents)} document(s) cannot be split into training and dev documents")
        documents, dev_documents = documents[:-held], documents[-held:]
    else:
        dev_documents = _load_documents(dev)
    if resume:
        checkpoint = load_checkpoint(output_dir)
        tokenizer, model = checkpoint.tokenizers["text"], checkpoint.model
    else:
        if tokenizer is None:
            from seqserve.models.tokenization import train_tokenizer

            tokenizer = train_tokenizer((s for d in documents for s in d), kind=config.vocab_kind,
                                        vocab_size=config.vocab_size, role="bert")
        _, model = build_model("bert", bert_model_config(config, tokenizer))
    max_len = model.config.max_position_embeddings
    train_examples = bert_examples(tokenizer, make_nsp_pairs(documents, random.Random(config.seed)), max_len)
    dev_examples = bert_examples(tokenizer, make_nsp_pairs(dev_documents, random.Random(config.seed + 1)), max_len)
    logger.info("%d training pairs, %d dev pairs", len(train_examples), len(dev_examples))
    remove_replaced(replaced)
    task = _BertTask(train_examples, dev_examples, tokenizer, config)
    return _fit(task, model, config, output_dir, {"text": tokenizer}, resume, stop_at)
