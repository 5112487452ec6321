"""A BERT from the model repository: sentence vectors (cls/mean pooling), next-sentence probability, fill-mask.

Letters: B batch, L sequence length, H hidden, V vocabulary, M masks in one text.
One padded run of model.onnx serves a batch mixing the three kinds of job; only the outputs some job needs are
fetched (mlm_logits is B x L x V, so it is asked for only when a fill-mask job is in the batch). When the export split
the masked-LM head into mlm.onnx (manifest `graphs.mlm`), model.onnx has no mlm_logits and encode/NSP runs do not pay
for the head; fill-mask jobs then run mlm.onnx on the sequence_output rows of those jobs only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from seqserve.server.repository import LoadedModel
from seqserve.server.text import Encoded, pad_batch

log = logging.getLogger(__name__)


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    z = x - x.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


def pool(sequence_output: np.ndarray, attention_mask: np.ndarray, pooling: str) -> np.ndarray:
    """(B, L, H) token vectors -> (B, H): the [CLS] vector, or the mean over real tokens."""
    if pooling == "cls":
        return sequence_output[:, 0, :]  # (B, H)
    weights = attention_mask[..., None].astype(sequence_output.dtype)  # (B, L, 1)
    summed = (sequence_output * weights).sum(axis=1)  # (B, H)
    return summed / np.maximum(weights.sum(axis=1), 1.0)  # (B, H)


@dataclass
class BertJob:
    """One input text (or pair) and what to compute for it."""

    kind: str  # "encode" | "nsp" | "fill_mask"
    encoded: Encoded
    pooling: str = "mean"
    normalize: bool = False
    top_k: int = 5
    result: Any = None


class BertModel:
    """model.onnx with its outputs; `run_batch` runs in a worker thread."""

    def __init__(self, loaded: LoadedModel):
        manifest = loaded.manifest
        self.session = loaded.sessions["model"]
        self.mlm_session = loaded.sessions.get("mlm")  # split masked-LM head: sequence_output -> mlm_logits
        self.outputs = tuple(manifest.outputs) or tuple(o.name for o in self.session.get_outputs())
        self.pooling = manifest.pooling or "cls"
        # Models trained with normalised embeddings (all-MiniLM-L6-v2) are always normalised, as their pipeline does.
        self.normalize = bool(manifest.raw.get("normalize_embeddings", False))
        tokenizer = loaded.tokenizers.get("text") or next(iter(loaded.tokenizers.values()))
        special = manifest.special_tokens

        def token_id(name: str, token: str) -> int | None:
            if name in special:
                return int(special[name])
            return tokenizer.token_to_id(token)

        pad = token_id("pad", "[PAD]")
        self.pad_id = 0 if pad is None else pad
        self.mask_id = token_id("mask", "[MASK]")
        self.mask_token = tokenizer.id_to_token(self.mask_id) if self.mask_id is not None else None

    def capabilities(self) -> list[str]:
        caps = ["encode"] if "sequence_output" in self.outputs else []
        if "nsp_logits" in self.outputs:
            caps.append("nsp")
        if "mlm_logits" in self.outputs and self.mask_id is not None:
            caps.append("fill_mask")
        return caps

    def run_batch(self, jobs: Sequence[BertJob]) -> None:
        """Run one padded batch and fill each job's result."""
        input_ids, pad_mask = pad_batch([j.encoded.ids for j in jobs], self.pad_id)  # (B, L)
        type_ids, _ = pad_batch([j.encoded.type_ids for j in jobs], 0)  # (B, L)
        attention_mask = (~pad_mask).astype(np.int64)  # (B, L), 1 at real tokens (Hugging Face convention)
        kinds = {j.kind for j in jobs}
        wanted = []
        if "encode" in kinds:
            wanted.append("sequence_output")
        if "nsp" in kinds:
            wanted.append("nsp_logits")
        if "fill_mask" in kinds:
            wanted.append("sequence_output" if self.mlm_session is not None else "mlm_logits")
        feeds = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": type_ids}
        wanted = list(dict.fromkeys(wanted))
        out = dict(zip(wanted, self.session.run(wanted, feeds)))
        mlm_rows: dict[int, int] = {}  # batch row -> row of out["mlm_logits"]
        if "fill_mask" in kinds:
            if self.mlm_session is None:
                mlm_rows = {b: b for b in range(len(jobs))}
            else:
                rows = [b for b, j in enumerate(jobs) if j.kind == "fill_mask"]
                mlm_rows = {b: i for i, b in enumerate(rows)}
                hidden = np.ascontiguousarray(out["sequence_output"][rows])  # (F, L, H), F fill-mask jobs
                out["mlm_logits"] = self.mlm_session.run(["mlm_logits"], {"sequence_output": hidden})[0]  # (F, L, V)
        vectors = {}
        if "encode" in kinds:
            for pooling in {j.pooling for j in jobs if j.kind == "encode"}:
                vectors[pooling] = pool(out["sequence_output"], attention_mask, pooling)  # (B, H)
        nsp = softmax(out["nsp_logits"].astype(np.float64))[:, 0] if "nsp" in kinds else None  # (B,), 0 = is next
        for b, job in enumerate(jobs):
            if job.kind == "encode":
                vec = vectors[job.pooling][b].astype(np.float32)
                if job.normalize or self.normalize:
                    vec = vec / max(float(np.linalg.norm(vec)), 1e-12)
                job.result = vec
            elif job.kind == "nsp":
                job.result = float(nsp[b])
            else:
                job.result = self._fill_mask(out["mlm_logits"][mlm_rows[b]], job)

    def _fill_mask(self, logits: np.ndarray, job: BertJob) -> list[list[tuple[int, float]]]:
        """(L, V) logits of one text -> per mask, left to right, the top-k (token id, probability)."""
        positions = [i for i, t in enumerate(job.encoded.ids) if t == self.mask_id]
        found = []
        for pos in positions:
            probs = softmax(logits[pos].astype(np.float64))  # (V,)
            k = min(job.top_k, probs.size)
            top = np.argpartition(-probs, k - 1)[:k]
            top = top[np.lexsort((top, -probs[top]))]
            found.append([(int(t), float(probs[t])) for t in top])
        return found
