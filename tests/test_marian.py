"""MarianMT import: a random-weight MarianMTModel with a locally trained SentencePiece model, saved the way
`transformers` saves OPUS-MT, must tokenize, score and decode exactly as `transformers` does, through torch, the
exported graphs and the gRPC server."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for benchmarks/

from benchmarks.marian_model import TINY, build_marian_dir, synthetic_sentences  # noqa: E402

MAX_NEW = 12
SENTENCES = synthetic_sentences(6, seed=7) + ["Ünïcödé  and   spaces ", "", "x"]


@pytest.fixture(scope="module")
def marian_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    return build_marian_dir(tmp_path_factory.mktemp("marian") / "hf", TINY, seed=3)


@pytest.fixture(scope="module")
def hf(marian_dir):
    from transformers import MarianMTModel, MarianTokenizer

    return MarianMTModel.from_pretrained(marian_dir).eval(), MarianTokenizer.from_pretrained(marian_dir)


@pytest.fixture(scope="module")
def imported(marian_dir):
    from seqserve.models.hf_marian import load_hf_marian

    return load_hf_marian(marian_dir)


def _generate(hf, texts: list[str], max_new: int = MAX_NEW) -> list[list[int]]:
    """transformers' greedy ids without the decoder start token and after the first EOS."""
    model, tokenizer = hf
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**batch, num_beams=1, do_sample=False, max_new_tokens=max_new)
    rows = []
    for row in out[:, 1:].tolist():
        rows.append(row[: row.index(model.config.eos_token_id)] if model.config.eos_token_id in row else row)
    return [[i for i in r if i != model.config.pad_token_id] for r in rows]


def test_source_tokenizer_gives_marian_tokenizer_ids(hf, imported):
    _, tokenizer = hf
    for text in SENTENCES:
        assert imported.tokenizers["source"].encode(text).ids == tokenizer(text)["input_ids"], text


def test_target_tokenizer_decodes_like_marian_tokenizer(hf, imported):
    _, tokenizer = hf
    for text in SENTENCES[:6]:
        ids = tokenizer(text)["input_ids"]
        ours = imported.tokenizers["target"].decode(ids, skip_special_tokens=True)
        assert ours == tokenizer.decode(ids, skip_special_tokens=True)


def test_config_carries_marian_options(imported, marian_dir):
    config = imported.model.config
    assert (config.positional_encoding, config.activation, config.normalize_before) == ("sinusoidal_halves",
                                                                                        "swish", False)  # fmt: skip
    assert config.scale_embedding and config.share_embeddings and config.final_logits_bias
    assert config.decoder_start_id == config.pad_id == TINY.vocab - 1
    assert config.eos_id == 0
    assert imported.tokenizers["source"].token_to_id("<s>") == config.bos_id == TINY.vocab


def test_teacher_forced_logits_equal_marian_except_banned_tokens(hf, imported):
    model, tokenizer = hf
    batch = tokenizer(SENTENCES[:4], return_tensors="pt", padding=True)
    decoder_ids = torch.tensor([[model.config.decoder_start_token_id, 5, 9, 17, 3]] * 4)
    with torch.no_grad():
        theirs = model(**batch, decoder_input_ids=decoder_ids).logits  # (B, T, V)
        ours = imported.model(batch["input_ids"], batch["attention_mask"] == 0, decoder_ids)  # (B, T, V+1)
    pad = model.config.pad_token_id
    kept = [i for i in range(theirs.shape[-1]) if i != pad]
    torch.testing.assert_close(ours[..., kept], theirs[..., kept], atol=1e-4, rtol=1e-4)
    assert (ours[..., pad] < theirs[..., pad] - 200).all()  # generate's bad_words_ids, as a logit bias
    assert (ours[..., -1] < -200).all()  # the appended <s> is never chosen


def test_greedy_decode_equals_transformers_generate(hf, imported):
    from seqserve.models.decoding import greedy_decode

    _, tokenizer = hf
    batch = tokenizer(SENTENCES, return_tensors="pt", padding=True)
    config = imported.model.config
    with torch.no_grad():
        ours = greedy_decode(imported.model, batch["input_ids"], batch["attention_mask"] == 0, MAX_NEW,
                             config.decoder_start_id, config.eos_id).tolist()  # fmt: skip
    expected = _generate(hf, SENTENCES)
    assert any(len(set(r)) > 1 for r in expected)  # the outputs depend on the source, not one repeated token
    assert [[i for i in r if i not in (config.eos_id, config.pad_id)] for r in ours] == expected


