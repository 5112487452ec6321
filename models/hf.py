"""`seqserve import-hf DIR --output CKPT`: a local Hugging Face BERT directory becomes a seqserve checkpoint.

A MarianMT directory (config.json model_type "marian") is handed to models/hf_marian.py instead.

Reads config.json, the weights (model.safetensors, its sharded index, or pytorch_model.bin with weights_only=True)
and tokenizer.json, renames the weights to models/bert.py's names, and records the sentence pooling of a
sentence-transformers directory (modules.json -> 1_Pooling/config.json, Normalize). The mapping is ours: importing
needs neither `transformers` nor `sentence-transformers`.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer

from seqserve.models.bert import Bert, BertConfig
from seqserve.models.checkpoint import load_weights, save_checkpoint

logger = logging.getLogger(__name__)

BERT_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")

# Hugging Face name (after dropping the "bert." prefix and renaming gamma/beta) -> ours, first match wins.
_RENAMES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(p), r)
    for p, r in [
        (r"^embeddings\.word_embeddings\.", "embeddings.word."),
        (r"^embeddings\.position_embeddings\.", "embeddings.position."),
        (r"^embeddings\.token_type_embeddings\.", "embeddings.segment."),
        (r"^embeddings\.LayerNorm\.", "embeddings.norm."),
        (r"^encoder\.layer\.(\d+)\.attention\.self\.(query|key|value)\.", r"layers.\1.attention.\2."),
        (r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"layers.\1.attention.out."),
        (r"^encoder\.layer\.(\d+)\.attention\.output\.LayerNorm\.", r"layers.\1.attention_norm."),
        (r"^encoder\.layer\.(\d+)\.intermediate\.dense\.", r"layers.\1.ffn.up."),
        (r"^encoder\.layer\.(\d+)\.output\.dense\.", r"layers.\1.ffn.down."),
        (r"^encoder\.layer\.(\d+)\.output\.LayerNorm\.", r"layers.\1.ffn_norm."),
        (r"^pooler\.dense\.", "pooler.dense."),
        (r"^cls\.predictions\.transform\.dense\.", "mlm.transform."),
        (r"^cls\.predictions\.transform\.LayerNorm\.", "mlm.norm."),
        (r"^cls\.predictions\.decoder\.", "mlm.decoder."),
        (r"^cls\.predictions\.bias$", "mlm.decoder.bias"),  # tied to cls.predictions.decoder.bias in HF
        (r"^cls\.seq_relationship\.", "nsp."),
    ]
]
# Buffers some Hugging Face versions save; ours are rebuilt from the config.
_IGNORED = re.compile(r"^embeddings\.(position_ids|token_type_ids)$")


class HFImportError(Exception):
    """A Hugging Face directory that cannot become a seqserve BERT checkpoint; the message says which file and why."""


class ImportedBert(NamedTuple):
    model: Bert  # in eval mode
    tokenizer: Tokenizer  # padding off, truncation at max_seq_length
    info: dict[str, Any]  # imported_from, pooling, normalize_embeddings, max_seq_length, hf_name_or_path


# --- reading the directory ----------------------------------------------------------------------------------------


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise HFImportError(f"{path} is missing") from None
    except json.JSONDecodeError as e:
        raise HFImportError(f"{path} is not valid JSON: {e}") from None


def read_config_object(path: Path, required: Sequence[str] = ()) -> dict[str, Any]:
    """A JSON object (config.json) holding every key of `required` as a positive integer."""
    hf = _read_json(path)
    if not isinstance(hf, dict):
        raise HFImportError(f"{path}: expected a JSON object, got a {type(hf).__name__}")
    missing = [key for key in required if key not in hf]
    if missing:
        raise HFImportError(f"{path}: {', '.join(missing)} missing")
    for key in required:
        if isinstance(hf[key], bool) or not isinstance(hf[key], int) or hf[key] < 1:
            raise HFImportError(f"{path}: {key} = {json.dumps(hf[key])} is not a positive integer")
    return hf


BERT_REQUIRED_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")


def read_hf_config(hf_dir: Path) -> dict[str, Any]:
    """config.json of a BERT, refusing the variants models/bert.py does not compute."""
    path = hf_dir / "config.json"
    hf = read_config_object(path)
    if hf.get("model_type") != "bert":
        raise HFImportError(f"{path}: model_type={hf.get('model_type')!r}; seqserve imports 'bert' and 'marian' "
                            f"(MarianMT)")  # fmt: skip
    hf = read_config_object(path, BERT_REQUIRED_KEYS)
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise HFImportError(f"{path}: position_embedding_type={hf['position_embedding_type']!r} is not 'absolute'")
    if hf.get("is_decoder") or hf.get("add_cross_attention"):
        raise HFImportError(f"{path}: decoder BERTs (is_decoder / add_cross_attention) are not supported")
    return hf


def read_hf_weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    """The state dict stored in the directory, as float32, whatever the file format."""
    if (hf_dir / "model.safetensors").is_file():
        state = _load_safetensors(hf_dir / "model.safetensors")
    elif (hf_dir / "model.safetensors.index.json").is_file():
        index_path = hf_dir / "model.safetensors.index.json"
        index = _read_json(index_path)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict):
            raise HFImportError(f"{index_path}: no weight_map object")
        state = {}
        for shard in sorted(set(map(str, weight_map.values()))):
            shard_path = hf_dir / shard
            if not shard_path.resolve().is_relative_to(hf_dir.resolve()):
                raise HFImportError(f"{index_path}: shard {shard!r} lies outside {hf_dir}")
            state.update(_load_safetensors(shard_path))
    elif (hf_dir / "pytorch_model.bin").is_file():
        # weights_only: a pickle from the internet must not run code; what it refuses is no state dict of ours.
        path = hf_dir / "pytorch_model.bin"
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # UnpicklingError (a disallowed global), RuntimeError (not a torch file), EOFError
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise HFImportError(f"{path} cannot be loaded as plain tensors (weights_only=True): {first}") from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise HFImportError(f"{path} holds no state dict of tensors")
    else:
        raise HFImportError(f"{hf_dir} has no model.safetensors, model.safetensors.index.json or pytorch_model.bin")
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise HFImportError(f"{path} is missing")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors' SafetensorError: a truncated file, a bad header
        raise HFImportError(f"{path} cannot be read as safetensors: {e}") from None


def map_weight_names(hf_state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Hugging Face weights under our names, and the Hugging Face names that have no place in our model."""
    ours, skipped = {}, []
    for name, tensor in hf_state.items():
        key = name.removeprefix("bert.")
        key = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", key)  # names of checkpoints converted from TF
        key = re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", key)
        if _IGNORED.match(key):
            continue
        for pattern, replacement in _RENAMES:
            if pattern.search(key):
                ours[pattern.sub(replacement, key)] = tensor
                break
        else:
            skipped.append(name)
    return ours, skipped


