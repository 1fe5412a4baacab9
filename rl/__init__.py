"""engineroom's client API, shaped like Tinker's: `import rl as tinker` works for its loops.

service_client = rl.ServiceClient()
training_client = service_client.create_lora_training_client(base_model, rank=32)
training_client.forward_backward(data, "cross_entropy").result()
"""

from rl import types
from rl.errors import (
    CheckpointError,
    EngineRoomError,
    InvalidRequestError,
    NotFoundError,
    WeightSyncError,
)
from rl.types import (
    AdamParams,
    Datum,
    EncodedTextChunk,
    ForwardBackwardOutput,
    ModelInput,
    SampleResponse,
    SamplingParams,
    TensorData,
)

# The clients (rl.client) start Ray actors: they load on first use, so that the actors, which
# import this ground floor, never import the client side, and the trainer imports without Ray
# (bench/gpu_check.py runs it where Ray is not).
_LAZY = {
    "APIFuture": "rl.futures",
    "ServiceClient": "rl.client.service",
    "TrainingClient": "rl.client.training",
    "SamplingClient": "rl.client.sampling",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'rl' has no attribute {name!r}")


__all__ = [
    "APIFuture",
    "AdamParams",
    "CheckpointError",
    "Datum",
    "EncodedTextChunk",
    "EngineRoomError",
    "ForwardBackwardOutput",
    "InvalidRequestError",
    "ModelInput",
    "NotFoundError",
    "SampleResponse",
    "SamplingClient",
    "SamplingParams",
    "ServiceClient",
    "TensorData",
    "TrainingClient",
    "WeightSyncError",
    "types",
]
