"""One loaded model version ready to serve: its tokenizers, its batcher, and the task methods the servicers call.

Defined behaviour at the edges (docs/serving.md): an empty list gives an empty result; translating "" gives one empty
hypothesis (score 0) without running the model; encoding "" encodes `[CLS] [SEP]`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from seqserve.server.batcher import BatchContext, Batcher, WorkItem
from seqserve.server.bert import BertJob, BertModel
from seqserve.server.config import BatchingConfig, Limits
from seqserve.server.decoding import Hypothesis
from seqserve.server.errors import AnswerTooLarge, InvalidRequest, OptionOutOfRange, WrongTask
from seqserve.server.metrics import Metrics
from seqserve.server.repository import LoadedModel
from seqserve.server.text import Encoded, TextCodec, check_chars, check_count, token_limit
from seqserve.server.translation import DEFAULT_MAX_TOKENS, DecodeOptions, TranslationJob, Translator

log = logging.getLogger(__name__)

INLINE_TOKENIZE_CHARS = 4096
# The least a fill-mask candidate takes in the answer: a one-character token (3 bytes), an id under 128 (2), a
# non-zero probability (5) and its framing (2); tests/test_server_limits.py checks real answers against it.
FILL_MASK_ENTRY_BYTES = 12


@dataclass(frozen=True)
class TextHypothesis:
    text: str
    score: float
    tokens: list[str]
    token_scores: list[float]


@dataclass(frozen=True)
class TranslationResult:
    source_tokens: int
    hypotheses: list[TextHypothesis]


class ServedModel:
    """A ready model version; every method raises typed errors (errors.py) for bad input."""

    def __init__(
        self,
        loaded: LoadedModel,
        executor: Executor,
        batching: BatchingConfig,
        limits: Limits,
        metrics: Metrics,
        workers: int = 1,
    ):
        manifest = loaded.manifest
        self.loaded = loaded
        self.manifest = manifest
        self.name, self.version = manifest.name, manifest.version
        self.limits = limits
        self.batching = batching
        self.metrics = metrics
        cap = limits.max_tokens_per_text
        if manifest.task == "translation":
            self.translator: Translator | None = Translator.for_model(loaded, cap)
            self.codec = self.translator.codec
            self.max_input_tokens = self.codec.limit
            self.bert: BertModel | None = None
            self.capabilities = ["translate"]
            run = self._run_translation
        else:
            keys = ("max_tokens", "max_input_tokens", "max_seq_len", "max_position_embeddings")
            config = manifest.config.get("config", {}) if isinstance(manifest.config, dict) else {}
            model_limit = token_limit(manifest.limits, keys, token_limit(config, keys, DEFAULT_MAX_TOKENS))
            self.max_input_tokens = min(model_limit, cap) if cap else model_limit
            tokenizer = loaded.tokenizers.get("text") or next(iter(loaded.tokenizers.values()))
            self.codec = TextCodec(tokenizer, self.max_input_tokens)
            self.translator = None
            self.bert = BertModel(loaded)
            self.capabilities = self.bert.capabilities()
            run = self._run_bert
        joinable = self.translator is not None and self.translator.step_model.joinable
        self.batcher = Batcher(
            self.name, self.version, run, executor, batching, limits.max_queue, self._observe, joinable=joinable,
            workers=workers, inline=self.bert is not None,
        )

    # ---------------------------------------------------------------------------------------------------------
    # Batches (worker threads)

    def _run_translation(self, items: list[WorkItem], context: BatchContext) -> None:
        label = self.name
        items = list(items)  # grows as sentences join the running decode
        finished: set[int] = set()
        stop_joining = time.monotonic() + self.batching.max_join_ms / 1000.0

        def refill(rows: int, src_len: int) -> list[TranslationJob]:
            if time.monotonic() > stop_joining:
                return []
            # max_batch_size bounds the sentences decoding together, joiners included.
            new = context.pull(rows, src_len, self.batching.max_batch_size - (len(items) - len(finished)))
            items.extend(new)
            return [it.job for it in new]

        def done(i: int) -> None:
            finished.add(i)
            context.finish(items[i])

        decode_rows, decode_steps = self.metrics.decode_rows.labels(label), self.metrics.decode_steps.labels(label)

        def on_step(rows: int) -> None:
            # Counted as they happen: a response may reach its client before the batch ends.
            decode_rows.inc(rows)
            decode_steps.inc()

        self.translator.run_batch(
            [it.job for it in items],
            stopped=lambda i: items[i].stopped(),
            on_step=on_step,
            on_done=done,
            refill=refill,
        )

    def _run_bert(self, items: list[WorkItem], context: BatchContext) -> None:
        self.bert.run_batch([it.job for it in items])

    def _observe(self, batch: list[WorkItem], started: float) -> None:
        """A batch starting, or a group of sentences joining a running decode."""
        self.metrics.observe_batch(self.name, [started - it.enqueued for it in batch], [it.length for it in batch])

    # ---------------------------------------------------------------------------------------------------------
    # Tasks (event loop)

    def require(self, capability: str) -> None:
        if capability not in self.capabilities:
            raise WrongTask(self.name, capability, self.capabilities)

    async def _tokenize(
        self, texts: Sequence[str], truncate: bool, pairs: Sequence[str] | None = None
    ) -> list[Encoded]:
        check_count(len(texts), self.limits)
        check_chars(list(texts), self.limits)
        if pairs is not None:
            check_chars(list(pairs), self.limits)

        def run() -> list[Encoded]:
            return [
                self.codec.encode(t, pairs[i] if pairs is not None else None, truncate=truncate, index=i)
                for i, t in enumerate(texts)
            ]

        chars = sum(map(len, texts)) + (sum(map(len, pairs)) if pairs is not None else 0)
        # Short requests tokenize inline; long ones in a thread so the event loop keeps answering everyone else.
        if chars > INLINE_TOKENIZE_CHARS:
            encoded = await asyncio.get_running_loop().run_in_executor(None, run)
        else:
            encoded = run()
        self.metrics.tokens_in.labels(self.name).inc(sum(len(e) for e in encoded))
        return encoded

    async def translate(
        self, texts: Sequence[str], options: DecodeOptions, truncate: bool, deadline: float | None
    ) -> list[TranslationResult]:
        self.require("translate")
        options.check(self.limits.max_beam_size, self.translator.max_target_tokens)
        encoded = await self._tokenize(texts, truncate)
        jobs: dict[int, TranslationJob] = {}
        for i, (text, enc) in enumerate(zip(texts, encoded)):
            if text.strip():
                jobs[i] = self.translator.job(enc.ids, options)
        if jobs:
            beam = max(options.beam_size, 1)
            await self.batcher.submit([(job, len(job.ids), beam) for job in jobs.values()], deadline)
        results = []
        for i, enc in enumerate(encoded):
            if i not in jobs:
                results.append(TranslationResult(len(enc), [TextHypothesis("", 0.0, [], [])]))
                continue
            hyps = [self._text_hypothesis(h, options.return_token_scores) for h in jobs[i].result]
            results.append(TranslationResult(len(enc), hyps))
        return results

    def _text_hypothesis(self, h: Hypothesis, with_scores: bool) -> TextHypothesis:
        self.metrics.tokens_out.labels(self.name).inc(len(h.tokens))
        return TextHypothesis(
            text=self.codec.decode(list(h.tokens)),
            score=h.score,
            tokens=[self.codec.token(t) for t in h.tokens],
            token_scores=list(h.token_scores) if with_scores else [],
        )

    async def _bert(self, jobs: list[BertJob], deadline: float | None) -> list[BertJob]:
        if jobs:
            await self.batcher.submit([(j, len(j.encoded), 1) for j in jobs], deadline)
        return jobs

    async def encode(
        self,
        texts: Sequence[str],
        pairs: Sequence[tuple[str, str]],
        pooling: str | None,
        normalize: bool,
        truncate: bool,
        deadline: float | None,
    ) -> tuple[np.ndarray, list[int]]:
        """(N, H) float32 vectors and the token count of each input."""
        self.require("encode")
        if texts and pairs:
            raise InvalidRequest("send either texts or pairs, not both")
        pooling = pooling or self.bert.pooling
        count, hidden = len(pairs) or len(texts), self.hidden_size()
        check_count(count, self.limits)  # too many texts is the request's fault (INVALID_ARGUMENT), whatever its size
        if count * hidden * 4 > self.limits.max_message_bytes:  # the float32 vectors alone
            raise AnswerTooLarge(f"{count} texts x {hidden} dimensions", count * hidden * 4,
                                 self.limits.max_message_bytes, "send fewer texts a request")  # fmt: skip
        if pairs:
            encoded = await self._tokenize([a for a, _ in pairs], truncate, [b for _, b in pairs])
        else:
            encoded = await self._tokenize(texts, truncate)
        jobs = await self._bert([BertJob("encode", e, pooling, normalize) for e in encoded], deadline)
        vectors = np.stack([j.result for j in jobs]) if jobs else np.zeros((0, hidden), np.float32)  # (N, H)
        return vectors.astype(np.float32), [len(e) for e in encoded]

    def hidden_size(self) -> int:
        for spec in self.manifest.graphs["model"].outputs:
            if spec.name == "sequence_output" and isinstance(spec.shape[-1], int):
                return spec.shape[-1]
        config = self.manifest.config.get("config", {}) if isinstance(self.manifest.config, dict) else {}
        return int(config.get("hidden", config.get("hidden_size", 0)))

    async def next_sentence(
        self, pairs: Sequence[tuple[str, str]], truncate: bool, deadline: float | None
    ) -> list[float]:
        self.require("nsp")
        encoded = await self._tokenize([a for a, _ in pairs], truncate, [b for _, b in pairs])
        jobs = await self._bert([BertJob("nsp", e) for e in encoded], deadline)
        return [j.result for j in jobs]

    async def fill_mask(
        self, texts: Sequence[str], top_k: int, truncate: bool, deadline: float | None
    ) -> list[list[list[tuple[str, int, float]]]]:
        """Per text, per mask (left to right), the top-k (token, id, probability), most likely first."""
        self.require("fill_mask")
        top_k = top_k or 5
        if top_k > self.limits.max_top_k:
            raise OptionOutOfRange("top_k", top_k, self.limits.max_top_k)
        encoded = await self._tokenize(texts, truncate)
        for i, e in enumerate(encoded):
            if self.bert.mask_id not in e.ids:
                if e.truncated_from and self.bert.mask_token in texts[i]:
                    raise InvalidRequest(
                        f"text {i}'s {self.bert.mask_token} tokens all lie past the model's limit of {len(e)} tokens "
                        f"(the text has {e.truncated_from}), so truncation cut them off; shorten the text before them"
                    )
                raise InvalidRequest(f"text {i} has no {self.bert.mask_token} token to fill")
        # Each (text, mask, candidate) costs at least FILL_MASK_ENTRY_BYTES of the answer: refuse an answer that
        # certainly could not be sent before computing it (rpc_method refuses one that turns out too large after).
        masks = sum(e.ids.count(self.bert.mask_id) for e in encoded)
        estimate = masks * top_k * FILL_MASK_ENTRY_BYTES
        if estimate > self.limits.max_message_bytes:
            raise AnswerTooLarge(f"{masks} masks x top_k {top_k}", estimate, self.limits.max_message_bytes,
                                 "send fewer masks a request or ask a smaller top_k")  # fmt: skip
        jobs = await self._bert([BertJob("fill_mask", e, top_k=top_k) for e in encoded], deadline)
        return [[[(self.codec.token(t), t, p) for t, p in mask] for mask in j.result] for j in jobs]
