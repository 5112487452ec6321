"""Command line of ``seqserve train translator|bert``: options, the TrainConfig they ask for, and the run."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

from seqserve.models.train import (
    ATTENTIONS,
    SCHEDULES,
    TRAIN_STATE_FILE,
    TRANSLATOR_ARCHS,
    TrainConfig,
    TrainingError,
    _fmt,
    parse_duration,
    train_bert,
    train_translator,
)

logger = logging.getLogger(__name__)


def _add_common(parser: argparse.ArgumentParser, defaults: TrainConfig) -> None:
    sizes = parser.add_argument_group("model size")
    sizes.add_argument("--hidden-size", type=int, default=defaults.hidden_size,
                       help="hidden size of the RNN layers / d_model of the Transformer and BERT")
    sizes.add_argument("--layers", type=int, default=defaults.layers,
                       help="layers of the encoder (and of the decoder for translators)")
    sizes.add_argument("--heads", type=int, default=defaults.heads, help="attention heads (Transformer, BERT)")
    sizes.add_argument("--ff-size", type=int, default=defaults.ff_size,
                       help="inner size of the feed-forward sublayers (Transformer, BERT)")
    sizes.add_argument("--dropout", type=float, default=defaults.dropout, help="dropout probability")
    sizes.add_argument("--max-len", type=int, default=defaults.max_len,
                       help="longest example in tokens (per side for translators); longer training examples are "
                            "dropped")
    vocab = parser.add_argument_group("vocabulary (trained on the training data)")
    vocab.add_argument("--vocab-size", type=int, default=defaults.vocab_size, help="tokenizer vocabulary size")
    vocab.add_argument("--vocab-kind", choices=("bpe", "wordpiece"), default=defaults.vocab_kind,
                       help="tokenizer model; wordpiece for bert only (its decoding puts spaces around punctuation). "
                            "The tokenizers library's WordPiece trainer breaks ties in a random order (its vocabulary "
                            "differs from run to run), so only bpe repeats a run bit for bit")
    opt = parser.add_argument_group("optimisation")
    opt.add_argument("--token-budget", type=int, default=defaults.token_budget,
                     help="padded tokens per batch; batches group examples of similar length")
    opt.add_argument("--lr", type=float, default=defaults.lr, help="peak learning rate of Adam")
    opt.add_argument("--schedule", choices=SCHEDULES, default=defaults.schedule,
                     help="learning-rate schedule after warmup; auto: constant for RNNs, inverse-sqrt for the "
                          "Transformer, linear decay to 0 at --steps for BERT")
    opt.add_argument("--warmup", type=int, default=None,
                     help="linear warmup steps; None: 0 for RNNs, min(4000, steps/10) otherwise")
    opt.add_argument("--clip-norm", type=float, default=defaults.clip_norm, help="clip the gradient norm to this")
    opt.add_argument("--steps", type=int, default=defaults.steps, help="optimizer steps to train in all (a resumed "
                     "run continues up to this step)")
    opt.add_argument("--validate-every", type=int, default=defaults.validate_every,
                     help="validate (and keep the checkpoint if dev loss improved) every N steps")
    opt.add_argument("--seed", type=int, default=defaults.seed, help="random seed: the same seed repeats a run exactly")
    run = parser.add_argument_group("run")
    run.add_argument("--output", required=True, type=Path, help="checkpoint folder to write (the best model)")
    run.add_argument("--time-budget", type=parse_duration, default=None,
                     help="stop the training loop after this much wall-clock time, e.g. 90s, 20m, 1.5h (then validate "
                          "and save); reading the data, training the tokenizers and the last validation come on top")
    run.add_argument("--resume", action="store_true",
                     help=f"continue from {TRAIN_STATE_FILE} in --output exactly where it stopped (the model sizes "
                          f"and vocabulary are the checkpoint's)")
    run.add_argument("--force", action="store_true",
                     help="train a new model into an --output that holds a checkpoint, replacing it")
    run.add_argument("--threads", type=int, default=None, help="torch intra-op threads; None leaves torch's choice")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="what", required=True, metavar="{translator,bert}")
    defaults = TrainConfig()
    translator = sub.add_parser("translator", help="train a translator on TSV pairs (source<TAB>target)",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    translator.add_argument("--arch", choices=TRANSLATOR_ARCHS, default=defaults.arch,
                            help="model family: RNN with an LSTM or GRU cell (birnn-*: bidirectional encoder), "
                                 "or a Transformer")
    translator.add_argument("--train", required=True, type=Path, help="training pairs, TSV source<TAB>target")
    translator.add_argument("--dev", required=True, type=Path, help="dev pairs for validation (loss and BLEU), TSV")
    _add_common(translator, defaults)
    rnn = translator.add_argument_group("RNN and Transformer options")
    rnn.add_argument("--embed-size", type=int, default=defaults.embed_size, help="embedding size of the RNN")
    rnn.add_argument("--attention", choices=ATTENTIONS, default=defaults.attention,
                     help="RNN attention score (Luong-style, queried by the decoder output after its step): dot, "
                          "general (bilinear), additive (Bahdanau's score), scaled_dot; over a birnn encoder dot and "
                          "scaled_dot gain a key projection, as general has")
    rnn.add_argument("--peephole", action="store_true", help="LSTM gates also see the cell state (lstm archs only)")
    rnn.add_argument("--norm", choices=("pre", "post"), default=defaults.norm,
                     help="Transformer layer-norm placement (pre: x + f(LN(x)) with a final LayerNorm; post: the "
                          "paper's LN(x + f(x)))")
    rnn.add_argument("--joint-vocab", action="store_true", help="one vocabulary shared by source and target")
    rnn.add_argument("--label-smoothing", type=float, default=defaults.label_smoothing,
                     help="label smoothing of the cross-entropy (0 = none)")
    rnn.add_argument("--bleu-sample", type=int, default=defaults.bleu_sample,
                     help="dev sentences greedily translated for BLEU at each validation (0 = loss only)")
    bert = sub.add_parser("bert", help="pretrain a BERT (masked LM + next sentence) on prose",
                          formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    bert.add_argument("--corpus", required=True, type=Path,
                      help="prose: one document a line or paragraphs separated by blank lines")
    bert.add_argument("--dev-corpus", type=Path, default=None,
                      help="prose for validation; None: hold out --dev-fraction of the documents")
    bert.add_argument("--dev-fraction", type=float, default=defaults.dev_fraction,
                      help="share of the documents held out for validation when there is no --dev-corpus")
    bert.add_argument("--mlm-probability", type=float, default=defaults.mlm_probability,
                      help="share of tokens chosen for masked-LM prediction")
    _add_common(bert, defaults)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig that the parsed command line asks for."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: v for k, v in vars(args).items() if k in fields}
    values["arch"] = getattr(args, "arch", "bert") if args.what == "translator" else "bert"
    values["progress"] = not args.no_progress
    return TrainConfig(**values)


def run(args: argparse.Namespace) -> int:
    """The command's one place for failures: option values TrainConfig refuses are usage errors (exit 2), the rest
    (data, checkpoint, files) one logged line and exit 1."""
    from seqserve.models.checkpoint import CheckpointError

    if args.resume and args.force:
        sys.stderr.write(f"seqserve train {args.what}: error: --resume continues the checkpoint, --force replaces it: "
                         f"choose one\n")  # fmt: skip
        return 2
    try:
        config = config_from_args(args)
    except TrainingError as exc:
        sys.stderr.write(f"seqserve train {args.what}: error: {exc}\n")
        return 2
    try:
        if args.what == "translator":
            metrics = train_translator(config, args.train, args.dev, args.output, resume=args.resume,
                                       force=args.force)  # fmt: skip
        else:
            metrics = train_bert(config, args.corpus, args.output, dev=args.dev_corpus, resume=args.resume,
                                 force=args.force)  # fmt: skip
    except (ValueError, CheckpointError, OSError) as exc:  # every seqserve data/config/training error is a ValueError
        logger.debug("training failed", exc_info=True)
        logger.error("%s", exc)
        return 1
    logger.info("best checkpoint %s (step %d): %s", args.output, metrics["best_step"],
                _fmt({k: v for k, v in metrics.items() if k.startswith("dev_")}))
    return 0
