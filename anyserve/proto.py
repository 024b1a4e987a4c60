"""The KServe v2 (Open Inference Protocol) messages handlers import.

``from anyserve.proto import ModelInferRequest, ModelInferResponse,
ModelStreamInferResponse``. ``InferTensorContents`` is a top-level message in
the protocol; it is also reachable as ``ModelInferResponse.InferTensorContents``
and ``ModelInferRequest.InferTensorContents``, the spelling handlers written
for nested-message layouts use.
"""

from __future__ import annotations

from anyserve._proto.grpc_predict_v2_pb2 import (
    InferParameter,
    InferTensorContents,
    ModelInferRequest,
    ModelInferResponse,
    ModelMetadataRequest,
    ModelMetadataResponse,
    ModelReadyRequest,
    ModelReadyResponse,
    ModelStreamInferResponse,
    ServerLiveRequest,
    ServerLiveResponse,
    ServerMetadataRequest,
    ServerMetadataResponse,
    ServerReadyRequest,
    ServerReadyResponse,
)

# Handlers write ModelInferResponse.InferTensorContents(...): alias the top-level class.
ModelInferResponse.InferTensorContents = InferTensorContents  # type: ignore[attr-defined]
ModelInferRequest.InferTensorContents = InferTensorContents  # type: ignore[attr-defined]

__all__ = [
    "InferParameter",
    "InferTensorContents",
    "ModelInferRequest",
    "ModelInferResponse",
    "ModelMetadataRequest",
    "ModelMetadataResponse",
    "ModelReadyRequest",
    "ModelReadyResponse",
    "ModelStreamInferResponse",
    "ServerLiveRequest",
    "ServerLiveResponse",
    "ServerMetadataRequest",
    "ServerMetadataResponse",
    "ServerReadyRequest",
    "ServerReadyResponse",
]
