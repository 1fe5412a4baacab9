"""`TrainingClient`: one LoRA adapter on a trainer actor, driven like Tinker's client.

Every call returns an `APIFuture` at once and runs on this client's ordered queue, so calls
execute in submission order: submit `forward_backward` and `optim_step` back to back and wait
once. `*_async` methods return the same future from a coroutine (Tinker's double await).
Errors do not poison the client: a rejected call changes nothing, and the next call proceeds.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from rl.errors import InvalidRequestError
from rl.futures import APIFuture, OrderedQueue, Turns, ray_get
from rl.types import (
    AdamParams,
    Datum,
    ForwardBackwardOutput,
    GetInfoResponse,
    LoadWeightsResponse,
    OptimStepResponse,
    SaveWeightsForSamplerResponse,
    SaveWeightsResponse,
    TensorData,
)

if TYPE_CHECKING:
    from rl.service_client import ServiceClient

CustomLossFn = Callable[[list[Datum], list[torch.Tensor]], tuple[torch.Tensor, dict[str, float]]]


class TrainingClient:
    def __init__(
        self,
        service: ServiceClient,
        actor: Any,
        model_id: str,
        base_model: str,
        info: GetInfoResponse,
    ):
        self.service = service
        self.model_id = model_id
        self.base_model = base_model
        self._actor = actor
        self._info = info
        self._queue = OrderedQueue(f"client-{model_id}")
        self._sync_turns = Turns()  # weight syncs finish in the order they began
        self._tokenizer: Any = None

    # -- training ----------------------------------------------------------------------------

    def forward(
        self,
        data: Sequence[Datum],
        loss_fn: str = "cross_entropy",
        loss_fn_config: dict[str, float] | None = None,
    ) -> APIFuture[ForwardBackwardOutput]:
        """Logprobs of the targets (and the loss's metrics) with no gradient."""
        data = _as_data(data)
        return self._call("forward", data, loss_fn, loss_fn_config)

    def forward_backward(
        self,
        data: Sequence[Datum],
        loss_fn: str,
        loss_fn_config: dict[str, float] | None = None,
    ) -> APIFuture[ForwardBackwardOutput]:
        """Accumulates the gradient of the summed loss until the next `optim_step`."""
        data = _as_data(data)
        return self._call("forward_backward", data, loss_fn, loss_fn_config)

    def forward_backward_custom(
        self, data: Sequence[Datum], loss_fn: CustomLossFn
    ) -> APIFuture[ForwardBackwardOutput]:
        """Runs `loss_fn(data, logprobs_list) -> (loss, metrics)` here, on the client.

        As in Tinker: a forward for the target logprobs, a local backward for g = dLoss/dlogprobs,
        then a `cross_entropy` pass with weights = -g, whose gradient equals the custom loss's.
        Both passes run in one slot of the queue, so no other call of this client lands
        between them.
        """
        data = _as_data(data)
        return self._queue.submit(lambda: self._custom_loss(data, loss_fn))

    def optim_step(self, adam_params: AdamParams | None = None) -> APIFuture[OptimStepResponse]:
        return self._call("optim_step", adam_params or AdamParams())

    # -- checkpoints -------------------------------------------------------------------------

    def save_state(self, name: str, overwrite: bool = False) -> APIFuture[SaveWeightsResponse]:
        """Saves adapter weights + optimizer state; `.path` loads with create_*_from_state."""
        return self._call("save_state", name, overwrite)

    def load_state(self, path: str) -> APIFuture[LoadWeightsResponse]:
        """Replaces this client's weights with those at `path`; the optimizer state is reset."""
        return self._call("load_state", str(path), False)

    def load_state_with_optimizer(self, path: str) -> APIFuture[LoadWeightsResponse]:
        return self._call("load_state", str(path), True)

    def save_weights_for_sampler(self, name: str) -> APIFuture[SaveWeightsForSamplerResponse]:
        """Saves the adapter in standard PEFT format (loadable by peft and vLLM)."""
        return self._call("save_weights_for_sampler", name)

    def save_weights_and_get_sampling_client(self, name: str | None = None, **kwargs: Any) -> Any:
        """Pushes the current weights to the samplers and returns a client that samples them."""
        from rl.sampling_client import sampling_client_from_trainer

        return sampling_client_from_trainer(self, name=name, **kwargs)

    # -- info --------------------------------------------------------------------------------

    def get_info(self) -> GetInfoResponse:
        return self._info

    def get_tokenizer(self) -> Any:
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self._info.model_data.tokenizer_id)
        return self._tokenizer

    # -- async variants (Tinker's double await: the coroutine gives the future) ---------------

    async def forward_async(self, *args: Any, **kwargs: Any) -> APIFuture[ForwardBackwardOutput]:
        return self.forward(*args, **kwargs)

    async def forward_backward_async(
        self, *args: Any, **kwargs: Any
    ) -> APIFuture[ForwardBackwardOutput]:
        return self.forward_backward(*args, **kwargs)

    async def forward_backward_custom_async(
        self, *args: Any, **kwargs: Any
    ) -> APIFuture[ForwardBackwardOutput]:
        return self.forward_backward_custom(*args, **kwargs)

    async def optim_step_async(self, *args: Any, **kwargs: Any) -> APIFuture[OptimStepResponse]:
        return self.optim_step(*args, **kwargs)

    async def save_state_async(self, *args: Any, **kwargs: Any) -> APIFuture[SaveWeightsResponse]:
        return self.save_state(*args, **kwargs)

    async def save_weights_for_sampler_async(
        self, *args: Any, **kwargs: Any
    ) -> APIFuture[SaveWeightsForSamplerResponse]:
        return self.save_weights_for_sampler(*args, **kwargs)

    async def save_weights_and_get_sampling_client_async(self, *args: Any, **kwargs: Any) -> Any:
        return await asyncio.to_thread(self.save_weights_and_get_sampling_client, *args, **kwargs)

    # -- internals ---------------------------------------------------------------------------

    def _run_in_order(self, fn: Callable[[], Any]) -> APIFuture[Any]:
        """Runs `fn` in this client's queue, after every call submitted before it."""
        return self._queue.submit(fn)

    def _call(self, method: str, *args: Any) -> APIFuture[Any]:
        remote = getattr(self._actor, method)
        return self._queue.submit(lambda: ray_get(remote.remote(self.model_id, *args)))

    def _custom_loss(self, data: list[Datum], loss_fn: CustomLossFn) -> ForwardBackwardOutput:
        probe = []
        for i, datum in enumerate(data):
            if "target_tokens" not in datum.loss_fn_inputs:
                raise InvalidRequestError(f"datum {i}: forward_backward_custom needs target_tokens")
            targets = datum.loss_fn_inputs["target_tokens"]
            zeros = TensorData.from_numpy(targets.to_numpy() * 0.0)
            probe.append(_with_inputs(datum, targets, zeros))
        forward = ray_get(self._actor.forward.remote(self.model_id, probe, "cross_entropy"))
        logprobs = [
            out["logprobs"].to_torch().clone().requires_grad_(True)
            for out in forward.loss_fn_outputs
        ]
        loss, metrics = loss_fn(data, logprobs)
        if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
            raise InvalidRequestError("a custom loss must return (scalar tensor, metrics dict)")
        if not torch.isfinite(loss):
            raise InvalidRequestError(f"the custom loss is {loss.item()}")
        loss.backward()
        weighted = []
        for datum, lp in zip(probe, logprobs, strict=True):
            grad = lp.grad if lp.grad is not None else torch.zeros_like(lp)
            weights = TensorData.from_torch(-grad)
            weighted.append(_with_inputs(datum, datum.loss_fn_inputs["target_tokens"], weights))
        result: ForwardBackwardOutput = ray_get(
            self._actor.forward_backward.remote(self.model_id, weighted, "cross_entropy")
        )
        surrogate = result.metrics.pop("loss:sum", 0.0)
        result.metrics.pop("weights:sum", None)
        result.metrics.update({**metrics, "loss:sum": loss.item(), "surrogate_loss:sum": surrogate})
        return result


def _with_inputs(datum: Datum, targets: TensorData, weights: TensorData) -> Datum:
    return Datum(
        model_input=datum.model_input,
        loss_fn_inputs={"target_tokens": targets, "weights": weights},
    )


def _as_data(data: Sequence[Datum]) -> list[Datum]:
    if isinstance(data, Datum) or not isinstance(data, Sequence):
        raise InvalidRequestError("data must be a list of Datum")
    out = []
    for i, datum in enumerate(data):
        if isinstance(datum, Datum):
            out.append(datum)
        elif isinstance(datum, dict):
            try:
                out.append(Datum.model_validate(datum))
            except ValueError as e:
                raise InvalidRequestError(f"datum {i}: {e}") from None
        else:
            raise InvalidRequestError(f"datum {i}: expected a Datum, got {type(datum).__name__}")
    return out
