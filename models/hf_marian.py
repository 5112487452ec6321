"""`seqserve import-hf DIR` for a local Hugging Face MarianMT (OPUS-MT style) directory -> a Transformer checkpoint.

Reads config.json, the weights (model.safetensors or pytorch_model.bin, via models/hf.py's reader), vocab.json
(and target_vocab.json when the vocabularies are separate) and the SentencePiece models source.spm / target.spm, and
builds our TransformerTranslator with Marian's options (sinusoidal positions in halves, embedding scaling, post-norm,
swish, shared embeddings, final logits bias, decoder start = pad). The SentencePiece models become `tokenizers`
tokenizer.json files (Unigram with the spm normalizer, ids from vocab.json), so the torch-free server reads them.

One addition to the vocabulary: Marian has no `<s>` token, while our translator tokenizers carry `<pad> <s> </s> <unk>`
(docs/design.md). The import appends `<s>` as id V (V = Marian's vocabulary): its embedding is zero, its output row is
zero and its logit bias is -300, so the model can never produce it and every other log-probability is unchanged; greedy
and beam outputs equal Marian's. Decoding starts from Marian's decoder_start_token_id (pad), as `generate` does.

Letters: V Marian's vocabulary, H model width.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, NamedTuple

import torch
from tokenizers import AddedToken, Tokenizer, processors
from tokenizers.models import Unigram

from seqserve.models.checkpoint import load_weights, save_checkpoint
from seqserve.models.hf import HFImportError, check_output, read_config_object, read_hf_weights
from seqserve.models.transformer import TransformerConfig, TransformerTranslator

logger = logging.getLogger(__name__)

BOS_TOKEN = "<s>"
# Logit bias of the appended <s> row and of banned tokens: exp(-300) underflows to exactly 0 in float32, so they take no
# probability mass; a larger magnitude would make float rounding of their log-probabilities fail the export's parity.
_NEVER = -300.0
# Score of a vocab.json piece the SentencePiece model lacks: the Unigram lattice takes it only when nothing else fits.
_UNSEEN_PIECE_SCORE = -1e6

# Marian per-layer names -> ours (after the "model.encoder." / "model.decoder." prefixes).
_ENCODER_LAYER = {
    "self_attn.q_proj": "self_attn.query", "self_attn.k_proj": "self_attn.key", "self_attn.v_proj": "self_attn.value",
    "self_attn.out_proj": "self_attn.out", "self_attn_layer_norm": "self_attn_residual.norm",
    "fc1": "ffn.up", "fc2": "ffn.down", "final_layer_norm": "ffn_residual.norm",
}  # fmt: skip
_DECODER_LAYER = {
    **_ENCODER_LAYER,
    "encoder_attn.q_proj": "cross_attn.query", "encoder_attn.k_proj": "cross_attn.key",
    "encoder_attn.v_proj": "cross_attn.value", "encoder_attn.out_proj": "cross_attn.out",
    "encoder_attn_layer_norm": "cross_attn_residual.norm",
}  # fmt: skip
_ACTIVATIONS = {"swish": "swish", "silu": "swish", "relu": "relu", "gelu": "gelu"}
MARIAN_REQUIRED_KEYS = ("vocab_size", "d_model", "encoder_layers", "decoder_layers", "encoder_attention_heads",
                        "decoder_attention_heads", "encoder_ffn_dim")  # fmt: skip


class ImportedMarian(NamedTuple):
    model: TransformerTranslator  # in eval mode
    tokenizers: dict[str, Tokenizer]  # "source" (appends </s>) and "target"
    info: dict[str, Any]  # imported_from, hf_name_or_path, marian_vocab_size, added_tokens


def is_marian_dir(hf_dir: str | Path) -> bool:
    """Whether a directory holds a Hugging Face MarianMT model (config.json model_type "marian")."""
    path = Path(hf_dir) / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(config, dict) and config.get("model_type") == "marian"


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise HFImportError(f"{path} is missing") from None
    except json.JSONDecodeError as e:
        raise HFImportError(f"{path} is not valid JSON: {e}") from None


# --- tokenizers ---------------------------------------------------------------------------------------------------


def _spm_proto(path: Path) -> Any:
    from sentencepiece import sentencepiece_model_pb2

    if not path.is_file():
        raise HFImportError(f"{path} is missing (MarianMT directories hold source.spm and target.spm)")
    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except Exception as e:  # protobuf's DecodeError
        raise HFImportError(f"{path} is not a SentencePiece model: {e}") from None
    if proto.trainer_spec.model_type != 1:  # 1 = UNIGRAM, what Marian's SentencePiece models are
        raise HFImportError(f"{path}: SentencePiece model type {proto.trainer_spec.model_type} is not unigram (1)")
    return proto


def spm_tokenizer(spm_path: str | Path, vocab: dict[str, int], role: str) -> Tokenizer:
    """A `tokenizers` Unigram tokenizer that splits like the SentencePiece model and numbers pieces by `vocab`
    (Marian's vocab.json), as MarianTokenizer does; role "source" appends </s>, "target" adds nothing."""
    from transformers.convert_slow_tokenizer import SpmConverter

    proto = _spm_proto(Path(spm_path))
    if any(p.type == 4 for p in proto.pieces):
        raise HFImportError(f"{spm_path}: user-defined SentencePiece pieces are not supported")
    scores = {p.piece: p.score for p in proto.pieces if p.type == 1}  # normal pieces
    by_id = sorted(vocab.items(), key=lambda kv: kv[1])
    if [i for _, i in by_id] != list(range(len(by_id))):
        raise HFImportError(f"vocabulary ids are not 0..{len(by_id) - 1} without gaps")
    unseen = [t for t, _ in by_id if t not in scores]
    pieces = [(token, scores.get(token, _UNSEEN_PIECE_SCORE)) for token, _ in by_id]
    # SpmConverter reproduces SentencePiece's normalizer (precompiled charsmap, whitespace handling), the Metaspace
    # pre-tokenizer and the decoder; the model is then rebuilt with Marian's ids and unk.
    tokenizer = SpmConverter.build_tokenizer_from_spm_proto(proto, pieces)
    tokenizer.model = Unigram(pieces, unk_id=vocab["<unk>"], byte_fallback=proto.trainer_spec.byte_fallback)
    specials = [t for t in ("</s>", "<unk>", "<pad>") if t in vocab]
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tokenizer.add_special_tokens([AddedToken(BOS_TOKEN, special=True, normalized=False)])  # id V, see the docstring
    # Target-language codes of multilingual models (">>fra<<"): MarianTokenizer takes one off the front of the text as
    # a whole token; as added tokens they are matched whole (anywhere, a superset) and kept when decoding.
    codes = [t for t in vocab if t.startswith(">>") and t.endswith("<<")]
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in codes])
    if role == "source":
        eos = vocab["</s>"]
        tokenizer.post_processor = processors.TemplateProcessing(
            single="$A </s>", pair="$A $B </s>", special_tokens=[("</s>", eos)]
        )
    logger.debug("%s: %d pieces, %d without a SentencePiece score (%s)", spm_path, len(pieces), len(unseen),
                 unseen[:5])  # fmt: skip
    return tokenizer


