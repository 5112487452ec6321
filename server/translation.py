"""A translator from the model repository: the exported encoder/decoder pair as a `StepModel`, and batch translation.

Letters: B batch, S source length, R hypothesis rows, V vocabulary.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import onnxruntime as ort

from seqserve.server.decoding import (
    GreedySearch, Hypothesis, Search, Tensor, decode_batch, make_search, source_max_len,
)
from seqserve.server.errors import OptionOutOfRange
from seqserve.server.repository import (
    DECODER_CACHE_PAD_MASK, DECODER_TOP_K_INPUT, DECODER_TOP_K_OUTPUTS, GATHER_GRAPHS, GATHER_ROWS_INPUT,
    GATHERED_PREFIX, LoadedModel,
)
from seqserve.server.text import TextCodec, token_limit

log = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 512  # a model whose manifest names no token limit
# On the host, a gather of state or memory tensors this large (all of a group's together) runs as the exported gather
# graph: onnxruntime's arena and intra-op threads beat numpy's take there, whose fresh multi-MB outputs page-fault
# (MarianMT small, batch 32 x beam 4, 2 threads: 1.09-1.13x the whole decode); smaller ones stay in numpy, where a
# graph run's overhead saves nothing (batch 1 x beam 4: 0.90x, batch 8: 1.04x). benchmarks/levers.py `state`,
# docs/benchmarks.md seventh round.
HOST_GATHER_GRAPH_BYTES = 4 << 20


class OnnxStepModel:
    """encoder.onnx + decoder.onnx behind the `StepModel` interface; inputs are fed by the manifest's names.

    Where the state lives between steps: on the host as numpy arrays (the CPU path: onnxruntime reads them in place),
    or, with `device_state`, as onnxruntime OrtValues where the sessions run (a GPU), bound to each run with IO
    binding and reordered by the exported row gather graphs (export/graphs.add_row_gather), so a step moves only its
    token ids, masks and K best candidates across the bus. `device_state=None` turns it on for a decoder that runs
    on CUDA in a repository with the gather graphs; True asks for it wherever the sessions run (on the CPU too: the
    same code path, tested there)."""

    def __init__(self, loaded: LoadedModel, device_state: bool | None = None):
        manifest = loaded.manifest
        self.encoder = loaded.sessions["encoder"]
        self.decoder = loaded.sessions["decoder"]
        self.gathers = {group: loaded.sessions[name] for group, name in GATHER_GRAPHS.items()
                        if name in loaded.sessions}  # fmt: skip
        on_cuda = self.decoder.get_providers()[0] == "CUDAExecutionProvider"
        complete = len(self.gathers) == len(GATHER_GRAPHS)
        if device_state and not complete:
            raise ValueError(
                f"{manifest.name} version {manifest.version}: keeping the decoder state on the device needs the row "
                f"gather graphs {sorted(GATHER_GRAPHS.values())}, which this export predates; export it again"
            )
        self.device_state = (on_cuda and complete) if device_state is None else device_state
        self.device = "cuda" if on_cuda else "cpu"
        # The GPU the sessions run on (SessionOptions.device_id): OrtValues and bound outputs are allocated there.
        cuda_options = self.decoder.get_provider_options().get("CUDAExecutionProvider", {}) if on_cuda else {}
        self.device_id = int(cuda_options.get("device_id", 0))
        self.host_gather_graph_bytes = HOST_GATHER_GRAPH_BYTES
        # RNN exports since the greedy loop also carry greedy.onnx: a whole greedy decode in one run.
        self.loop = loaded.sessions.get("greedy")
        decoder = manifest.decoder or {}
        self.memory_names: list[str] = list(decoder.get("memory", []))
        self.state_names: list[str] = list(decoder.get("state", []))
        special = manifest.special_tokens
        self.pad_id = int(special.get("pad", 0))
        # The first decoder input: BOS, unless the model starts from another token (Marian starts from pad).
        self.bos_id = int(special.get("decoder_start", special.get("bos", 1)))
        self.eos_id = int(special.get("eos", 2))
        self._new_state = [f"new_{n}" for n in self.state_names]
        inputs = {spec.name: spec.shape for spec in manifest.graphs["decoder"].inputs}
        outputs = {spec.name: spec.shape for spec in manifest.graphs["decoder"].outputs}
        # Graphs exported with TopK (export/graphs.add_top_k) rank each row's best tokens themselves.
        self._feeds_k = DECODER_TOP_K_INPUT in inputs
        self.top_k = self._feeds_k and all(name in outputs for name in DECODER_TOP_K_OUTPUTS)
        vocab = outputs.get("log_probs", ())[-1:]
        self.vocab_size = vocab[0] if vocab and isinstance(vocab[0], int) else 0
        # Decoder graphs may omit src_pad_mask (a model that does not attend over the source, say): feed what exists.
        self._feeds_mask = "src_pad_mask" in inputs
        # Where each memory tensor keeps the source positions, so a joining sentence's memory can be padded.
        self.memory_src_axes = [_axis(inputs.get(name, ()), "src_len") for name in self.memory_names]
        # A Transformer's caches grow by one position a step (axis cache_len). With a cache_pad_mask input the rows
        # need not be at the same step: a joining sentence's caches are padded in front and masked.
        self.masks_cache = DECODER_CACHE_PAD_MASK in inputs
        self.state_cache_axes = [_axis(inputs.get(name, ()), "cache_len") for name in self.state_names]
        # Any other symbolic state axis (or a cache without the mask, as in older exports) keeps every row at the same
        # step: sentences can then join only a fresh batch.
        self.joinable = (
            self._feeds_mask
            and all(a >= 0 for a in self.memory_src_axes)
            and all(
                isinstance(dim, int) or dim == "batch" or (dim == "cache_len" and self.masks_cache)
                for name in self.state_names
                for dim in inputs.get(name, ("unknown",))
            )
        )

    @property
    def has_loop(self) -> bool:
        return self.loop is not None and not self.device_state

    def greedy(self, src_ids: np.ndarray, src_pad_mask: np.ndarray, max_steps: int) -> tuple[np.ndarray, np.ndarray]:
        """A whole greedy decode in one run of greedy.onnx (export/graphs.add_greedy_loop): each row's tokens (B, T),
        padding after its EOS, and their log-probabilities (B, T). Only for models that have the graph (`has_loop`)."""
        memory, state = self.encode(src_ids, src_pad_mask)
        feeds = {"prev_ids": np.full((src_ids.shape[0],), self.bos_id, dtype=np.int64),
                 "max_steps": np.array(max_steps, dtype=np.int64)}  # fmt: skip
        if self._feeds_mask:
            feeds["src_pad_mask"] = src_pad_mask
        feeds.update(zip(self.memory_names, memory))
        feeds.update(zip(self.state_names, state))
        ids, log_probs = self.loop.run(None, feeds)
        return ids, log_probs

    def encode(self, src_ids: np.ndarray, src_pad_mask: np.ndarray) -> tuple[list[Tensor], list[Tensor]]:
        feeds = {"src_ids": src_ids, "src_pad_mask": src_pad_mask}
        outputs = self._run(self.encoder, feeds, [], [*self.memory_names, *self.state_names])
        n = len(self.memory_names)
        return list(outputs[:n]), list(outputs[n : n + len(self.state_names)])

    # Tensors of the state and memory: numpy arrays, or OrtValues on the sessions' device (device_state).

    def gather_rows(self, group: str, tensors: list[Tensor], rows: np.ndarray) -> list[Tensor]:
        """tensor[rows] for each state or memory (`group`) tensor, where the tensors are: the gather graph on the
        device; on the host, numpy's take (a little faster than fancy indexing: benchmarks/levers.py `gather`), or
        the gather graph for tensors of HOST_GATHER_GRAPH_BYTES and more."""
        if not self.device_state and (
            group not in self.gathers or sum(x.nbytes for x in tensors) < self.host_gather_graph_bytes
        ):
            return [np.take(x, rows, axis=0) for x in tensors]
        names = self.state_names if group == "state" else self.memory_names
        return self._run(self.gathers[group], {GATHER_ROWS_INPUT: rows, **dict(zip(names, tensors))}, [],
                         [GATHERED_PREFIX + n for n in names])  # fmt: skip

    def to_host(self, tensors: list[Tensor]) -> list[np.ndarray]:
        """numpy copies of device tensors, for the rare reshaping a running batch needs (a sentence joins, padding
        or masked cache positions are trimmed); numpy arrays pass as they are."""
        return [x.numpy() if isinstance(x, ort.OrtValue) else x for x in tensors]

    def to_device(self, tensors: list[np.ndarray]) -> list[Tensor]:
        """The reverse of to_host: with device_state, OrtValues on the sessions' device."""
        if not self.device_state:
            return tensors
        return [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(x), self.device, self.device_id) for x in tensors]

    @staticmethod
    def shape(x: Tensor) -> tuple[int, ...]:
        return tuple(x.shape()) if isinstance(x, ort.OrtValue) else x.shape

    def _run(
        self, session: ort.InferenceSession, feeds: dict[str, np.ndarray | Tensor], host_outputs: list[str],
        kept_outputs: list[str],
    ) -> list[np.ndarray | Tensor]:  # fmt: skip
        """One run: `host_outputs` come back as numpy arrays, `kept_outputs` (state, memory) where this model keeps
        its tensors; in that order. With device_state, through IO binding: OrtValue feeds stay where they are (numpy
        ones are copied in) and the kept outputs stay on the device."""
        if not self.device_state:
            return session.run([*host_outputs, *kept_outputs], feeds)
        binding = session.io_binding()
        for name, value in feeds.items():
            if isinstance(value, ort.OrtValue):
                binding.bind_ortvalue_input(name, value)
            else:
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
        for name in host_outputs:
            binding.bind_output(name, "cpu")
        for name in kept_outputs:
            binding.bind_output(name, self.device, self.device_id)
        session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        return [x.numpy() for x in outputs[: len(host_outputs)]] + list(outputs[len(host_outputs) :])

    def _feeds(
        self, prev_ids: np.ndarray, src_pad_mask: np.ndarray, memory: list[Tensor], state: list[Tensor],
        k: int = 1, cache_mask: np.ndarray | None = None,
    ) -> dict[str, np.ndarray | Tensor]:  # fmt: skip
        feeds = {"prev_ids": prev_ids}
        if self._feeds_mask:
            feeds["src_pad_mask"] = src_pad_mask
        if self.masks_cache:  # RunningBatch keeps it for such models
            feeds[DECODER_CACHE_PAD_MASK] = cache_mask
        feeds.update(zip(self.memory_names, memory))
        feeds.update(zip(self.state_names, state))
        if self._feeds_k:
            feeds[DECODER_TOP_K_INPUT] = np.array([k], dtype=np.int64)
        return feeds

    def step(
        self, prev_ids: np.ndarray, src_pad_mask: np.ndarray, memory: list[Tensor], state: list[Tensor],
        cache_mask: np.ndarray | None = None,
    ) -> tuple[np.ndarray, list[Tensor]]:  # fmt: skip
        feeds = self._feeds(prev_ids, src_pad_mask, memory, state, cache_mask=cache_mask)
        outputs = self._run(self.decoder, feeds, ["log_probs"], self._new_state)
        return outputs[0], list(outputs[1:])  # (R, V), state

    def step_top_k(
        self, prev_ids: np.ndarray, src_pad_mask: np.ndarray, memory: list[Tensor], state: list[Tensor],
        k: int, cache_mask: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray, list[Tensor]]:  # fmt: skip
        feeds = self._feeds(prev_ids, src_pad_mask, memory, state, k, cache_mask)
        values, ids, *new_state = self._run(self.decoder, feeds, list(DECODER_TOP_K_OUTPUTS), self._new_state)
        return values, ids, new_state  # (R, k), (R, k), state


