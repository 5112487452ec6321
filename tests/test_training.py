"""Training: every translator family learns to reverse sequences, BERT learns MLM and NSP, runs resume exactly."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from seqserve.cli import main as cli_main
from seqserve.models import synthetic as S
from seqserve.models import train as T
from seqserve.models.batching import BatchPosition, BatchStream, padded_tokens, token_budget_batches
from seqserve.models.checkpoint import load_checkpoint
from seqserve.models.evaluate import evaluate_bert, translate
from seqserve.models.tokenization import train_tokenizer


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="session")
def reversal_tokenizers():
    """One joint tokenizer for the reversal task, and under "text" a BERT tokenizer for the synthetic documents."""
    tokenizer = train_tokenizer([s for s, _ in S.reversal_pairs(500, 0)], kind="bpe", vocab_size=40, role="joint")
    sentences = [s for d in S.synthetic_documents(30, 0) for s in d]
    bert = train_tokenizer(sentences, kind="wordpiece", vocab_size=200, role="bert")
    return {"source": tokenizer, "target": tokenizer, "text": bert}


def _exact_match(checkpoint_dir: Path, pairs: list[tuple[str, str]]) -> float:
    checkpoint = load_checkpoint(checkpoint_dir)
    hyps = translate(checkpoint.model, checkpoint.tokenizers["source"], checkpoint.tokenizers["target"],
                     [s for s, _ in pairs])
    return sum(h == t for h, (_, t) in zip(hyps, pairs)) / len(pairs)


# --- learning ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "arch, overrides",
    [
        ("lstm", {}),
        ("gru", {}),
        ("birnn-lstm", {"peephole": True, "attention": "additive"}),
        ("birnn-gru", {"attention": "scaled_dot"}),
        ("transformer", S.TINY_OVERRIDES["transformer"]),
    ],
)
def test_translator_family_learns_reversal(tmp_path, reversal_tokenizers, arch, overrides):
    config = dataclasses.replace(S.TINY_TRANSLATOR, arch=arch, **overrides)
    train, dev = S.reversal_pairs(2000, 1), S.reversal_pairs(100, 2)
    T.train_translator(config, train, dev, tmp_path, reversal_tokenizers)
    held_out = S.reversal_pairs(200, 3)
    assert _exact_match(tmp_path, held_out) >= 0.95


def test_bert_beats_chance_on_mlm_and_nsp(tmp_path):
    S.tiny_bert(tmp_path)
    checkpoint = load_checkpoint(tmp_path)
    documents = S.synthetic_documents(40, seed=7)
    scores = evaluate_bert(checkpoint, documents, seed=3, max_len=32)
    # Chance: NSP is balanced (0.5); for MLM, always guessing the most frequent token of the corpus.
    counts: dict[int, int] = {}
    tokenizer = checkpoint.tokenizers["text"]
    for sentence in (s for d in documents for s in d):
        for token in tokenizer.encode(sentence, add_special_tokens=False).ids:
            counts[token] = counts.get(token, 0) + 1
    majority = max(counts.values()) / sum(counts.values())
    assert scores.nsp_accuracy >= 0.75
    assert scores.mlm_accuracy >= 4 * majority


# --- resume, repeatability, budget, metrics ----------------------------------------------------------------------


def _short_run(arch: str, output: Path, steps: int, tokenizers, resume: bool = False, stop_at: int | None = None):
    """A few steps with dropout and warmup, so that resuming must restore RNG and schedule state to match."""
    if arch == "bert":
        config = dataclasses.replace(S.TINY_BERT, steps=steps, validate_every=10, dropout=0.1, warmup=5)
        return T.train_bert(config, S.synthetic_documents(30, 0), output, dev=S.synthetic_documents(3, 1),
                            tokenizer=tokenizers["text"], resume=resume, stop_at=stop_at)
    config = dataclasses.replace(S.TINY_TRANSLATOR, arch=arch, steps=steps, validate_every=10, dropout=0.1,
                                 warmup=5, schedule="auto", bleu_sample=5)
    return T.train_translator(config, S.reversal_pairs(300, 0), S.reversal_pairs(20, 1), output, tokenizers,
                              resume=resume, stop_at=stop_at)


@pytest.mark.parametrize("arch", ["lstm", "transformer", "bert"])
def test_resume_continues_identically(tmp_path, reversal_tokenizers, arch):
    straight = _short_run(arch, tmp_path / "straight", 40, reversal_tokenizers)
    _short_run(arch, tmp_path / "split", 40, reversal_tokenizers, stop_at=20)
    resumed = _short_run(arch, tmp_path / "split", 40, reversal_tokenizers, resume=True)
    assert resumed["step_losses"] == pytest.approx(straight["step_losses"][20:], abs=1e-6)
    a = torch.load(tmp_path / "straight" / T.TRAIN_STATE_FILE, weights_only=True)
    b = torch.load(tmp_path / "split" / T.TRAIN_STATE_FILE, weights_only=True)
    assert a["step"] == b["step"] == 40
    for name, tensor in a["model"].items():
        torch.testing.assert_close(b["model"][name], tensor, rtol=0, atol=1e-6)


@pytest.mark.parametrize("arch", ["gru", "transformer"])
def test_gradients_are_clipped_to_the_global_norm_before_each_step(tmp_path, reversal_tokenizers, arch, monkeypatch):
    # A spy on the real optimizer (not a stand-in): what Adam.step sees is the clipped gradient of every parameter.
    seen: list[float] = []
    step = torch.optim.Adam.step

    def spying_step(self, *args, **kwargs):
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        seen.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", spying_step)
    clip = 0.05  # far below these tiny models' gradient norms (0.3-3 at the start)
    config = dataclasses.replace(S.TINY_TRANSLATOR, arch=arch, **S.TINY_OVERRIDES.get(arch, {}))
    config = dataclasses.replace(config, steps=6, validate_every=6, bleu_sample=0, clip_norm=clip)
    T.train_translator(config, S.reversal_pairs(300, 0), S.reversal_pairs(20, 1), tmp_path, reversal_tokenizers)
    assert len(seen) == 6
    assert all(n == pytest.approx(clip, rel=1e-4) for n in seen), seen  # each step's gradient was larger, and cut


def test_same_seed_repeats_a_run(tmp_path, reversal_tokenizers):
    first = _short_run("gru", tmp_path / "a", 15, reversal_tokenizers)
    second = _short_run("gru", tmp_path / "b", 15, reversal_tokenizers)
    assert first["step_losses"] == second["step_losses"]


def test_metrics_and_train_state_saved_beside_checkpoint(tmp_path, reversal_tokenizers):
    _short_run("lstm", tmp_path, 20, reversal_tokenizers)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["steps_trained"] == 20
    assert math.isfinite(metrics["dev_loss"]) and 0 <= metrics["dev_bleu"] <= 100
    assert load_checkpoint(tmp_path).metrics == metrics
    state = torch.load(tmp_path / T.TRAIN_STATE_FILE, weights_only=True)
    assert set(state) >= {"model", "optimizer", "scheduler", "step", "epoch", "batch", "torch_rng", "task_rng"}


def test_best_checkpoint_is_kept_when_dev_loss_worsens(tmp_path, reversal_tokenizers):
    # Dev pairs that copy instead of reverse: dev loss first falls (lengths, symbols), then rises as reversal is learnt.
    config = dataclasses.replace(S.TINY_TRANSLATOR, steps=100, validate_every=10, bleu_sample=0)
    dev = [(s, s) for s, _ in S.reversal_pairs(20, 1)]
    result = T.train_translator(config, S.reversal_pairs(300, 0), dev, tmp_path, reversal_tokenizers)
    assert result["best_step"] < 100 and result["last_dev"]["dev_loss"] > result["dev_loss"]
    checkpoint = load_checkpoint(tmp_path)
    assert checkpoint.metrics["step"] == result["best_step"]
    examples = T.encode_pairs(dev, reversal_tokenizers["source"], reversal_tokenizers["target"])
    with torch.no_grad():
        dev_loss = T.translation_loss(checkpoint.model, T.translation_batch(examples))
    assert float(dev_loss) == pytest.approx(checkpoint.metrics["dev_loss"], rel=1e-5)


def test_time_budget_stops_training(tmp_path, reversal_tokenizers):
    config = dataclasses.replace(S.TINY_TRANSLATOR, steps=1_000_000, validate_every=1_000_000, time_budget=1.0,
                                 bleu_sample=0)
    result = T.train_translator(config, S.reversal_pairs(200, 0), S.reversal_pairs(10, 1), tmp_path,
                                reversal_tokenizers)
    assert result["stopped_by_time_budget"]
    assert 0 < result["steps_trained"] < 1_000_000
    assert load_checkpoint(tmp_path).metrics["steps_trained"] == result["steps_trained"]


def test_resume_without_train_state_is_refused(tmp_path, reversal_tokenizers):
    _short_run("lstm", tmp_path, 10, reversal_tokenizers)
    (tmp_path / T.TRAIN_STATE_FILE).unlink()
    with pytest.raises(T.TrainingError, match="train_state.pt"):
        _short_run("lstm", tmp_path, 20, reversal_tokenizers, resume=True)


def test_cli_trains_a_translator_from_tsv(tmp_path):
    for name, pairs in (("train.tsv", S.reversal_pairs(200, 0)), ("dev.tsv", S.reversal_pairs(10, 1))):
        (tmp_path / name).write_text("".join(f"{s}\t{t}\n" for s, t in pairs))
    code = cli_main([
        "train", "translator", "--arch", "gru", "--train", str(tmp_path / "train.tsv"), "--dev",
        str(tmp_path / "dev.tsv"), "--output", str(tmp_path / "ckpt"), "--hidden-size", "16", "--embed-size", "8",
        "--layers", "1", "--vocab-size", "30", "--joint-vocab", "--steps", "6", "--validate-every", "3",
        "--time-budget", "5m", "--threads", "1", "--no-progress", "--seed", "3",
    ])
    assert code == 0
    checkpoint = load_checkpoint(tmp_path / "ckpt")
    assert checkpoint.family == "rnn" and checkpoint.config.cell == "gru" and checkpoint.config.hidden_size == 16
    assert checkpoint.metrics["steps_trained"] == 6


def test_bert_run_with_bpe_vocabulary_repeats_exactly(tmp_path):
    config = dataclasses.replace(S.TINY_BERT, steps=5, validate_every=5, vocab_kind="bpe", dropout=0.1)
    runs = [T.train_bert(config, S.synthetic_documents(20, 0), tmp_path / str(i), dev=S.synthetic_documents(3, 1))
            for i in range(2)]
    assert runs[0]["step_losses"] == runs[1]["step_losses"]


def test_cli_trains_a_bert_from_prose(tmp_path):
    prose = tmp_path / "prose.txt"
    # One document a line; sentences end with a full stop and start upper-case, as the sentence splitter expects.
    prose.write_text("".join(" ".join(f"{s.capitalize()}." for s in d) + "\n" for d in S.synthetic_documents(30, 0)))
    code = cli_main([
        "train", "bert", "--corpus", str(prose), "--output", str(tmp_path / "ckpt"), "--hidden-size", "16",
        "--heads", "2", "--ff-size", "32", "--layers", "1", "--vocab-size", "120", "--max-len", "32", "--steps", "4",
        "--validate-every", "2", "--no-progress",
    ])
    assert code == 0
    checkpoint = load_checkpoint(tmp_path / "ckpt")
    assert checkpoint.family == "bert" and set(checkpoint.tokenizers) == {"text"}
    assert 0 <= checkpoint.metrics["dev_nsp_accuracy"] <= 1


# --- pieces ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("field, value", [("steps", 0), ("lr", 0.0), ("label_smoothing", 1.0), ("arch", "cnn")])
def test_config_refuses_impossible_settings(field, value):
    with pytest.raises(T.TrainingError, match=field if field != "arch" else "cnn"):
        T.TrainConfig(**{field: value})


@pytest.mark.parametrize("text, seconds", [("90", 90), ("45s", 45), ("20m", 1200), ("1.5h", 5400)])
def test_duration_accepts_seconds_minutes_hours(text, seconds):
    assert T.parse_duration(text) == seconds


def test_duration_rejects_unknown_unit():
    with pytest.raises(Exception, match="20d"):
        T.parse_duration("20d")


def test_inverse_sqrt_schedule_peaks_at_end_of_warmup():
    factor = T.lr_factor("inverse-sqrt", warmup=100, total_steps=1000)
    values = [factor(s) for s in range(1000)]
    assert max(values) == values[99] == 1.0
    assert values[0] == pytest.approx(0.01) and values[399] == pytest.approx(0.5)


def test_linear_schedule_reaches_zero_at_last_step():
    factor = T.lr_factor("linear", warmup=10, total_steps=100)
    assert factor(9) == 1.0 and factor(100) == 0.0 and 0 < factor(50) < 1


def _lengths(n: int, seed: int) -> list[tuple[int, int]]:
    g = torch.Generator().manual_seed(seed)
    return [tuple(int(x) for x in torch.randint(1, 40, (2,), generator=g)) for _ in range(n)]


def test_batches_stay_within_token_budget():
    lengths = _lengths(2000, 0)
    for batch in token_budget_batches(lengths, budget=300, seed=1, bucket_size=200):
        assert padded_tokens([lengths[i] for i in batch]) <= 300


def test_batches_cover_every_example_once():
    lengths = _lengths(500, 1)
    batches = token_budget_batches(lengths, budget=256, seed=2)
    assert sorted(i for b in batches for i in b) == list(range(500))


def test_batches_depend_only_on_seed():
    lengths = _lengths(500, 2)
    assert token_budget_batches(lengths, 256, seed=5) == token_budget_batches(lengths, 256, seed=5)
    assert token_budget_batches(lengths, 256, seed=5) != token_budget_batches(lengths, 256, seed=6)


def test_length_bucketing_pads_less_than_random_batches():
    lengths = _lengths(1000, 3)
    batches = token_budget_batches(lengths, budget=400, seed=0, bucket_size=1000)
    real = sum(a + b for a, b in lengths)
    padded = sum(padded_tokens([lengths[i] for i in batch]) for batch in batches)
    assert padded < 1.2 * real


def test_batch_stream_resumes_at_its_position():
    lengths = _lengths(300, 4)
    stream = BatchStream(lengths, 200, seed=1)
    expected = [next(stream) for _ in range(100)]  # crosses epochs
    first = BatchStream(lengths, 200, seed=1)
    head = [next(first) for _ in range(37)]
    second = BatchStream(lengths, 200, seed=1, position=first.position)
    assert head + [next(second) for _ in range(63)] == expected
    assert second.position.epoch >= 1 and isinstance(second.position, BatchPosition)


def _evaluate_and_save(checkpoint: Path, tmp_path: Path, capsys) -> dict:
    """Run `seqserve evaluate` as a user would: its scores merge into the checkpoint's metrics.json."""
    tsv = tmp_path / "test.tsv"
    tsv.write_text("".join(f"{s}\t{t}\n" for s, t in S.reversal_pairs(10, 7)), encoding="utf-8")
    assert cli_main(["evaluate", str(checkpoint), "--tsv", str(tsv)]) == 0
    return json.loads(capsys.readouterr().out)