def test_import_hf_command_writes_a_transformer_checkpoint(marian_dir, tmp_path, imported):
    import argparse

    from seqserve.models import hf as hf_command
    from seqserve.models.checkpoint import load_checkpoint

    parser = argparse.ArgumentParser()
    hf_command.add_arguments(parser)
    assert hf_command.run(parser.parse_args([str(marian_dir), "--output", str(tmp_path / "ckpt")])) == 0
    checkpoint = load_checkpoint(tmp_path / "ckpt")
    assert checkpoint.family == "transformer"
    assert checkpoint.config == imported.model.config
    for name, tensor in imported.model.state_dict().items():
        torch.testing.assert_close(checkpoint.model.state_dict()[name], tensor, atol=0, rtol=0)


@pytest.fixture(scope="module")
def marian_repository(marian_dir, tmp_path_factory) -> Path:
    from seqserve.export.hf_marian import export_hf

    root = tmp_path_factory.mktemp("marian_repository")
    export_hf(marian_dir, root, "opus-tiny")
    return root


def test_export_writes_a_transformer_translation_manifest(marian_repository):
    from seqserve.server.repository import ModelRepository

    manifest = ModelRepository(marian_repository).manifest("opus-tiny")
    assert (manifest.task, manifest.architecture) == ("translation", "transformer")
    assert manifest.special_tokens["decoder_start"] == TINY.vocab - 1
    assert manifest.special_tokens["eos"] == 0


def test_served_translation_equals_transformers_generate(marian_repository, hf):
    import grpc

    from seqserve.protos.v1 import seqserve_pb2 as pb
    from seqserve.protos.v1 import seqserve_pb2_grpc as pb_grpc
    from seqserve.server.config import ServerConfig
    from seqserve.server.repository import ModelRepository
    from seqserve.server.testing import ServerThread

    _, tokenizer = hf
    texts = SENTENCES[:5]
    config = ServerConfig(port=0, metrics_port=None, instances=1, threads=1)
    with ServerThread(config, ModelRepository(marian_repository)) as server, \
            grpc.insecure_channel(server.address) as channel:  # fmt: skip
        response = pb_grpc.InferenceStub(channel).Translate(pb.TranslateRequest(
            model=pb.ModelSpec(name="opus-tiny"), texts=texts,
            options=pb.DecodingOptions(max_output_tokens=MAX_NEW),
        ))  # fmt: skip
    expected = [tokenizer.decode(ids, skip_special_tokens=True) for ids in _generate(hf, texts)]
    assert [t.hypotheses[0].text for t in response.translations] == expected


def test_pad_banned_by_generation_config_is_never_chosen(imported):
    config = imported.model.config
    bias = imported.model.final_logits_bias.detach().numpy()
    assert bias[config.pad_id] <= -300
    assert np.all(bias[: config.pad_id] > -100)  # EOS carries the test model's own -50, nothing else is banned


def test_export_hf_command_exports_a_marian_directory(marian_dir, tmp_path):
    import argparse

    from seqserve.export import cli_hf
    from seqserve.server.repository import ModelRepository

    parser = argparse.ArgumentParser()
    cli_hf.add_arguments(parser)
    args = parser.parse_args([str(marian_dir), "--repository", str(tmp_path / "repo"), "--name", "opus"])
    assert cli_hf.run(args) == 0
    assert ModelRepository(tmp_path / "repo").manifest("opus").architecture == "transformer"


def test_export_hf_refuses_bert_options_for_a_marian_directory(marian_dir, tmp_path):
    from seqserve.export.hf_marian import export_hf
    from seqserve.export.pipeline import ExportError

    with pytest.raises(ExportError, match="split_mlm"):
        export_hf(marian_dir, tmp_path / "repo", "opus", split_mlm=True)


def test_language_code_prefix_is_one_token_as_in_marian_tokenizer(tmp_path):
    from transformers import MarianTokenizer

    from seqserve.models.hf_marian import load_hf_marian

    directory = build_marian_dir(tmp_path / "multi", TINY, seed=4, language_codes=(">>deu<<", ">>fra<<"))
    theirs = MarianTokenizer.from_pretrained(directory)
    ours = load_hf_marian(directory).tokenizers["source"]
    for text in (">>fra<< Hello there.", ">>deu<<Guten Tag", "no code here"):
        assert ours.encode(text).ids == theirs(text)["input_ids"], text