# --- config and weights -------------------------------------------------------------------------------------------


def marian_config(hf: dict[str, Any], max_len: int = 256) -> TransformerConfig:
    """Our TransformerConfig for a MarianConfig dict; the vocabulary gains the <s> row (see the module docstring)."""
    if hf.get("model_type") != "marian":
        raise HFImportError(f"config.json: model_type={hf.get('model_type')!r}, expected 'marian'")
    if hf.get("normalize_before"):
        raise HFImportError("config.json: normalize_before=True; Marian checkpoints are post-norm")
    act = _ACTIVATIONS.get(hf.get("activation_function", "swish"))
    if act is None:
        raise HFImportError(f"config.json: activation_function={hf.get('activation_function')!r} is not supported")
    if hf["encoder_attention_heads"] != hf["decoder_attention_heads"]:
        raise HFImportError("config.json: encoder and decoder attention heads differ")
    if hf.get("encoder_ffn_dim") != hf.get("decoder_ffn_dim"):
        raise HFImportError("config.json: encoder_ffn_dim and decoder_ffn_dim differ")
    src_vocab = hf["vocab_size"]
    tgt_vocab = hf.get("decoder_vocab_size") or src_vocab
    shared = bool(hf.get("share_encoder_decoder_embeddings", True))
    for key in ("pad_token_id", "eos_token_id"):
        if isinstance(hf.get(key), bool) or not isinstance(hf.get(key), int) or hf[key] < 0:
            raise HFImportError(f"config.json: {key} = {json.dumps(hf.get(key))} is not a token id")
    pad, eos = hf["pad_token_id"], hf["eos_token_id"]
    start = hf.get("decoder_start_token_id")
    start = pad if start is None else start
    positions = hf.get("max_position_embeddings", 512)
    limit = min(max_len, positions - 1)  # the decoder's first position holds the start token
    return TransformerConfig(
        src_vocab_size=src_vocab + 1, tgt_vocab_size=tgt_vocab + 1,
        d_model=hf["d_model"], n_heads=hf["encoder_attention_heads"],
        n_encoder_layers=hf["encoder_layers"], n_decoder_layers=hf["decoder_layers"], d_ff=hf["encoder_ffn_dim"],
        dropout=hf.get("dropout", 0.1), attention_dropout=hf.get("attention_dropout", 0.0),
        max_positions=positions, positional_encoding="sinusoidal_halves",
        scale_embedding=bool(hf.get("scale_embedding", False)), normalize_before=False, activation=act,
        share_embeddings=shared, tie_output_embedding=bool(hf.get("tie_word_embeddings", True)) or shared,
        final_logits_bias=True, layer_norm_eps=1e-5,
        pad_id=pad, bos_id=src_vocab, eos_id=eos, decoder_start_id=start, max_src_len=limit, max_tgt_len=limit,
    )  # fmt: skip


