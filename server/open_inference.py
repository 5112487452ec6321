"""The Open Inference Protocol (KServe v2, the protocol of Triton's clients) on seqserve's port.

The same models, batching, limits and errors as seqserve.v1, spoken as tensors: a text is a BYTES element (UTF-8).

| model | inputs | outputs | request parameters |
|---|---|---|---|
| translator | `text` BYTES [N] | `translation` BYTES, `score` FP32: [N] (n_best > 1: [N, n_best]) | beam_size, n_best, max_output_tokens, max_output_ratio, length_penalty, truncate |
| BERT, encode | `text` BYTES [N], optional `text_pair` BYTES [N] | `embedding` FP32 [N, H] | pooling ("model", "cls", "mean"), normalize, truncate |
| BERT, NSP | `text`, `text_pair` BYTES [N] | `is_next_probability` FP32 [N] | truncate |

Any input shape whose elements number N is taken ([N], [N, 1], ...; at most MAX_DIMS dimensions, N within max_texts);
outputs keep its shape. Without `outputs` in the request, a model answers every output its inputs allow. Inputs come
as `contents.bytes_contents` or as `raw_input_contents` (each element a 4-byte little-endian length, then its bytes);
answers come as `raw_output_contents`, as Triton's are. Tensor parameters (shared memory, classification) are refused.
Fill-mask stays on seqserve.v1 (its answer is not one tensor).
"""

from __future__ import annotations

import math
import re
import struct
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from typing import Iterator

import numpy as np

from seqserve.protos.inference import open_inference_pb2 as pb
from seqserve.protos.inference import open_inference_pb2_grpc as pb_grpc
from seqserve.server.config import Limits
from seqserve.server.errors import InputTooLong, InvalidRequest, OptionOutOfRange
from seqserve.server.manager import READY
from seqserve.server.served import ServedModel
from seqserve.server.servicers import ServingState, _deadline, _rpc
from seqserve.server.translation import DecodeOptions

PLATFORM = "seqserve"
TEXT, PAIR = "text", "text_pair"
TRANSLATION, SCORE, EMBEDDING, IS_NEXT = "translation", "score", "embedding", "is_next_probability"
MAX_DIMS = 8  # dimensions of an input tensor: a batch of texts needs one or two
_POOLINGS = {"model": None, "cls": "cls", "mean": "mean"}
_PARAMETERS = {
    "translate": ("beam_size", "n_best", "max_output_tokens", "max_output_ratio", "length_penalty", "truncate"),
    "bert": ("pooling", "normalize", "truncate"),
}
_DECIMAL = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")
_VERSION = re.compile(r"[1-9][0-9]{0,8}")


