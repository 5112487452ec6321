"""Evaluation: BLEU/chrF of greedy translations, MLM/NSP accuracy of a BERT, metrics saved beside checkpoints."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from seqserve.cli import main as cli_main
from seqserve.models import synthetic as S
from seqserve.models import train as T
from seqserve.models.checkpoint import load_checkpoint
from seqserve.models.evaluate import EvaluationError, evaluate_bert, evaluate_translator, score_translations, translate
from seqserve.models.tokenization import train_tokenizer


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def translator_dir(tmp_path_factory) -> Path:
    """A half-trained reversal translator: good enough to emit words, not so good that every score is 100."""
    torch.set_num_threads(1)
    output = tmp_path_factory.mktemp("translator")
    tokenizer = train_tokenizer([s for s, _ in S.reversal_pairs(500, 0)], kind="bpe", vocab_size=40, role="joint")
    config = dataclasses.replace(S.TINY_TRANSLATOR, steps=120, validate_every=120, bleu_sample=0)
    T.train_translator(config, S.reversal_pairs(1000, 0), S.reversal_pairs(20, 1), output,
                       {"source": tokenizer, "target": tokenizer})
    return output


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    torch.set_num_threads(1)
    output = tmp_path_factory.mktemp("bert")
    S.tiny_bert(output, steps=20, validate_every=20)
    return output


def _write_tsv(path: Path, pairs: list[tuple[str, str]]) -> Path:
    path.write_text("".join(f"{s}\t{t}\n" for s, t in pairs), encoding="utf-8")
    return path


def _cli_metrics(capsys, argv: list[str]) -> dict:
    capsys.readouterr()
    assert cli_main(argv) == 0
    return json.loads(capsys.readouterr().out)


# --- scores ------------------------------------------------------------------------------------------------------


def test_references_score_bleu_and_chrf_100():
    references = ["Das ist ein kleiner Test.", "Öffnen Sie das Menü Datei.", "Ja"]
    scores = score_translations(references, references)
    assert scores.bleu == pytest.approx(100.0) and scores.chrf == pytest.approx(100.0) and scores.exact_match == 1.0


def test_imperfect_output_scores_between_0_and_100():
    scores = score_translations(["the cat sat on a mat", "hello"], ["the cat sat on the mat", "hello world"])
    assert 0 < scores.bleu < 100 and 0 < scores.chrf < 100 and scores.exact_match == 0.0


def test_scoring_refuses_unequal_counts():
    with pytest.raises(EvaluationError, match="2 hypotheses for 1 references"):
        score_translations(["a", "b"], ["a"])


# --- translators -------------------------------------------------------------------------------------------------


def test_translate_returns_outputs_in_input_order(translator_dir):
    checkpoint = load_checkpoint(translator_dir)
    sources = [s for s, _ in S.reversal_pairs(30, 5)]  # mixed lengths: batches are formed by length
    src_tok, tgt_tok = checkpoint.tokenizers["source"], checkpoint.tokenizers["target"]
    batched = translate(checkpoint.model, src_tok, tgt_tok, sources, token_budget=200)
    one_by_one = [translate(checkpoint.model, src_tok, tgt_tok, [s])[0] for s in sources]
    assert batched == one_by_one


def test_cli_scores_bleu_100_against_the_models_own_output(tmp_path, capsys, translator_dir):
    checkpoint = load_checkpoint(translator_dir)
    sources = [s for s, _ in S.reversal_pairs(40, 6)]
    hypotheses = translate(checkpoint.model, checkpoint.tokenizers["source"], checkpoint.tokenizers["target"], sources)
    assert all(hypotheses)
    tsv = _write_tsv(tmp_path / "perfect.tsv", list(zip(sources, hypotheses)))
    metrics = _cli_metrics(capsys, ["evaluate", str(translator_dir), "--tsv", str(tsv), "--no-save"])
    assert metrics["bleu"] == pytest.approx(100.0) and metrics["chrf"] == pytest.approx(100.0)
    assert metrics["eval_sentences"] == 40


def test_cli_saves_bleu_and_chrf_beside_the_checkpoint(tmp_path, capsys, translator_dir):
    pairs = S.reversal_pairs(40, 7)
    tsv = _write_tsv(tmp_path / "test.tsv", pairs)
    hyp_file = tmp_path / "hyp.txt"
    printed = _cli_metrics(capsys, ["evaluate", str(translator_dir), "--tsv", str(tsv), "--hypotheses", str(hyp_file)])
    saved = json.loads((translator_dir / "metrics.json").read_text())
    assert saved["bleu"] == printed["bleu"] and saved["chrf"] == printed["chrf"]
    assert 0 <= saved["chrf"] <= 100 and saved["eval_tsv"] == str(tsv)
    assert "dev_loss" in saved  # training metrics are kept, evaluation merges into them
    direct = evaluate_translator(load_checkpoint(translator_dir), pairs)
    assert direct.bleu == pytest.approx(printed["bleu"])
    assert len(hyp_file.read_text().splitlines()) == 40


def test_translator_evaluation_refuses_a_bert(bert_dir):
    with pytest.raises(EvaluationError, match="not a translator"):
        evaluate_translator(load_checkpoint(bert_dir), [("a", "b")])


# --- BERT ----------------------------------------------------------------------------------------------------------


def test_cli_reports_mlm_and_nsp_accuracy_on_prose(tmp_path, capsys, bert_dir):
    documents = S.synthetic_documents(10, 9, sentences=4)
    prose = tmp_path / "prose.txt"
    prose.write_text("".join(" ".join(f"{s.capitalize()}." for s in d) + "\n" for d in documents))
    printed = _cli_metrics(capsys, ["evaluate", str(bert_dir), "--prose", str(prose), "--max-len", "32"])
    saved = json.loads((bert_dir / "metrics.json").read_text())
    assert saved["mlm_accuracy"] == printed["mlm_accuracy"] and saved["nsp_accuracy"] == printed["nsp_accuracy"]
    assert 0 <= printed["mlm_accuracy"] <= 1 and 0 <= printed["nsp_accuracy"] <= 1
    assert printed["eval_pairs"] == 10 * 3  # one pair per adjacent sentence pair
    assert printed["eval_masked_tokens"] > 0


def test_bert_evaluation_repeats_with_the_same_seed(bert_dir):
    checkpoint = load_checkpoint(bert_dir)
    documents = S.synthetic_documents(10, 4)
    assert evaluate_bert(checkpoint, documents, seed=1, max_len=32) == evaluate_bert(checkpoint, documents, seed=1,
                                                                                     max_len=32)


def test_bert_evaluation_refuses_a_translator(translator_dir):
    with pytest.raises(EvaluationError, match="not a BERT"):
        evaluate_bert(load_checkpoint(translator_dir), S.synthetic_documents(3, 0))


# --- one line instead of a traceback -----------------------------------------------------------------------------


def test_hypotheses_in_a_missing_folder_is_a_usage_error(tmp_path, capsys, translator_dir):
    with pytest.raises(SystemExit) as info:
        cli_main(["evaluate", str(translator_dir), "--tsv", str(tmp_path / "dev.tsv"), "--hypotheses",
                  str(tmp_path / "nowhere" / "h.txt")])  # fmt: skip
    assert info.value.code == 2 and "nowhere is not an existing folder" in capsys.readouterr().err


def test_threads_below_one_is_a_usage_error(tmp_path, translator_dir):
    with pytest.raises(SystemExit) as info:
        cli_main(["evaluate", str(translator_dir), "--tsv", str(tmp_path / "dev.tsv"), "--threads", "-1"])
    assert info.value.code == 2


def test_an_empty_device_file_is_not_called_missing(translator_dir, caplog):
    assert cli_main(["evaluate", str(translator_dir), "--tsv", "/dev/null", "--no-save"]) == 1
    assert "/dev/null: no source<TAB>target pairs" in caplog.text and "no such file" not in caplog.text


@pytest.mark.parametrize("damage, expected", [
    ("truncate", "model.safetensors cannot be read as safetensors"),
    ("target_tokenizer.json", "target_tokenizer.json missing"),
])  # fmt: skip
def test_a_damaged_checkpoint_is_one_line(tmp_path, caplog, translator_dir, damage, expected):
    import shutil

    checkpoint = shutil.copytree(translator_dir, tmp_path / "ckpt")
    if damage == "truncate":
        (checkpoint / "model.safetensors").write_bytes((checkpoint / "model.safetensors").read_bytes()[:5])
    else:
        (checkpoint / damage).unlink()
    dev = _write_tsv(tmp_path / "dev.tsv", S.reversal_pairs(5, 1))
    assert cli_main(["evaluate", str(checkpoint), "--tsv", str(dev), "--no-save"]) == 1
    assert expected in caplog.text and "Traceback" not in caplog.text