def _grow(t: torch.Tensor, fill: float) -> torch.Tensor:
    """(V, ...) -> (V+1, ...): the appended <s> row."""
    return torch.cat([t, torch.full((1, *t.shape[1:]), fill, dtype=t.dtype)])


def map_marian_weights(
    hf_state: dict[str, torch.Tensor], config: TransformerConfig, banned: tuple[int, ...] = ()
) -> dict[str, torch.Tensor]:
    """Marian's state dict under our names, vocabulary matrices grown by the <s> row; `banned` token ids get the
    -300 logit bias."""
    state = {k.removeprefix("model."): v for k, v in hf_state.items()}
    ours: dict[str, torch.Tensor] = {}
    src_embed = state.get("shared.weight", state.get("encoder.embed_tokens.weight"))
    tgt_embed = state.get("decoder.embed_tokens.weight", src_embed) if not config.share_embeddings else src_embed
    if src_embed is None or tgt_embed is None:
        raise HFImportError("weights: no shared.weight or encoder.embed_tokens.weight")
    ours["src_embed.weight"] = _grow(src_embed, 0.0)
    if not config.share_embeddings:
        ours["tgt_embed.weight"] = _grow(tgt_embed, 0.0)
    if not config.tie_output_embedding:
        if "lm_head.weight" not in hf_state:
            raise HFImportError("weights: tie_word_embeddings is False but lm_head.weight is missing")
        ours["output.weight"] = _grow(hf_state["lm_head.weight"], 0.0)
    bias = hf_state.get("final_logits_bias", torch.zeros(1, config.tgt_vocab_size - 1))
    ours["final_logits_bias"] = _grow(bias.reshape(-1), _NEVER)  # (V+1,)
    for token_id in banned:
        # generate's bad_words_ids: a banned single token is never chosen (OPUS-MT bans <pad>).
        ours["final_logits_bias"][token_id] = _NEVER
    for side, n, table in (("encoder", config.n_encoder_layers, _ENCODER_LAYER),
                           ("decoder", config.n_decoder_layers, _DECODER_LAYER)):  # fmt: skip
        for i in range(n):
            for theirs, mine in table.items():
                for kind in ("weight", "bias"):
                    key = f"{side}.layers.{i}.{theirs}.{kind}"
                    if key not in state:
                        raise HFImportError(f"weights: {key} is missing")
                    ours[f"{side}_layers.{i}.{mine}.{kind}"] = state[key]
    return ours


