"""`seqserve evaluate`: BLEU and chrF of a translator on a TSV, MLM and NSP accuracy of a BERT on prose.

Translations are greedy (``models/decoding.py``), batched by a token budget; the scores are sacrebleu's. Metrics are
merged into the checkpoint's ``metrics.json``.

Letters: B batch, S source length, T target length, V vocabulary.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import sacrebleu
import torch
from tokenizers import Tokenizer

from seqserve.models.arguments import positive_int
from seqserve.models.batching import token_budget_batches
from seqserve.models.checkpoint import Checkpoint, load_checkpoint, save_metrics

logger = logging.getLogger(__name__)

# Translator special ids fixed by docs/design.md; a model config that names its own ids wins.
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2


class EvaluationError(ValueError):
    """The checkpoint and the evaluation data do not fit together."""


@dataclass(frozen=True)
class TranslationScores:
    bleu: float
    chrf: float
    exact_match: float  # fraction of hypotheses equal to their reference
    sentences: int


@dataclass(frozen=True)
class BertScores:
    mlm_accuracy: float  # over the positions chosen for masking
    nsp_accuracy: float
    masked_tokens: int
    pairs: int


def decode_limit(source_len: int) -> int:
    """Greedy decoding stops at this many target tokens for a source of ``source_len`` tokens."""
    return 2 * source_len + 10


@torch.no_grad()
def translate(
    model: torch.nn.Module,
    source_tokenizer: Tokenizer,
    target_tokenizer: Tokenizer,
    sources: Sequence[str],
    token_budget: int = 4096,
    max_source_tokens: int | None = None,
) -> list[str]:
    """Greedy translations of ``sources``, in order, in batches of similar length whose padded source plus decoding
    room stays under ``token_budget`` tokens."""
    from seqserve.models.decoding import greedy_decode

    model.eval()
    limits = getattr(model, "config", None)
    if max_source_tokens is None:
        max_source_tokens = getattr(limits, "max_src_len", None)
    max_target_tokens = getattr(limits, "max_tgt_len", None) or 10**9
    start_id = getattr(limits, "decoder_start_id", None)  # Transformer configs may start decoding from another id
    start_id = getattr(limits, "bos_id", BOS_ID) if start_id is None else start_id
    eos_id = getattr(limits, "eos_id", EOS_ID)
    pad_id = getattr(limits, "pad_id", PAD_ID)
    encoded = [source_tokenizer.encode(text).ids for text in sources]
    if max_source_tokens is not None:
        # Keep the closing </s>: the model never saw a source without it.
        limit = max_source_tokens
        encoded = [ids if len(ids) <= limit else ids[: limit - 1] + [ids[-1]] for ids in encoded]
    outputs: list[str] = [""] * len(sources)
    # Budget on source length and the decode limit together: both are padded for the batch.
    lengths = [(len(ids), min(decode_limit(len(ids)), max_target_tokens)) for ids in encoded]
    for batch in token_budget_batches(lengths, token_budget, seed=0, shuffle=False):
        longest = max(len(encoded[i]) for i in batch)
        src = torch.full((len(batch), longest), pad_id, dtype=torch.long)  # (B, S)
        src_pad_mask = torch.ones((len(batch), longest), dtype=torch.bool)  # (B, S) True at padding
        for row, i in enumerate(batch):
            src[row, : len(encoded[i])] = torch.tensor(encoded[i])
            src_pad_mask[row, : len(encoded[i])] = False
        limit = min(decode_limit(longest), max_target_tokens)
        hyp = greedy_decode(model, src, src_pad_mask, limit, start_id, eos_id)  # (B, <=T)
        for row, i in enumerate(batch):
            ids = hyp[row].tolist()
            if eos_id in ids:
                ids = ids[: ids.index(eos_id)]
            outputs[i] = target_tokenizer.decode(ids, skip_special_tokens=True)
    return outputs


def score_translations(hypotheses: Sequence[str], references: Sequence[str]) -> TranslationScores:
    """Corpus BLEU and chrF (sacrebleu defaults) and exact match of hypotheses against one reference each."""
    if len(hypotheses) != len(references):
        raise EvaluationError(f"{len(hypotheses)} hypotheses for {len(references)} references")
    if not references:
        raise EvaluationError("nothing to score: no references")
    bleu = sacrebleu.corpus_bleu(list(hypotheses), [list(references)])
    chrf = sacrebleu.corpus_chrf(list(hypotheses), [list(references)])
    exact = sum(h.strip() == r.strip() for h, r in zip(hypotheses, references)) / len(references)
    return TranslationScores(bleu=bleu.score, chrf=chrf.score, exact_match=exact, sentences=len(references))


def evaluate_translator(
    checkpoint: Checkpoint, pairs: Sequence[tuple[str, str]], token_budget: int = 4096
) -> TranslationScores:
    """Greedy-translate the sources of ``pairs`` and score them against the targets."""
    if checkpoint.family not in ("rnn", "transformer"):
        raise EvaluationError(f"{checkpoint.path} holds a {checkpoint.family} model, not a translator")
    sources = [s for s, _ in pairs]
    references = [t for _, t in pairs]
    hypotheses = translate(
        checkpoint.model, checkpoint.tokenizers["source"], checkpoint.tokenizers["target"], sources, token_budget
    )
    return score_translations(hypotheses, references)


# ---------------------------------------------------------------------------------------------------------------------
# BERT


@dataclass(frozen=True)
class BertExample:
    input_ids: list[int]  # [CLS] A [SEP] B [SEP]
    token_type_ids: list[int]
    special_mask: list[int]  # 1 at [CLS]/[SEP]: never masked
    nsp_label: int


def bert_examples(tokenizer: Tokenizer, pairs: Sequence[Any], max_len: int) -> list[BertExample]:
    """Encode NSP pairs (``first``, ``second``, ``label``) as ``[CLS] A [SEP] B [SEP]``, truncated to ``max_len``."""
    truncating = Tokenizer.from_str(tokenizer.to_str())  # a copy: the saved tokenizer keeps no truncation
    truncating.no_padding()
    truncating.enable_truncation(max_length=max_len, strategy="longest_first")
    encodings = truncating.encode_batch([(p.first, p.second) for p in pairs])
    return [BertExample(e.ids, e.type_ids, e.special_tokens_mask, p.label) for e, p in zip(encodings, pairs)]


def bert_batch(examples: Sequence[BertExample], pad_id: int) -> tuple[torch.Tensor, ...]:
    """``input_ids``, ``attention_mask`` (1 at real tokens), ``token_type_ids``, ``special_mask`` (True where masking
    may not choose: special tokens and padding), all (B, S), and the NSP labels (B,)."""
    longest = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), longest), pad_id, dtype=torch.long)  # (B, S)
    type_ids = torch.zeros((len(examples), longest), dtype=torch.long)  # (B, S)
    special = torch.ones((len(examples), longest), dtype=torch.bool)  # (B, S)
    attention_mask = torch.zeros((len(examples), longest), dtype=torch.long)  # (B, S)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[row, :n] = torch.tensor(e.input_ids)
        attention_mask[row, :n] = 1
        type_ids[row, :n] = torch.tensor(e.token_type_ids)
        special[row, :n] = torch.tensor(e.special_mask, dtype=torch.bool)
    labels = torch.tensor([e.nsp_label for e in examples], dtype=torch.long)  # (B,)
    return input_ids, attention_mask, type_ids, special, labels


def bert_special_ids(tokenizer: Tokenizer) -> dict[str, int]:
    """``pad`` and ``mask`` ids, read from the tokenizer (docs/design.md: never assumed)."""
    ids = {"pad": tokenizer.token_to_id("[PAD]"), "mask": tokenizer.token_to_id("[MASK]")}
    missing = [name for name, i in ids.items() if i is None]
    if missing:
        raise EvaluationError(f"the BERT tokenizer has no {missing} token")
    return ids


@torch.no_grad()
def bert_scores(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    examples: Sequence[BertExample],
    token_budget: int = 8192,
    seed: int = 0,
    mlm_probability: float = 0.15,
) -> dict[str, float]:
    """MLM and NSP loss and accuracy over ``examples``, masked with a generator seeded by ``seed`` (repeatable)."""
    from seqserve.models.bert import mask_tokens, pretraining_loss

    model.eval()
    ids = bert_special_ids(tokenizer)
    generator = torch.Generator().manual_seed(seed)
    mlm_sum = nsp_sum = 0.0
    mlm_correct = mlm_count = nsp_correct = 0
    lengths = [len(e.input_ids) for e in examples]
    for indices in token_budget_batches(lengths, token_budget, seed=0, shuffle=False):
        input_ids, attention_mask, type_ids, special, labels = bert_batch([examples[i] for i in indices], ids["pad"])
        masked, mlm_labels = mask_tokens(
            input_ids, special, tokenizer.get_vocab_size(), ids["mask"], generator, mlm_probability)  # (B, S)
        output = model(masked, attention_mask, type_ids)
        loss = pretraining_loss(output, mlm_labels, labels)
        chosen = mlm_labels.ne(-100)  # (B, S)
        mlm_count += int(chosen.sum())
        mlm_sum += float(loss.mlm) * int(chosen.sum())
        mlm_correct += int((output.mlm_logits.argmax(-1).eq(mlm_labels) & chosen).sum())
        nsp_sum += float(loss.nsp) * len(indices)
        nsp_correct += int(output.nsp_logits.argmax(-1).eq(labels).sum())
    n = len(examples)
    return {
        "mlm_loss": mlm_sum / max(mlm_count, 1), "nsp_loss": nsp_sum / max(n, 1),
        "mlm_accuracy": mlm_correct / max(mlm_count, 1), "nsp_accuracy": nsp_correct / max(n, 1),
        "masked_tokens": mlm_count, "pairs": n,
    }


def evaluate_bert(
    checkpoint: Checkpoint, documents: list[list[str]], seed: int = 0, max_len: int = 128, token_budget: int = 8192
) -> BertScores:
    """MLM accuracy on masked positions and NSP accuracy on next-sentence pairs drawn from ``documents``."""
    from seqserve.models.bert import make_nsp_pairs

    if checkpoint.family != "bert":
        raise EvaluationError(f"{checkpoint.path} holds a {checkpoint.family} model, not a BERT")
    if not checkpoint.config.with_heads:
        raise EvaluationError(f"{checkpoint.path} has no MLM/NSP heads to evaluate")
    tokenizer = checkpoint.tokenizers["text"]
    max_len = min(max_len, checkpoint.config.max_position_embeddings)
    examples = bert_examples(tokenizer, make_nsp_pairs(documents, random.Random(seed)), max_len)
    scores = bert_scores(checkpoint.model, tokenizer, examples, token_budget, seed)
    return BertScores(scores["mlm_accuracy"], scores["nsp_accuracy"], scores["masked_tokens"], scores["pairs"])


# ---------------------------------------------------------------------------------------------------------------------
# Command line: seqserve evaluate CKPT --tsv FILE | --prose FILE


def _output_file(text: str) -> Path:
    """argparse type: a file that can be written: its folder exists and it is not itself a folder."""
    path = Path(text)
    if not path.parent.is_dir():
        raise argparse.ArgumentTypeError(f"{path.parent} is not an existing folder")
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{path} is a folder")
    return path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", type=Path, help="checkpoint folder (from `seqserve train` or `import-hf`)")
    data = parser.add_mutually_exclusive_group(required=True)
    data.add_argument("--tsv", type=Path, help="translator: pairs source<TAB>target; reports BLEU and chrF")
    data.add_argument("--prose", type=Path, help="BERT: prose documents; reports masked-LM and next-sentence accuracy")
    parser.add_argument("--limit", type=positive_int, default=None,
                        help="evaluate only the first N pairs / documents")
    parser.add_argument("--token-budget", type=positive_int, default=4096, help="padded tokens per evaluation batch")
    parser.add_argument("--max-len", type=positive_int, default=128,
                        help="BERT: truncate sentence pairs to this many tokens")
    parser.add_argument("--seed", type=int, default=0, help="BERT: seed of the masking and the random next sentences")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="torch intra-op threads; None leaves torch's choice")
    parser.add_argument("--hypotheses", type=_output_file, default=None,
                        help="translator: also write the translations here, one a line")
    parser.add_argument("--no-save", action="store_true", help="print the metrics without saving them in metrics.json")


def run(args: argparse.Namespace) -> int:
    from seqserve.models.checkpoint import CheckpointError

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        metrics = _evaluate(args)
    except (ValueError, CheckpointError, OSError) as exc:  # every seqserve data/checkpoint/evaluation error is one
        logger.debug("evaluation failed", exc_info=True)
        logger.error("%s", exc)
        return 1
    if not args.no_save:
        save_metrics(args.checkpoint, metrics)
    # The command's output is the metrics: stdout, not the log.
    print(json.dumps(metrics, indent=2, sort_keys=True))
    return 0


def _evaluate(args: argparse.Namespace) -> dict[str, Any]:
    checkpoint = load_checkpoint(args.checkpoint).require_tokenizers()
    metrics: dict[str, Any]
    if args.tsv is not None:
        from seqserve.models.data import read_pairs

        pairs = list(read_pairs(args.tsv))[: args.limit]
        if checkpoint.family not in ("rnn", "transformer"):
            raise EvaluationError(f"{args.checkpoint} holds a {checkpoint.family} model: use --prose, not --tsv")
        sources, references = [s for s, _ in pairs], [t for _, t in pairs]
        hypotheses = translate(checkpoint.model, checkpoint.tokenizers["source"], checkpoint.tokenizers["target"],
                               sources, args.token_budget)
        if args.hypotheses is not None:
            args.hypotheses.write_text("".join(h + "\n" for h in hypotheses), encoding="utf-8")
        scores = score_translations(hypotheses, references)
        metrics = {"bleu": scores.bleu, "chrf": scores.chrf, "exact_match": scores.exact_match,
                   "eval_sentences": scores.sentences, "eval_tsv": os.fspath(args.tsv)}
    else:
        from seqserve.models.data import read_documents

        documents = [list(d) for d in read_documents(args.prose)][: args.limit]
        bert = evaluate_bert(checkpoint, documents, args.seed, args.max_len, args.token_budget)
        metrics = {"mlm_accuracy": bert.mlm_accuracy, "nsp_accuracy": bert.nsp_accuracy,
                   "eval_masked_tokens": bert.masked_tokens, "eval_pairs": bert.pairs,
                   "eval_prose": os.fspath(args.prose)}
    return metrics