def test_resuming_into_new_weights_drops_the_old_weights_evaluation(tmp_path, reversal_tokenizers, capsys):
    run = tmp_path / "run"
    _short_run("lstm", run, 20, reversal_tokenizers)
    evaluated = _evaluate_and_save(run, tmp_path, capsys)
    before = json.loads((run / "metrics.json").read_text())
    assert set(evaluated) <= set(before) and "bleu" in before and "eval_sentences" in before
    _short_run("lstm", run, 60, reversal_tokenizers, resume=True)
    after = json.loads((run / "metrics.json").read_text())
    assert after["step"] > before["step"]  # new best weights were saved
    assert not set(evaluated) & set(after), after
    assert after["steps_trained"] == 60 and "dev_loss" in after and "dev_bleu" in after  # training's own stay


def test_evaluation_stays_while_the_weights_do(tmp_path, reversal_tokenizers, capsys):
    run = tmp_path / "run"
    _short_run("lstm", run, 20, reversal_tokenizers)
    evaluated = _evaluate_and_save(run, tmp_path, capsys)
    _short_run("lstm", run, 20, reversal_tokenizers, resume=True)  # nothing left to train: the weights stay
    after = json.loads((run / "metrics.json").read_text())
    assert {k: after[k] for k in evaluated} == evaluated