def read_pooling(hf_dir: Path) -> tuple[str, bool]:
    """(pooling, normalize) of a sentence-transformers directory; ("cls", False) for a plain Hugging Face BERT."""
    modules_path = hf_dir / "modules.json"
    if not modules_path.is_file():
        return "cls", False
    pooling, normalize = "cls", False
    modules = _read_json(modules_path)
    if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
        raise HFImportError(f"{modules_path}: expected a list of module objects")
    for module in modules:
        kind = str(module.get("type", "")).rsplit(".", 1)[-1]
        if kind == "Transformer":
            continue
        if kind == "Normalize":
            normalize = True
        elif kind == "Pooling":
            path = hf_dir / str(module.get("path", "")) / "config.json"
            modes = sorted(k.removeprefix("pooling_mode_") for k, v in read_config_object(path).items()
                           if k.startswith("pooling_mode_") and v)
            known = {"mean_tokens": "mean", "cls_token": "cls"}
            if len(modes) != 1 or modes[0] not in known:
                raise HFImportError(f"{path}: pooling modes {modes}; seqserve serves one of cls_token, mean_tokens")
            pooling = known[modes[0]]
        else:
            raise HFImportError(f"{modules_path}: module {module.get('type')!r} is not supported (Pooling, Normalize)")
    return pooling, normalize


def read_tokenizer(hf_dir: Path, max_length: int) -> Tokenizer:
    """tokenizer.json with padding off (the caller pads a batch) and truncation at the model's sequence limit."""
    path = hf_dir / "tokenizer.json"
    if not path.is_file():
        raise HFImportError(f"{path} is missing (save the tokenizer with a fast tokenizer to create it)")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as e:  # the tokenizers library raises a bare Exception ("Model missing.", a JSON error)
        raise HFImportError(f"{path} is not a tokenizers tokenizer: {e}") from None
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=max_length)
    missing = [t for t in BERT_SPECIAL_TOKENS if tokenizer.token_to_id(t) is None]
    if missing:
        logger.warning("%s lacks the BERT special tokens %s", path, missing)
    return tokenizer


# --- import -------------------------------------------------------------------------------------------------------