def banned_tokens(hf_dir: Path, hf: dict[str, Any]) -> tuple[int, ...]:
    """Single-token bad_words_ids of generation_config.json (or config.json): tokens `generate` never produces."""
    generation = hf_dir / "generation_config.json"
    source = _read_json(generation) if generation.is_file() else hf
    if not isinstance(source, dict):
        raise HFImportError(f"{generation}: expected a JSON object")
    bad = source.get("bad_words_ids") or hf.get("bad_words_ids") or []
    if not isinstance(bad, list) or not all(isinstance(w, list) and w for w in bad):
        raise HFImportError(f"{hf_dir}: bad_words_ids is not a list of token id lists")
    longer = [w for w in bad if len(w) != 1]
    if longer:
        logger.warning("%s: bad_words_ids of several tokens %s are not applied", hf_dir, longer[:3])
    return tuple(sorted({w[0] for w in bad if len(w) == 1}))


# --- import -------------------------------------------------------------------------------------------------------


def load_hf_marian(hf_dir: str | Path, max_len: int = 256) -> ImportedMarian:
    """A MarianMT directory as our TransformerTranslator (eval mode), its two tokenizers and what was learned."""
    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise HFImportError(f"{hf_dir} is not a directory")
    hf = read_config_object(hf_dir / "config.json", MARIAN_REQUIRED_KEYS)
    try:
        config = marian_config(hf, max_len)
        model = TransformerTranslator(config)
    except (TypeError, ValueError) as e:  # TransformerConfigError names the numbers
        raise HFImportError(f"{hf_dir / 'config.json'}: {e}") from None
    state = map_marian_weights(read_hf_weights(hf_dir), config, banned_tokens(hf_dir, hf))
    missing, unexpected = load_weights(model, state, f"{hf_dir}: the weights do not fit config.json", HFImportError)
    tied = {"output.weight"} if config.tie_output_embedding else set()
    if config.share_embeddings:
        tied.add("tgt_embed.weight")
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise HFImportError(f"{hf_dir}: weights missing for {missing[:5]}, weights without a place {unexpected[:5]}")
    model.eval()

    tok_config = _read_json(hf_dir / "tokenizer_config.json") if (hf_dir / "tokenizer_config.json").is_file() else {}
    vocab = _read_json(hf_dir / "vocab.json")
    separate = bool(tok_config.get("separate_vocabs", False)) if isinstance(tok_config, dict) else False
    target_vocab = _read_json(hf_dir / "target_vocab.json") if separate else vocab
    for name, v in (("vocab.json", vocab), ("target_vocab.json", target_vocab)):
        if not isinstance(v, dict) or not all(isinstance(i, int) for i in v.values()):
            raise HFImportError(f"{hf_dir / name}: expected an object of token -> id")
    for name, v, size in (("vocab.json", vocab, config.src_vocab_size), ("target vocab", target_vocab,
                                                                          config.tgt_vocab_size)):  # fmt: skip
        if len(v) != size - 1:
            raise HFImportError(f"{hf_dir}: {name} has {len(v)} tokens, the model {size - 1}")
        if "<unk>" not in v or "</s>" not in v:
            raise HFImportError(f"{hf_dir}: {name} lacks <unk> or </s>")
    tokenizers = {
        "source": spm_tokenizer(hf_dir / "source.spm", vocab, "source"),
        "target": spm_tokenizer(hf_dir / "target.spm", target_vocab, "target"),
    }
    info = {
        "imported_from": str(hf_dir.resolve()),
        "hf_name_or_path": hf.get("_name_or_path", ""),
        "marian_vocab_size": config.tgt_vocab_size - 1,
        "added_tokens": {BOS_TOKEN: config.bos_id},
    }
    return ImportedMarian(model, tokenizers, info)


def import_hf_marian(hf_dir: str | Path, output_dir: str | Path, force: bool = False) -> Path:
    """Write the seqserve checkpoint of a MarianMT directory; returns the checkpoint folder."""
    output = Path(output_dir)
    check_output(output, force)
    imported = load_hf_marian(hf_dir)
    path = save_checkpoint(output, imported.model, imported.tokenizers, {"imported": imported.info})
    logger.info("imported MarianMT %s -> %s", hf_dir, path)
    return path
