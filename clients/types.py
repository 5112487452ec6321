"""What the client methods take and return: small frozen dataclasses, and their conversion to and from the protos.

Letters: n number of texts, H hidden size.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable, Sequence

import grpc
import numpy as np

from seqserve.clients.errors import SeqServeError
from seqserve.protos.v1 import seqserve_pb2 as pb

POOLINGS = {"model": pb.POOLING_UNSPECIFIED, "cls": pb.POOLING_CLS, "mean": pb.POOLING_MEAN}
_STATE_NAMES = {
    pb.MODEL_STATE_UNSPECIFIED: "UNSPECIFIED",
    pb.MODEL_STATE_AVAILABLE: "AVAILABLE",
    pb.MODEL_STATE_LOADING: "LOADING",
    pb.MODEL_STATE_READY: "READY",
    pb.MODEL_STATE_UNLOADING: "UNLOADING",
    pb.MODEL_STATE_FAILED: "FAILED",
}


@dataclass(frozen=True)
class DecodingOptions:
    """Translation search settings (DecodingOptions in the proto; zeros mean the server's defaults)."""

    beam_size: int = 1  # 1: greedy
    n_best: int = 1  # hypotheses per text, at most beam_size
    length_penalty: float = 0.0  # alpha of ((5 + len) / 6) ** alpha
    max_output_tokens: int = 0  # 0: the model's limit
    max_output_ratio: float = 0.0  # > 0: at most ratio * source tokens + 5
    return_token_scores: bool = False

    def __post_init__(self) -> None:
        # The proto's fields are uint32: protobuf's own "Value out of range: -1" would not say which one.
        for name in ("beam_size", "n_best", "max_output_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or not 0 <= value < 2**32:
                raise ValueError(f"DecodingOptions.{name} must be a whole number from 0, got {value!r}")
        if not self.max_output_ratio >= 0:
            raise ValueError(f"DecodingOptions.max_output_ratio must be 0 or more, got {self.max_output_ratio!r}")

    def to_proto(self) -> pb.DecodingOptions:
        return pb.DecodingOptions(
            beam_size=self.beam_size,
            n_best=self.n_best,
            length_penalty=self.length_penalty,
            max_output_tokens=self.max_output_tokens,
            max_output_ratio=self.max_output_ratio,
            return_token_scores=self.return_token_scores,
        )


@dataclass(frozen=True)
class ModelRef:
    """The model version that served a call."""

    name: str
    version: int


@dataclass(frozen=True)
class Hypothesis:
    text: str
    score: float  # length-penalised sum of log-probabilities
    tokens: tuple[str, ...] = ()
    token_scores: tuple[float, ...] = ()  # per token and EOS, when asked for


@dataclass(frozen=True)
class Translation:
    """The hypotheses for one source text, best first."""

    hypotheses: tuple[Hypothesis, ...]
    source_tokens: int
    model: ModelRef | None = None

    @property
    def text(self) -> str:
        """The best translation ('' when the server returned none)."""
        return self.hypotheses[0].text if self.hypotheses else ""


@dataclass(frozen=True)
class StreamResult:
    """One TranslateStream answer: either a translation or the error for that item (the stream goes on)."""

    id: str
    translation: Translation | None
    error: SeqServeError | None = None


@dataclass(frozen=True)
class TokenCandidate:
    token: str
    token_id: int
    probability: float


@dataclass(frozen=True)
class ModelInfo:
    """One model version as the Models service lists it."""

    name: str
    version: int
    state: str  # AVAILABLE | LOADING | READY | UNLOADING | FAILED
    reason: str = ""
    task: str = ""
    architecture: str = ""
    capabilities: tuple[str, ...] = ()
    metrics: dict[str, float] = field(default_factory=dict)
    quantization: str = ""
    max_input_tokens: int = 0


# --------------------------------------------------------------------------------------------------------------
# Responses: proto -> dataclass


def model_spec(name: str, version: int) -> pb.ModelSpec:
    if not isinstance(version, int) or not 0 <= version < 2**32:
        raise ValueError(f"version must be 0 (the highest ready) or a version number, got {version!r}")
    return pb.ModelSpec(name=name, version=version)


def truncation(truncate: bool) -> int:
    return pb.TRUNCATION_TRUNCATE if truncate else pb.TRUNCATION_REJECT


def model_ref(ref: pb.ModelRef) -> ModelRef:
    return ModelRef(name=ref.name, version=ref.version)


def embeddings(tensor: pb.Tensor) -> np.ndarray:
    """The float32 buffer as an (n, H) array (a writable copy, so callers may normalise in place)."""
    if tensor.dtype != "float32":
        raise SeqServeError(grpc.StatusCode.INTERNAL, f"expected float32 embeddings, got {tensor.dtype!r}")
    shape = tuple(int(d) for d in tensor.shape) or (0, 0)  # no shape: no texts were sent
    values = np.frombuffer(tensor.data, dtype="<f4")
    needed = int(np.prod(shape))
    if values.size != needed:
        message = f"embeddings buffer holds {values.size} values, shape {shape} needs {needed}"
        raise SeqServeError(grpc.StatusCode.INTERNAL, message)
    return values.reshape(shape).astype(np.float32, copy=True)  # (n, H)


def translation(message: pb.Translation, ref: ModelRef | None) -> Translation:
    return Translation(
        hypotheses=tuple(
            Hypothesis(
                text=h.text, score=h.score, tokens=tuple(h.tokens), token_scores=tuple(h.token_scores)
            )
            for h in message.hypotheses
        ),
        source_tokens=message.source_tokens,
        model=ref,
    )


def stream_result(message: pb.TranslateStreamResponse) -> StreamResult:
    if message.error_code:
        return StreamResult(message.id, None, SeqServeError.from_code_number(message.error_code, message.error_message))
    ref = model_ref(message.model) if message.HasField("model") else None
    return StreamResult(message.id, translation(message.translation, ref))


def fill_mask_result(result: pb.FillMaskResult) -> list[list[TokenCandidate]]:
    return [
        [TokenCandidate(token=c.token, token_id=c.token_id, probability=c.probability) for c in mask.candidates]
        for mask in result.masks
    ]


def model_info(status: pb.ModelStatus) -> ModelInfo:
    return ModelInfo(
        name=status.name,
        version=status.version,
        state=_STATE_NAMES.get(status.state, str(status.state)),
        reason=status.reason,
        task=status.task,
        architecture=status.architecture,
        capabilities=tuple(status.capabilities),
        metrics=dict(status.metrics),
        quantization=status.quantization,
        max_input_tokens=status.max_input_tokens,
    )



# --------------------------------------------------------------------------------------------------------------
# Requests (built once here for the sync and asyncio clients)


def refuse_single_text(value: object, name: str, what: str) -> None:
    """A bare str or bytes where a sequence is expected would be taken one character at a time: refuse it."""
    if isinstance(value, (str, bytes, bytearray)):
        raise TypeError(f"{name} must be a sequence of {what}, not a single {type(value).__name__}")


def texts_list(texts: Sequence[str], name: str = "texts") -> list[str]:
    """The texts as a list, refusing a bare str or bytes (which would be sent one character per text)."""
    refuse_single_text(texts, name, "str (for one text, pass [text])")
    listed = list(texts)
    for index, text in enumerate(listed):
        if not isinstance(text, str):
            raise TypeError(f"{name}[{index}] must be a str, got {type(text).__name__}")
    return listed


def _pairs(pairs: Sequence[tuple[str, str]]) -> list[pb.TextPair]:
    refuse_single_text(pairs, "pairs", "(first, second) pairs of str")
    listed = list(pairs)
    for index, pair in enumerate(listed):
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(isinstance(p, str) for p in pair)):
            raise TypeError(f"pairs[{index}] must be a (first, second) pair of str, got {pair!r:.80}")
    return [pb.TextPair(first=first, second=second) for first, second in listed]


def encode_request(
    model: str, texts: Sequence[str], pairs: Sequence[tuple[str, str]], version: int, pooling: str, normalize: bool,
    truncate: bool,
) -> pb.EncodeRequest:
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {sorted(POOLINGS)}, got {pooling!r}")
    return pb.EncodeRequest(
        model=model_spec(model, version), texts=texts_list(texts), pairs=_pairs(pairs), pooling=POOLINGS[pooling],
        normalize=normalize, truncation=truncation(truncate),
    )


def translate_request(
    model: str, texts: Sequence[str], options: DecodingOptions, version: int, truncate: bool
) -> pb.TranslateRequest:
    return pb.TranslateRequest(
        model=model_spec(model, version), texts=texts_list(texts), options=options.to_proto(),
        truncation=truncation(truncate),
    )


def stream_item(item: object) -> tuple[str, str]:
    """A translate_stream item checked before it is sent: an (id, text) pair of strings."""
    if not (isinstance(item, (tuple, list)) and len(item) == 2 and all(isinstance(part, str) for part in item)):
        shown = repr(item)
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        raise TypeError(f"translate_stream items must be (id, text) pairs of str, got {shown}")
    return item[0], item[1]


class InFlightIds:
    """The ids of a stream's items sent and not yet answered: an id sent again while it is in flight is refused,
    since its two answers could not be told apart (an id may be reused once answered)."""

    def __init__(self) -> None:
        self._ids: set[str] = set()
        self._lock = threading.Lock()  # the sync client sends from grpc's request thread, answers on the caller's

    def sent(self, item_id: str) -> None:
        with self._lock:
            if item_id in self._ids:
                raise ValueError(f"translate_stream item id {item_id!r} is already in flight: ids must differ among "
                                 "the items not yet answered, or their answers cannot be told apart")  # fmt: skip
            self._ids.add(item_id)

    def answered(self, item_id: str) -> None:
        with self._lock:
            self._ids.discard(item_id)


def stream_request_factory(
    model: str, options: DecodingOptions, version: int, truncate: bool
) -> Callable[[str, str], pb.TranslateStreamRequest]:
    """A function (id, text) -> TranslateStreamRequest with the shared fields built once."""
    spec, decoding, trunc = model_spec(model, version), options.to_proto(), truncation(truncate)

    def build(item_id: str, text: str) -> pb.TranslateStreamRequest:
        return pb.TranslateStreamRequest(id=item_id, model=spec, text=text, options=decoding, truncation=trunc)

    return build


def nsp_request(
    model: str, pairs: Sequence[tuple[str, str]], version: int, truncate: bool
) -> pb.ScoreNextSentenceRequest:
    return pb.ScoreNextSentenceRequest(
        model=model_spec(model, version), pairs=_pairs(pairs), truncation=truncation(truncate)
    )


def fill_mask_request(model: str, texts: Sequence[str], top_k: int, version: int, truncate: bool) -> pb.FillMaskRequest:
    if not isinstance(top_k, int) or not 0 <= top_k < 2**32:
        raise ValueError(f"top_k must be a whole number from 0 (0: the server's default), got {top_k!r}")
    return pb.FillMaskRequest(
        model=model_spec(model, version), texts=texts_list(texts), top_k=top_k, truncation=truncation(truncate)
    )