def load_hf_bert(hf_dir: str | Path) -> ImportedBert:
    """A Hugging Face BERT directory as our Bert (eval mode), its tokenizer and what was learned about it."""
    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise HFImportError(f"{hf_dir} is not a directory")
    hf = read_hf_config(hf_dir)
    state, skipped = map_weight_names(read_hf_weights(hf_dir))
    if skipped:
        logger.warning("%s: %d weights have no place in a seqserve BERT and are left out: %s",
                       hf_dir, len(skipped), skipped[:5])
    has_mlm = any(k.startswith("mlm.") for k in state)
    has_nsp = any(k.startswith("nsp.") for k in state)
    if has_mlm != has_nsp:
        logger.warning("%s has only the %s head; seqserve keeps both heads or neither, so it is left out",
                       hf_dir, "MLM" if has_mlm else "NSP")
        state = {k: v for k, v in state.items() if not k.startswith(("mlm.", "nsp."))}
    pooling, normalize = read_pooling(hf_dir)
    try:
        config = _bert_config(hf, state, has_mlm and has_nsp, pooling, normalize)
    except (TypeError, ValueError) as e:  # BertConfigError names the numbers (heads that do not divide hidden...)
        raise HFImportError(f"{hf_dir / 'config.json'}: {e}") from None
    model = Bert(config)
    if config.with_heads and config.tie_word_embeddings:
        state.pop("mlm.decoder.weight", None)  # Hugging Face ties it to the word embeddings too
    missing, unexpected = load_weights(model, state, f"{hf_dir}: the weights do not fit config.json", HFImportError)
    missing = [k for k in missing if not (k == "mlm.decoder.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise HFImportError(f"{hf_dir}: weights missing for {missing[:5]}, weights without a place {unexpected[:5]}")
    model.eval()
    sentence_config = hf_dir / "sentence_bert_config.json"
    max_seq_length = config.max_position_embeddings
    if sentence_config.is_file():
        declared = read_config_object(sentence_config).get("max_seq_length") or max_seq_length
        if isinstance(declared, bool) or not isinstance(declared, int) or declared < 1:
            raise HFImportError(f"{sentence_config}: max_seq_length = {json.dumps(declared)} is not a positive integer")
        max_seq_length = min(max_seq_length, declared)
    info = {
        "imported_from": str(hf_dir.resolve()),
        "hf_name_or_path": hf.get("_name_or_path", ""),
        "pooling": pooling,
        "normalize_embeddings": normalize,
        "max_seq_length": max_seq_length,
    }
    return ImportedBert(model, read_tokenizer(hf_dir, max_seq_length), info)


def _bert_config(
    hf: dict[str, Any], state: dict[str, torch.Tensor], with_heads: bool, pooling: str, normalize: bool
) -> BertConfig:
    return BertConfig(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_hidden_layers=hf["num_hidden_layers"],
        num_attention_heads=hf["num_attention_heads"],
        intermediate_size=hf["intermediate_size"],
        hidden_act=hf.get("hidden_act", "gelu"),
        max_position_embeddings=hf.get("max_position_embeddings", 512),
        type_vocab_size=hf.get("type_vocab_size", 2),
        layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
        hidden_dropout_prob=hf.get("hidden_dropout_prob", 0.1),
        attention_probs_dropout_prob=hf.get("attention_probs_dropout_prob", 0.1),
        initializer_range=hf.get("initializer_range", 0.02),
        pad_token_id=hf.get("pad_token_id") or 0,
        tie_word_embeddings=hf.get("tie_word_embeddings", True),
        with_pooler="pooler.dense.weight" in state,
        with_heads=with_heads,
        pooling=pooling,
        normalize_embeddings=normalize,
    )


def check_output(output: Path, force: bool) -> None:
    """Refuse an output that is a file, or a folder with something in it (unless `force`)."""
    if output.exists() and not output.is_dir():
        raise HFImportError(f"{output} is not a folder")
    if output.exists() and any(output.iterdir()) and not force:
        raise HFImportError(f"{output} exists and is not empty (use force=True / --force to overwrite)")


def import_hf_bert(hf_dir: str | Path, output_dir: str | Path, force: bool = False) -> Path:
    """Write the seqserve checkpoint of a Hugging Face BERT directory; returns the checkpoint folder."""
    output = Path(output_dir)
    check_output(output, force)
    imported = load_hf_bert(hf_dir)
    path = save_checkpoint(output, imported.model, {"text": imported.tokenizer}, imported.info)
    logger.info("imported %s -> %s (pooling %s)", hf_dir, path, imported.info["pooling"])
    return path


# --- command ------------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("hf_dir", metavar="DIR", type=Path,
                        help="local Hugging Face BERT directory (config.json, model.safetensors or pytorch_model.bin, "
                             "tokenizer.json; sentence-transformers' modules.json and 1_Pooling/ when present), or "
                             "a MarianMT (OPUS-MT) directory (config.json, weights, source.spm, target.spm, "
                             "vocab.json)")
    parser.add_argument("--output", "-o", required=True, type=Path, metavar="CKPT",
                        help="checkpoint folder to write (model.safetensors, config.json, tokenizer.json, "
                             "metrics.json)")
    parser.add_argument("--force", action="store_true", help="overwrite the output folder when it is not empty")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from seqserve.models.hf_marian import import_hf_marian, is_marian_dir

    importer = import_hf_marian if is_marian_dir(args.hf_dir) else import_hf_bert
    try:
        path = importer(args.hf_dir, args.output, force=args.force)
    except (HFImportError, OSError) as e:  # the one place the command turns its failures into a message
        logger.debug("import failed", exc_info=True)
        logger.error("import failed: %s", e)
        return 1
    sys.stdout.write(f"{path}\n")
    return 0