@dataclass(frozen=True)
class Tensor:
    """A tensor's name, datatype and shape, as ModelMetadata lists them (-1: any size)."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def metadata(self) -> pb.ModelMetadataResponse.TensorMetadata:
        return pb.ModelMetadataResponse.TensorMetadata(name=self.name, datatype=self.datatype, shape=self.shape)


def tensors(served: ServedModel) -> tuple[list[Tensor], list[Tensor]]:
    """The inputs and outputs a served model offers over this protocol."""
    if served.translator is not None:
        return [Tensor(TEXT, "BYTES", (-1,))], [Tensor(TRANSLATION, "BYTES", (-1,)), Tensor(SCORE, "FP32", (-1,))]
    inputs, outputs = [Tensor(TEXT, "BYTES", (-1,)), Tensor(PAIR, "BYTES", (-1,))], []
    if "encode" in served.capabilities:
        outputs.append(Tensor(EMBEDDING, "FP32", (-1, served.hidden_size() or -1)))
    if "nsp" in served.capabilities:
        outputs.append(Tensor(IS_NEXT, "FP32", (-1,)))
    return inputs, outputs


# ------------------------------------------------------------------------------------------------------------------
# BYTES tensors: bytes_contents, or raw buffers of 4-byte little-endian lengths each followed by that many bytes


def parse_raw_bytes(raw: bytes, count: int, name: str) -> list[bytes]:
    """The `count` elements of a raw BYTES buffer; INVALID_ARGUMENT when it does not hold exactly that many."""
    out, at = [], 0
    for i in range(count):
        if at + 4 > len(raw):
            raise InvalidRequest(
                f"input {name}: its raw contents end inside element {i}'s 4-byte length ({len(raw)} bytes for "
                f"{count} elements); each BYTES element is a 4-byte little-endian length, then that many bytes"
            )
        (size,) = struct.unpack_from("<I", raw, at)
        at += 4
        if at + size > len(raw):
            raise InvalidRequest(
                f"input {name}: element {i} says {size} bytes but only {len(raw) - at} remain in its raw contents"
            )
        out.append(raw[at : at + size])
        at += size
    if at != len(raw):
        raise InvalidRequest(
            f"input {name}: {len(raw) - at} bytes left over in its raw contents after the {count} elements its shape "
            "gives"
        )
    return out


def raw_bytes(values: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(v)) + v for v in values)


def _count(shape: list[int], name: str, limits: Limits) -> int:
    """The elements of an input's shape, refused (before its contents are read) over the request's text limit."""
    if len(shape) > MAX_DIMS:
        raise InvalidRequest(f"input {name} has {len(shape)} dimensions, at most {MAX_DIMS}: a batch of texts is [N]")
    if any(d < 0 for d in shape):
        raise InvalidRequest(f"input {name}: shape {shape} has a negative dimension")
    count = math.prod(shape)
    if count > limits.max_texts:
        raise InvalidRequest(
            f"input {name} has {count} elements (shape {shape}), over the limit of {limits.max_texts} texts per "
            "request (max_texts)"
        )
    return count


def read_inputs(
    request: pb.ModelInferRequest, known: list[Tensor], limits: Limits
) -> dict[str, tuple[list[str], list[int]]]:
    """Each text input's elements (decoded UTF-8) and shape; INVALID_ARGUMENT naming what is wrong and the limit."""
    names = [t.name for t in known]
    if request.raw_input_contents and len(request.raw_input_contents) != len(request.inputs):
        raise InvalidRequest(
            f"{len(request.raw_input_contents)} raw_input_contents for {len(request.inputs)} inputs: send one buffer "
            "per input, in the order of `inputs`, or none"
        )
    found: dict[str, tuple[list[str], list[int]]] = {}
    for i, tensor in enumerate(request.inputs):
        name = tensor.name
        if name not in names:
            raise InvalidRequest(f"unknown input {name[:80]!r}; this model takes {', '.join(names)}")
        if name in found:
            raise InvalidRequest(f"input {name} is given twice")
        if tensor.datatype != "BYTES":
            raise InvalidRequest(
                f"input {name} has datatype {tensor.datatype[:20]!r}; it is text: BYTES, one UTF-8 string an element"
            )
        if tensor.parameters:  # shared memory regions, for one: seqserve takes the data in the request
            raise InvalidRequest(
                f"input {name}: tensor parameters are not supported (got {sorted(tensor.parameters)[0][:80]!r}); "
                "send the data in the request"
            )
        count = _count(list(tensor.shape), name, limits)
        shape = list(tensor.shape)
        others = [f.name for f, _ in tensor.contents.ListFields() if f.name != "bytes_contents"]
        if others:
            raise InvalidRequest(f"input {name}: contents.{others[0]} given; a BYTES tensor has bytes_contents only")
        if request.raw_input_contents:
            if tensor.HasField("contents"):
                raise InvalidRequest(f"input {name} has contents beside raw_input_contents: use one or the other")
            elements = parse_raw_bytes(request.raw_input_contents[i], count, name)
        else:
            elements = list(tensor.contents.bytes_contents)
            if len(elements) != count:
                raise InvalidRequest(
                    f"input {name}: shape {shape} means {count} elements but bytes_contents holds {len(elements)}"
                )
        texts = []
        for j, element in enumerate(elements):
            try:
                text = element.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise InvalidRequest(f"input {name}: element {j} is not UTF-8 ({exc.reason} at byte {exc.start})")
            if len(text) > limits.max_chars_per_text:
                raise InvalidRequest(
                    f"input {name}: element {j} has {len(text)} characters, over the limit of "
                    f"{limits.max_chars_per_text} characters (max_chars_per_text)"
                )
            texts.append(text)
        found[name] = (texts, shape)
    if TEXT not in found:
        raise InvalidRequest(f"input {TEXT} is missing; this model takes {', '.join(names)}")
    if PAIR in found and len(found[PAIR][0]) != len(found[TEXT][0]):
        raise InvalidRequest(
            f"input {PAIR} has {len(found[PAIR][0])} elements and {TEXT} {len(found[TEXT][0])}: one pair each"
        )
    return found


# ------------------------------------------------------------------------------------------------------------------
# Parameters


def _parameter(request: pb.ModelInferRequest, name: str) -> pb.InferParameter | None:
    return request.parameters[name] if name in request.parameters else None


