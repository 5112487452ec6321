"""seqserve.clients: the Python client library (sync Client, asyncio AsyncClient) and `seqserve-client`.

Imports only grpc, the generated protos, numpy and the standard library (tqdm in the batch job): never torch.
"""

from seqserve.clients.aio import AsyncClient
from seqserve.clients.channel import DEFAULT, ConnectionConfig, RetryPolicy, TLSConfig
from seqserve.clients.client import Client
from seqserve.clients.errors import SeqServeError
from seqserve.clients.types import (
    DecodingOptions,
    Hypothesis,
    ModelInfo,
    ModelRef,
    StreamResult,
    TokenCandidate,
    Translation,
)

__all__ = [
    "AsyncClient",
    "Client",
    "ConnectionConfig",
    "DEFAULT",
    "DecodingOptions",
    "Hypothesis",
    "ModelInfo",
    "ModelRef",
    "RetryPolicy",
    "SeqServeError",
    "StreamResult",
    "TLSConfig",
    "TokenCandidate",
    "Translation",
]
