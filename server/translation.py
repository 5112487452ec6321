"""A translator from the model repository: the exported encoder/decoder pair as a `StepModel`, and batch translation.

Letters: B batch, S source length, R hypothesis rows, V vocabulary.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from seqserve.server.decoding import Hypothesis, Search, decode_batch, make_search, source_max_len
from seqserve.server.errors import OptionOutOfRange
from seqserve.server.repository import LoadedModel
from seqserve.server.text import TextCodec

log = logging.getLogger(__name__)


class OnnxStepModel:
    """encoder.onnx + decoder.onnx behind the `StepModel` interface; inputs are fed by the manifest's names."""

    def __init__(self, loaded: LoadedModel):
        manifest = loaded.manifest
        self.encoder = loaded.sessions["encoder"]
        self.decoder = loaded.sessions["decoder"]
        decoder = manifest.decoder or {}
        self.memory_names: list[str] = list(decoder.get("memory", []))
        self.state_names: list[str] = list(decoder.get("state", []))
        special = manifest.special_tokens
        self.pad_id = int(special.get("pad", 0))
        # The first decoder input: BOS, unless the model starts from another token (Marian starts from pad).
        self.bos_id = int(special.get("decoder_start", special.get("bos", 1)))
        self.eos_id = int(special.get("eos", 2))
        self._new_state = [f"new_{n}" for n in self.state_names]
        declared = set(manifest.graphs["decoder"].input_names)
        # Decoder graphs may omit src_pad_mask (a model that does not attend over the source, say): feed what exists.
        self._feeds_mask = "src_pad_mask" in declared

    def encode(self, src_ids: np.ndarray, src_pad_mask: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
        outputs = self.encoder.run(None, {"src_ids": src_ids, "src_pad_mask": src_pad_mask})
        n = len(self.memory_names)
        return list(outputs[:n]), list(outputs[n : n + len(self.state_names)])

    def step(
        self, prev_ids: np.ndarray, src_pad_mask: np.ndarray, memory: list[np.ndarray], state: list[np.ndarray]
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        feeds = {"prev_ids": prev_ids}
        if self._feeds_mask:
            feeds["src_pad_mask"] = src_pad_mask
        feeds.update(zip(self.memory_names, memory))
        feeds.update(zip(self.state_names, state))
        outputs = self.decoder.run(["log_probs", *self._new_state], feeds)
        return outputs[0], list(outputs[1:])  # (R, V), state


@dataclass(frozen=True)
class DecodeOptions:
    beam_size: int = 1
    length_penalty: float = 0.0
    n_best: int = 1
    max_output_tokens: int = 0
    max_output_ratio: float = 0.0
    return_token_scores: bool = False

    def check(self, max_beam: int, model_limit: int) -> None:
        """Reject options out of range (INVALID_ARGUMENT naming the option and the limit)."""
        if self.beam_size > max_beam:
            raise OptionOutOfRange("beam_size", self.beam_size, max_beam)
        if self.n_best > max(self.beam_size, 1):
            raise OptionOutOfRange("n_best", self.n_best, f"beam_size {max(self.beam_size, 1)}")
        if self.max_output_tokens > model_limit:
            raise OptionOutOfRange("max_output_tokens", self.max_output_tokens, model_limit)
        if not (np.isfinite(self.length_penalty) and 0 <= self.length_penalty <= 10):
            raise OptionOutOfRange("length_penalty", self.length_penalty, "0..10")
        if not (np.isfinite(self.max_output_ratio) and 0 <= self.max_output_ratio <= 100):
            raise OptionOutOfRange("max_output_ratio", self.max_output_ratio, "0..100")


@dataclass
class TranslationJob:
    """One source sentence on its way through a batch."""

    ids: list[int]
    search: Search
    n_best: int
    result: list[Hypothesis] | None = None


class Translator:
    """Tokenize, decode in batches, detokenize. `run_batch` runs in a worker thread."""

    def __init__(self, loaded: LoadedModel, codec: TextCodec, max_target_tokens: int):
        self.step_model = OnnxStepModel(loaded)
        self.codec = codec
        self.max_target_tokens = max_target_tokens

    def job(self, ids: list[int], options: DecodeOptions) -> TranslationJob:
        max_len = source_max_len(
            len(ids), options.max_output_tokens, options.max_output_ratio, self.max_target_tokens
        )
        search = make_search(options.beam_size, max_len, self.step_model.eos_id, options.length_penalty)
        return TranslationJob(ids, search, max(options.n_best, 1))

    def run_batch(
        self, jobs: Sequence[TranslationJob], stopped: Callable[[int], bool], on_step: Callable[[int], None]
    ) -> int:
        """Decode the jobs together; fills each job's result; returns the decode steps taken."""
        steps = decode_batch(self.step_model, [j.ids for j in jobs], [j.search for j in jobs], stopped, on_step)
        for job in jobs:
            job.result = job.search.results(job.n_best)
        return steps