def _int(request: pb.ModelInferRequest, name: str, default: int, allowed: str) -> int:
    """An integer parameter (int64_param or uint64_param); below 0 or absurdly large, refused naming `allowed`."""
    p = _parameter(request, name)
    if p is None:
        return default
    kind = p.WhichOneof("parameter_choice")
    if kind not in ("int64_param", "uint64_param"):
        raise InvalidRequest(f"parameter {name} is an integer (int64_param), {allowed}")
    value = getattr(p, kind)
    if not 0 <= value <= 2**31:
        raise OptionOutOfRange(name, value, allowed)
    return value


def _float(request: pb.ModelInferRequest, name: str, default: float) -> float:
    """A number: double_param (what tritonclient sends for a float), an integer, or a decimal string_param."""
    p = _parameter(request, name)
    if p is None:
        return default
    kind = p.WhichOneof("parameter_choice")
    if kind in ("double_param", "int64_param", "uint64_param"):
        return float(getattr(p, kind))
    if kind == "string_param" and _DECIMAL.fullmatch(p.string_param):
        return float(p.string_param)
    raise InvalidRequest(f"parameter {name} is a number: double_param, int64_param, or a decimal string_param (\"0.6\")")


def _bool(request: pb.ModelInferRequest, name: str) -> bool:
    p = _parameter(request, name)
    if p is None:
        return False
    if p.WhichOneof("parameter_choice") != "bool_param":
        raise InvalidRequest(f"parameter {name} is a boolean (bool_param)")
    return p.bool_param


def _check_parameters(request: pb.ModelInferRequest, kind: str) -> None:
    allowed = _PARAMETERS[kind]
    for name in request.parameters:
        if name not in allowed:
            raise InvalidRequest(f"unknown parameter {name[:80]!r}; this model takes {', '.join(allowed)}")


def decode_options(request: pb.ModelInferRequest, served: ServedModel) -> DecodeOptions:
    """The request's decoding parameters; their upper limits are checked where seqserve.v1's are (DecodeOptions)."""
    beam = max(_int(request, "beam_size", 1, f"1..{served.limits.max_beam_size}"), 1)
    return DecodeOptions(
        beam_size=beam, n_best=max(_int(request, "n_best", 1, f"1..beam_size ({beam})"), 1),
        max_output_tokens=_int(request, "max_output_tokens", 0,
                               f"0..{served.translator.max_target_tokens} (0: the model's own limit)"),
        max_output_ratio=_float(request, "max_output_ratio", 0.0),
        length_penalty=_float(request, "length_penalty", 0.0),
    )  # fmt: skip


# ------------------------------------------------------------------------------------------------------------------
# The servicer


def _version(text: str) -> int:
    """A request's version string: "" for the highest ready (0), else a version number as the repository's folders
    name them (1, 2, ...)."""
    if not text:
        return 0
    if not _VERSION.fullmatch(text):
        raise InvalidRequest(f"model version {text[:20]!r} is not a version number (1, 2, ...; empty for the latest)")
    return int(text)


def _wanted(request: pb.ModelInferRequest, outputs: list[Tensor], answerable: list[str]) -> list[str]:
    """The outputs to answer, in the request's order (all it allows when none are named)."""
    names = [o.name for o in outputs]
    if not request.outputs:
        return answerable
    wanted = []
    for out in request.outputs:
        if out.parameters:  # classification, shared memory: not offered
            raise InvalidRequest(
                f"output {out.name[:80]}: output parameters are not supported (got "
                f"{sorted(out.parameters)[0][:80]!r})"
            )
        if out.name not in names:
            raise InvalidRequest(f"unknown output {out.name[:80]!r}; this model gives {', '.join(names)}")
        if out.name not in answerable:
            raise InvalidRequest(f"output {out.name} needs input {PAIR} (the second sentence of each pair)")
        if out.name not in wanted:
            wanted.append(out.name)
    return wanted


@contextmanager
def _token_limit(pairs: list[str] | None) -> Iterator[None]:
    """seqserve.v1's over-the-token-limit refusal, said for this protocol (the truncate parameter, the input names)."""
    try:
        yield
    except InputTooLong as exc:
        what = f"elements {exc.index} of {TEXT} and {PAIR} together have" if pairs is not None else (
            f"input {TEXT}: element {exc.index} has")
        raise InvalidRequest(
            f"{what} {exc.tokens} tokens, over the model's limit of {exc.limit} tokens; shorten it or set parameter "
            "truncate (bool_param true) to cut it to the limit"
        ) from None


def _output(response: pb.ModelInferResponse, name: str, datatype: str, shape: list[int], raw: bytes) -> None:
    response.outputs.add(name=name, datatype=datatype, shape=shape)
    response.raw_output_contents.append(raw)


class OpenInferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, state: ServingState):
        self.state = state

    @_rpc
    async def ServerLive(self, request: pb.ServerLiveRequest, context) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    @_rpc
    async def ServerReady(self, request: pb.ServerReadyRequest, context) -> pb.ServerReadyResponse:
        ready = any(s.state == READY for s in self.state.manager.statuses())  # draining: refused by _rpc
        return pb.ServerReadyResponse(ready=ready)

    @_rpc
    async def ModelReady(self, request: pb.ModelReadyRequest, context) -> pb.ModelReadyResponse:
        version = _version(request.version)
        ready = any(s.state == READY and (not version or s.version == version)
                    for s in self.state.manager.statuses(request.name))  # fmt: skip
        return pb.ModelReadyResponse(ready=ready and bool(request.name))

    @_rpc
    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context) -> pb.ServerMetadataResponse:
        try:
            version = metadata.version("seqserve")
        except metadata.PackageNotFoundError:
            version = "unknown"
        return pb.ServerMetadataResponse(name="seqserve", version=version)

    @_rpc
    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context) -> pb.ModelMetadataResponse:
        served = self.state.manager.get(request.name, _version(request.version))
        inputs, outputs = tensors(served)
        versions = [str(s.version) for s in self.state.manager.statuses(served.name) if s.state == READY]
        return pb.ModelMetadataResponse(
            name=served.name, versions=versions, platform=PLATFORM, inputs=[t.metadata() for t in inputs],
            outputs=[t.metadata() for t in outputs],
        )  # fmt: skip

    @_rpc
    async def ModelInfer(self, request: pb.ModelInferRequest, context) -> pb.ModelInferResponse:
        served = self.state.manager.get(request.model_name, _version(request.model_version))
        inputs, outputs = tensors(served)
        found = read_inputs(request, inputs, served.limits)
        texts, shape = found[TEXT]
        pairs = found[PAIR][0] if PAIR in found else None
        response = pb.ModelInferResponse(model_name=served.name, model_version=str(served.version), id=request.id)
        truncate = _bool(request, "truncate")
        deadline = _deadline(context)
        if served.translator is not None:
            _check_parameters(request, "translate")
            wanted = _wanted(request, outputs, [TRANSLATION, SCORE])
            options = decode_options(request, served)
            with _token_limit(pairs):
                results = await served.translate(texts, options, truncate, deadline)
            n = options.n_best
            out_shape = shape + [n] if n > 1 else shape
            # n hypotheses a text; fewer only for a blank text (one empty translation): padded with empty ones
            best = [[(h.text, h.score) for h in r.hypotheses[:n]] + [("", -math.inf)] * (n - len(r.hypotheses[:n]))
                    for r in results]  # fmt: skip
            for name in wanted:
                if name == TRANSLATION:
                    raw = raw_bytes([text.encode("utf-8") for hyps in best for text, _ in hyps])
                    _output(response, name, "BYTES", out_shape, raw)
                else:
                    scores = np.asarray([score for hyps in best for _, score in hyps], "<f4")
                    _output(response, name, "FP32", out_shape, scores.tobytes())
            return response
        _check_parameters(request, "bert")
        pooling, normalize = self._pooling(request), _bool(request, "normalize")  # checked whatever is asked
        answerable = [o.name for o in outputs if o.name != IS_NEXT or pairs is not None]
        wanted = _wanted(request, outputs, answerable)
        if not wanted:
            raise InvalidRequest(
                f"model {served.name} gives no output from these inputs over this protocol (its outputs: "
                f"{', '.join(o.name for o in outputs) or 'none'}; {IS_NEXT} needs input {PAIR}); it serves "
                f"{', '.join(served.capabilities)} on seqserve.v1"
            )
        for name in wanted:
            with _token_limit(pairs):
                if name == EMBEDDING:
                    vectors, _ = await served.encode(
                        [] if pairs is not None else texts, list(zip(texts, pairs)) if pairs is not None else [],
                        pooling, normalize, truncate, deadline,
                    )  # fmt: skip
                    _output(response, name, "FP32", shape + [vectors.shape[1]], vectors.astype("<f4").tobytes())
                else:
                    probs = await served.next_sentence(list(zip(texts, pairs)), truncate, deadline)
                    _output(response, name, "FP32", shape, np.asarray(probs, "<f4").tobytes())
        return response

    @staticmethod
    def _pooling(request: pb.ModelInferRequest) -> str | None:
        p = _parameter(request, "pooling")
        if p is None:
            return None
        if p.WhichOneof("parameter_choice") != "string_param" or p.string_param not in _POOLINGS:
            raise InvalidRequest(f"parameter pooling is one of {', '.join(map(repr, _POOLINGS))} (string_param)")
        return _POOLINGS[p.string_param]