def _axis(shape: Sequence, name: str) -> int:
    return list(shape).index(name) if name in shape else -1


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

    def __init__(
        self, loaded: LoadedModel, codec: TextCodec, max_target_tokens: int, device_state: bool | None = None,
    ):  # fmt: skip
        self.step_model = OnnxStepModel(loaded, device_state)
        self.codec = codec
        self.max_target_tokens = max_target_tokens

    @classmethod
    def for_model(
        cls, loaded: LoadedModel, max_source_tokens: int | None = None, device_state: bool | None = None,
    ) -> "Translator":  # fmt: skip
        """A translator with the limits of the model's manifest (`max_source_tokens`/`max_target_tokens`, else
        `max_tokens`, else DEFAULT_MAX_TOKENS); a positive `max_source_tokens` caps the source further.
        `device_state`: OnnxStepModel's."""
        limits = loaded.manifest.limits
        source, target = (
            token_limit(limits, (key, "max_tokens"), DEFAULT_MAX_TOKENS)
            for key in ("max_source_tokens", "max_target_tokens")
        )  # fmt: skip
        source = min(source, max_source_tokens) if max_source_tokens else source
        codec = TextCodec(loaded.tokenizers["source"], source, loaded.tokenizers["target"])
        return cls(loaded, codec, target, device_state)

    def job(self, ids: list[int], options: DecodeOptions) -> TranslationJob:
        max_len = source_max_len(
            len(ids), options.max_output_tokens, options.max_output_ratio, self.max_target_tokens
        )
        search = make_search(options.beam_size, max_len, self.step_model.eos_id, options.length_penalty)
        return TranslationJob(ids, search, max(options.n_best, 1))

    def run_batch(
        self,
        jobs: Sequence[TranslationJob],
        stopped: Callable[[int], bool],
        on_step: Callable[[int], None],
        on_done: Callable[[int], None],
        refill: Callable[[int, int], list[TranslationJob]] | None = None,
    ) -> int:
        """Decode the jobs together (plus those `refill` adds, when the model lets sentences join); each job's result
        is filled before `on_done(i)` is told. Returns the decode steps taken."""
        jobs = list(jobs)

        def done(i: int) -> None:
            jobs[i].result = jobs[i].search.results(jobs[i].n_best)
            on_done(i)

        def more(rows: int, src_len: int) -> list[tuple[list[int], Search]]:
            new = refill(rows, src_len) if refill else []
            jobs.extend(new)
            return [(job.ids, job.search) for job in new]

        if self.step_model.has_loop and len(jobs) == 1 and isinstance(jobs[0].search, GreedySearch):
            more(1, len(jobs[0].ids))  # whoever is waiting joins now, or waits for this sentence
            if len(jobs) == 1:
                return self._loop(jobs[0], stopped, on_step, done)
        joining = refill if self.step_model.joinable else None
        return decode_batch(
            self.step_model, [j.ids for j in jobs], [j.search for j in jobs], stopped, on_step, done,
            more if joining else None,
        )  # fmt: skip

    def _loop(
        self, job: TranslationJob, stopped: Callable[[int], bool], on_step: Callable[[int], None],
        done: Callable[[int], None],
    ) -> int:  # fmt: skip
        """One greedy sentence through greedy.onnx: the search takes the loop's tokens as it would take the step
        graph's (the same graph inside, tested token for token), so its hypothesis, score and stopping rules are the
        same. Nobody can join it; run_batch uses it when nobody else is waiting, for at most the sentence's max_len
        steps of a decoder cheap enough to run in a graph loop (RNNs)."""
        search = job.search
        if stopped(0):
            search.done = True
            done(0)
            return 0
        src = np.asarray([job.ids], dtype=np.int64)  # (1, S)
        ids, log_probs = self.step_model.greedy(src, np.zeros(src.shape, dtype=bool), search.max_len)
        steps = 0
        for token, log_prob in zip(ids[0].tolist(), log_probs[0].tolist()):
            on_step(1)
            steps += 1
            if not search.take(token, log_prob):
                break
        done(0)
        return steps
