"""The Open Inference Protocol (KServe v2, the protocol of Triton's clients) on seqserve's port.

The same models, batching, limits and errors as seqserve.v1, spoken as tensors: a text is a BYTES element (UTF-8).

- translator: input `text` BYTES [N]; outputs `translation` BYTES and `score` FP32, [N] (n_best > 1: [N, n_best]);
  parameters beam_size, n_best, max_output_tokens, max_output_ratio, length_penalty, truncate.
- BERT: inputs `text` BYTES [N] and, optionally, `text_pair` BYTES [N]; outputs `embedding` FP32 [N, H] (encode) and
  `is_next_probability` FP32 [N] (NSP, needs `text_pair`); parameters pooling ("model", "cls", "mean"), normalize,
  truncate.

Any input shape whose elements number N is taken ([N], [N, 1], ...; at most MAX_DIMS dimensions, N within max_texts);
outputs keep its shape. Without `outputs` in the request, a model answers every output its inputs allow. Inputs come
as `contents.bytes_contents` or as `raw_input_contents` (each element a 4-byte little-endian length, then its bytes);
answers come as `raw_output_contents`, as Triton's are. Tensor parameters (shared memory, classification) are refused.
Fill-mask stays on seqserve.v1 (its answer is not one tensor).
"""

from __future__ import annotations

import functools
import math
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from typing import Iterator

import numpy as np

from seqserve.protos.inference import open_inference_pb2 as pb
from seqserve.protos.inference import open_inference_pb2_grpc as pb_grpc
from seqserve.server.errors import InputTooLong, InvalidRequest
from seqserve.server.manager import READY
from seqserve.server.open_inference_codec import (
    PAIR, TEXT, bool_parameter, check_parameters, decode_options, pack_bytes, pooling_parameter, read_inputs,
    version_number,
)
from seqserve.server.served import ServedModel
from seqserve.server.servicers import ServingState, answers_while_draining, deadline_of, rpc_method

PLATFORM = "seqserve"
TRANSLATION, SCORE, EMBEDDING, IS_NEXT = "translation", "score", "embedding", "is_next_probability"


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
        subject = f"the pair of elements {exc.index} of {TEXT} and {PAIR}" if pairs is not None else (
            f"input {TEXT}: element {exc.index}")
        raise InvalidRequest(exc.about(subject, "set parameter truncate (bool_param true) to cut it to the limit"))


@functools.cache
def _package_version() -> str:
    """The installed package's version, read from its metadata once (not on every ServerMetadata)."""
    try:
        return metadata.version("seqserve")
    except metadata.PackageNotFoundError:
        return "unknown"


def _output(response: pb.ModelInferResponse, name: str, datatype: str, shape: list[int], raw: bytes) -> None:
    response.outputs.add(name=name, datatype=datatype, shape=shape)
    response.raw_output_contents.append(raw)


class OpenInferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, state: ServingState):
        self.state = state

    @rpc_method
    @answers_while_draining
    async def ServerLive(self, request: pb.ServerLiveRequest, context) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)  # also while draining: the process is fine, a restart would not help

    @rpc_method
    @answers_while_draining
    async def ServerReady(self, request: pb.ServerReadyRequest, context) -> pb.ServerReadyResponse:
        stopping = self.state.not_ready or self.state.draining
        ready = not stopping and any(s.state == READY for s in self.state.manager.statuses())
        return pb.ServerReadyResponse(ready=ready)

    @rpc_method
    async def ModelReady(self, request: pb.ModelReadyRequest, context) -> pb.ModelReadyResponse:
        version = version_number(request.version)
        if not request.name or self.state.not_ready:  # after SIGTERM every model reads not ready, as in grpc.health
            return pb.ModelReadyResponse(ready=False)
        ready = any(s.state == READY and (not version or s.version == version)
                    for s in self.state.manager.statuses(request.name))  # fmt: skip
        return pb.ModelReadyResponse(ready=ready)

    @rpc_method
    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="seqserve", version=_package_version())

    @rpc_method
    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context) -> pb.ModelMetadataResponse:
        served = self.state.manager.get(request.name, version_number(request.version))
        inputs, outputs = tensors(served)
        versions = [str(s.version) for s in self.state.manager.statuses(served.name) if s.state == READY]
        return pb.ModelMetadataResponse(
            name=served.name, versions=versions, platform=PLATFORM, inputs=[t.metadata() for t in inputs],
            outputs=[t.metadata() for t in outputs],
        )  # fmt: skip

    @rpc_method
    async def ModelInfer(self, request: pb.ModelInferRequest, context) -> pb.ModelInferResponse:
        served = self.state.manager.get(request.model_name, version_number(request.model_version))
        inputs, outputs = tensors(served)
        found = read_inputs(request, [t.name for t in inputs], served.limits)
        texts, shape = found[TEXT]
        pairs = found[PAIR][0] if PAIR in found else None
        response = pb.ModelInferResponse(model_name=served.name, model_version=str(served.version), id=request.id)
        truncate = bool_parameter(request, "truncate")
        deadline = deadline_of(context)
        if served.translator is not None:
            check_parameters(request, "translate")
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
                    raw = pack_bytes([text.encode("utf-8") for hyps in best for text, _ in hyps])
                    _output(response, name, "BYTES", out_shape, raw)
                else:
                    scores = np.asarray([score for hyps in best for _, score in hyps], "<f4")
                    _output(response, name, "FP32", out_shape, scores.tobytes())
            return response
        check_parameters(request, "bert")
        # checked whatever output is asked for
        pooling, normalize = pooling_parameter(request), bool_parameter(request, "normalize")
        answerable = [o.name for o in outputs if o.name != IS_NEXT or pairs is not None]
        wanted = _wanted(request, outputs, answerable)
        if not wanted:
            raise InvalidRequest(
                f"model {served.name} gives no output from these inputs over this protocol (its outputs: "
                f"{', '.join(o.name for o in outputs) or 'none'}; {IS_NEXT} needs input {PAIR}); it serves "
                f"{', '.join(served.capabilities)} on seqserve.v1"
            )
        for name in wanted:  # both outputs: two runs over the same texts (seqserve.v1's two methods)
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
