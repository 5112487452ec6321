"""Reading Open Inference Protocol (KServe v2) requests for server/open_inference.py: text tensors (BYTES, as
contents or raw buffers) and request parameters, each refused INVALID_ARGUMENT naming what was wrong and the limit."""

from __future__ import annotations

import math
import re
import struct

from seqserve.protos.inference import open_inference_pb2 as pb
from seqserve.server.config import Limits
from seqserve.server.errors import InvalidRequest, OptionOutOfRange, TextTooLong
from seqserve.server.repository import VERSION_PATTERN
from seqserve.server.served import ServedModel
from seqserve.server.translation import DecodeOptions

TEXT, PAIR = "text", "text_pair"
MAX_DIMS = 8  # dimensions of an input tensor: a batch of texts needs one or two
POOLINGS = {"model": None, "cls": "cls", "mean": "mean"}
PARAMETERS = {
    "translate": ("beam_size", "n_best", "max_output_tokens", "max_output_ratio", "length_penalty", "truncate"),
    "bert": ("pooling", "normalize", "truncate"),
}
_DECIMAL = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")


# ------------------------------------------------------------------------------------------------------------------
# BYTES tensors: bytes_contents, or raw buffers of 4-byte little-endian lengths each followed by that many bytes


def unpack_bytes(raw: bytes, count: int, name: str) -> list[bytes]:
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


def pack_bytes(values: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(v)) + v for v in values)


def count_elements(shape: list[int], name: str, limits: Limits) -> int:
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
    request: pb.ModelInferRequest, names: list[str], limits: Limits
) -> dict[str, tuple[list[str], list[int]]]:
    """Each text input among `names`: its elements (decoded UTF-8) and shape; INVALID_ARGUMENT naming what is wrong
    and the limit."""
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
        shape = list(tensor.shape)
        count = count_elements(shape, name, limits)
        others = [f.name for f, _ in tensor.contents.ListFields() if f.name != "bytes_contents"]
        if others:
            raise InvalidRequest(f"input {name}: contents.{others[0]} given; a BYTES tensor has bytes_contents only")
        if request.raw_input_contents:
            if tensor.HasField("contents"):
                raise InvalidRequest(f"input {name} has contents beside raw_input_contents: use one or the other")
            elements = unpack_bytes(request.raw_input_contents[i], count, name)
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
                too_long = TextTooLong(len(text), limits.max_chars_per_text, j)
                raise InvalidRequest(too_long.about(f"input {name}: element {j}"))
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


def parameter(request: pb.ModelInferRequest, name: str) -> pb.InferParameter | None:
    return request.parameters[name] if name in request.parameters else None


def int_parameter(request: pb.ModelInferRequest, name: str, default: int, allowed: str) -> int:
    """An integer parameter (int64_param or uint64_param); below 0 or absurdly large, refused naming `allowed`."""
    p = parameter(request, name)
    if p is None:
        return default
    kind = p.WhichOneof("parameter_choice")
    if kind not in ("int64_param", "uint64_param"):
        raise InvalidRequest(f"parameter {name} is an integer (int64_param), {allowed}")
    value = getattr(p, kind)
    if not 0 <= value <= 2**31:
        raise OptionOutOfRange(name, value, allowed)
    return value


def float_parameter(request: pb.ModelInferRequest, name: str, default: float) -> float:
    """A number: double_param (what tritonclient sends for a float), an integer, or a decimal string_param."""
    p = parameter(request, name)
    if p is None:
        return default
    kind = p.WhichOneof("parameter_choice")
    if kind in ("double_param", "int64_param", "uint64_param"):
        return float(getattr(p, kind))
    if kind == "string_param" and _DECIMAL.fullmatch(p.string_param):
        return float(p.string_param)
    raise InvalidRequest(
        f"parameter {name} is a number: double_param, int64_param, or a decimal string_param (\"0.6\")"
    )


def bool_parameter(request: pb.ModelInferRequest, name: str) -> bool:
    p = parameter(request, name)
    if p is None:
        return False
    if p.WhichOneof("parameter_choice") != "bool_param":
        raise InvalidRequest(f"parameter {name} is a boolean (bool_param)")
    return p.bool_param


def pooling_parameter(request: pb.ModelInferRequest) -> str | None:
    p = parameter(request, "pooling")
    if p is None:
        return None
    if p.WhichOneof("parameter_choice") != "string_param" or p.string_param not in POOLINGS:
        raise InvalidRequest(f"parameter pooling is one of {', '.join(map(repr, POOLINGS))} (string_param)")
    return POOLINGS[p.string_param]


def check_parameters(request: pb.ModelInferRequest, kind: str) -> None:
    allowed = PARAMETERS[kind]
    for name in request.parameters:
        if name not in allowed:
            raise InvalidRequest(f"unknown parameter {name[:80]!r}; this model takes {', '.join(allowed)}")


def decode_options(request: pb.ModelInferRequest, served: ServedModel) -> DecodeOptions:
    """The request's decoding parameters; their upper limits are checked where seqserve.v1's are (DecodeOptions)."""
    beam = max(int_parameter(request, "beam_size", 1, f"1..{served.limits.max_beam_size}; 0 is taken as 1"), 1)
    n_best = max(int_parameter(request, "n_best", 1, f"1..beam_size {beam}; 0 is taken as 1"), 1)
    max_tokens = int_parameter(
        request, "max_output_tokens", 0, f"0..{served.translator.max_target_tokens} (0: the model's own limit)"
    )
    return DecodeOptions(
        beam_size=beam, n_best=n_best, max_output_tokens=max_tokens,
        max_output_ratio=float_parameter(request, "max_output_ratio", 0.0),
        length_penalty=float_parameter(request, "length_penalty", 0.0),
    )  # fmt: skip


def version_number(text: str) -> int:
    """A request's version string: "" for the highest ready (0), else a version number as the repository's folders
    name them (1, 2, ...; at most 9 digits, so that a refusal naming it stays short)."""
    if not text:
        return 0
    if len(text) > 9 or not VERSION_PATTERN.match(text):
        raise InvalidRequest(f"model version {text[:20]!r} is not a version number (1, 2, ...; empty for the latest)")
    return int(text)
