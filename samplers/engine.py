"""The interface both sampling engines implement, and the factory that picks one.

An engine owns one model on one device and serves concurrent `sample` coroutines. Weight
changes (`load_adapter`, `load_full_weights`) are blocking calls; the actor runs them in a
thread so its event loop keeps serving requests meanwhile.
"""

from __future__ import annotations

from typing import Protocol

from rl.types import SampleResponse
from samplers.config import SamplerConfig, resolve_engine
from samplers.types import EngineInfo, FullWeights, SampleRequest


class Engine(Protocol):
    info: EngineInfo

    async def sample(
        self, request: SampleRequest, adapter_path: str | None = None
    ) -> SampleResponse:
        """Runs one request; `adapter_path` is where adapter `request.weights.version` lives."""
        ...

    def load_adapter(self, version: int, path: str) -> None:
        """Registers the PEFT adapter at `path` under the id `version`."""
        ...

    def unload_adapter(self, version: int) -> None: ...

    def load_full_weights(self, weights: FullWeights) -> None:
        """Replaces the model weights (HF names); waits for running requests first."""
        ...

    def reset_prefix_cache(self) -> bool: ...

    def shutdown(self) -> None: ...


def make_engine(
    model_dir: str, config: SamplerConfig, *, enable_lora: bool, in_actor: bool = False
) -> Engine:
    """The configured engine. `in_actor`: a broken vLLM engine ends the process (Ray restarts
    the actor and the pool resubmits its requests)."""
    if resolve_engine(config) == "vllm":
        from samplers.engine_vllm import VLLMEngine

        return VLLMEngine(model_dir, config, enable_lora=enable_lora, exit_on_failure=in_actor)
    from samplers.engine_torch import TorchEngine

    return TorchEngine(model_dir, config)
