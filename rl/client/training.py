"""`TrainingClient`: one LoRA adapter on a trainer actor, driven like Tinker's client.

Every call returns an `APIFuture` at once and runs on this client's ordered queue, so calls
execute in submission order: submit `forward_backward` and `optim_step` back to back and wait
once. `*_async` methods return the same future from a coroutine (Tinker's double await).
Errors do not poison the client: a rejected call changes nothing, and the next call proceeds.

Weight sync: `save_weights_and_get_sampling_client` pushes the weights as they are after the
client's earlier calls to the samplers and checks them there (rl/client/weight_sync.py);
`begin_weight_sync` runs only the trainer half in the queue, so later calls need not wait for
the samplers to load.

Trainer death: the client keeps a restore point (its last `save_state`, the checkpoint it was
loaded from, or its initial adapter) and the calls that changed its state since. When the
trainer actor dies, it is restarted and every client it hosted restored to its restore point
(rl/client/trainer_host.py). A client that had changed nothing since goes on: the call that met the
dead actor simply runs again. Otherwise its next call, and every call submitted before that
one raised, raises `TrainerRestartedError` (the step restored to, the calls lost); calls
submitted after it run on the restored state.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from ray.actor import ActorHandle

from rl.checkpoint_format import read_checkpoint
from rl.client import weight_sync
from rl.client.pools import SamplerPools
from rl.client.sampling import SamplingClient
from rl.client.trainer_host import TrainerHost, is_out_of_memory, is_trainer_death
from rl.client.weight_sync import PendingSync
from rl.errors import (
    InvalidRequestError,
    NotFoundError,
    TrainerOutOfMemoryError,
    TrainerRestartedError,
)
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
from trainers.mixed import Call

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

CustomLossFn = Callable[[list[Datum], list[torch.Tensor]], tuple[torch.Tensor, dict[str, float]]]
# (kind, what, with_optimizer): ("create", LoraConfig, False) or ("state", checkpoint path, ...)
RestorePoint = tuple[str, Any, bool]
_CHANGES_STATE = ("forward_backward", "forward_backward_custom", "optim_step")


class TrainingClient:
    def __init__(
        self,
        host: TrainerHost,
        pools: SamplerPools,
        model_id: str,
        info: GetInfoResponse,
        *,
        restore_point: RestorePoint | None = None,
    ):
        self.model_id = model_id
        self.base_model = host.base_model
        self._host = host  # restarts the trainer if it dies
        self._pools = pools
        self._info = info
        self._restore_point: RestorePoint = restore_point or ("create", info.lora_config, False)
        self._since_save: list[str] = []  # calls that changed the state since the restore point
        self._epoch = 0  # bumped when a restart lost calls: older calls then raise
        self._restarted: TrainerRestartedError | None = None
        self._delivered = True  # whether a call has raised `_restarted` yet
        self._state_lock = threading.Lock()
        self._queue = OrderedQueue(f"client-{model_id}")
        self._sync_turns = Turns()  # weight syncs finish in the order they began
        self._tokenizer: Any = None
        self._released: str | None = None  # why, once released

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
        return self._guarded(
            "forward_backward_custom", lambda actor: self._custom_loss(actor, data, loss_fn)
        )

    def optim_step(self, adam_params: AdamParams | None = None) -> APIFuture[OptimStepResponse]:
        return self._call("optim_step", adam_params or AdamParams())

    # -- checkpoints -------------------------------------------------------------------------

    def save_state(self, name: str, overwrite: bool = False) -> APIFuture[SaveWeightsResponse]:
        """Saves adapter weights + optimizer state; `.path` loads with create_*_from_state.
        It is also this client's restore point should the trainer die."""
        return self._call("save_state", name, overwrite)

    def load_state(self, path: str) -> APIFuture[LoadWeightsResponse]:
        """Replaces this client's weights with those at `path`; the optimizer state is reset."""
        return self._call("load_state", str(path), False)

    def load_state_with_optimizer(self, path: str) -> APIFuture[LoadWeightsResponse]:
        return self._call("load_state", str(path), True)

    def save_weights_for_sampler(self, name: str) -> APIFuture[SaveWeightsForSamplerResponse]:
        """Saves the adapter in standard PEFT format (loadable by peft and vLLM)."""
        return self._call("save_weights_for_sampler", name)

    def save_weights_and_get_sampling_client(
        self,
        name: str | None = None,
        retry_config: object = None,
        *,
        sync_mode: str | None = None,
    ) -> SamplingClient:
        """Pushes the current weights to the samplers, checks them there, and returns a client
        that samples them. Blocks until they are verified. `name` and `retry_config` are
        accepted for Tinker compatibility and unused (the weights are not saved; the sampler
        pool retries by itself)."""
        return weight_sync.finish(self.begin_weight_sync(sync_mode).result())

    def begin_weight_sync(self, sync_mode: str | None = None) -> APIFuture[PendingSync]:
        """The trainer half of a weight sync, queued after this client's earlier calls; the
        future resolves once the trainer has the export queued, before any later call runs.
        Pass the result to `rl.client.weight_sync.finish`; later syncs wait for it."""

        def begin(actor: Any) -> PendingSync:
            return weight_sync.begin(
                actor,
                model_id=self.model_id,
                base_model=self.base_model,
                lora_rank=self._info.lora_rank,
                trainer_config=self._host.config,
                pools=self._pools,
                sync_mode=sync_mode,
                turns=self._sync_turns,
            )

        return self._guarded("weight sync", begin)

    @property
    def trainer_actor(self) -> ActorHandle:
        """The trainer actor now hosting this client (a new one after a restart)."""
        return self._host.handle

    def close(self) -> None:
        """Drops the calls still queued; the adapter stays on the trainer until it stops
        (`ServiceClient.release` deletes it)."""
        self._queue.close()

    def mark_released(self, why: str) -> None:
        """From now on every call raises NotFoundError saying `why` (see ServiceClient.release)."""
        self._released = why

    # -- info --------------------------------------------------------------------------------

    def get_info(self) -> GetInfoResponse:
        return self._info

    def get_tokenizer(self) -> PreTrainedTokenizerBase:
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self._info.model_data.tokenizer_id)
        return self._tokenizer

    # -- async variants (Tinker's double await: the coroutine gives the future) ---------------

    async def forward_async(
        self,
        data: Sequence[Datum],
        loss_fn: str = "cross_entropy",
        loss_fn_config: dict[str, float] | None = None,
    ) -> APIFuture[ForwardBackwardOutput]:
        return self.forward(data, loss_fn, loss_fn_config)

    async def forward_backward_async(
        self, data: Sequence[Datum], loss_fn: str, loss_fn_config: dict[str, float] | None = None
    ) -> APIFuture[ForwardBackwardOutput]:
        return self.forward_backward(data, loss_fn, loss_fn_config)

    async def forward_backward_custom_async(
        self, data: Sequence[Datum], loss_fn: CustomLossFn
    ) -> APIFuture[ForwardBackwardOutput]:
        return self.forward_backward_custom(data, loss_fn)

    async def optim_step_async(
        self, adam_params: AdamParams | None = None
    ) -> APIFuture[OptimStepResponse]:
        return self.optim_step(adam_params)

    async def save_state_async(
        self, name: str, overwrite: bool = False
    ) -> APIFuture[SaveWeightsResponse]:
        return self.save_state(name, overwrite)

    async def load_state_async(self, path: str) -> APIFuture[LoadWeightsResponse]:
        return self.load_state(path)

    async def load_state_with_optimizer_async(self, path: str) -> APIFuture[LoadWeightsResponse]:
        return self.load_state_with_optimizer(path)

    async def save_weights_for_sampler_async(
        self, name: str
    ) -> APIFuture[SaveWeightsForSamplerResponse]:
        return self.save_weights_for_sampler(name)

    async def save_weights_and_get_sampling_client_async(
        self,
        name: str | None = None,
        retry_config: object = None,
        *,
        sync_mode: str | None = None,
    ) -> SamplingClient:
        return await asyncio.to_thread(
            self.save_weights_and_get_sampling_client, name, retry_config, sync_mode=sync_mode
        )

    # -- internals ---------------------------------------------------------------------------

    def _call(self, method: str, *args: Any) -> APIFuture[Any]:
        passes = self._host.passes
        if passes is not None and method in ("forward", "forward_backward"):
            data, loss_fn, config = args
            call = Call(self.model_id, data, loss_fn, config, backward=method != "forward")
            return self._guarded(method, lambda actor: passes.run(actor, call), args)

        def direct(actor: Any) -> Any:
            return ray_get(getattr(actor, method).remote(self.model_id, *args))

        return self._guarded(method, direct, args)

    def _guarded(
        self, name: str, fn: Callable[[Any], Any], args: tuple[Any, ...] = ()
    ) -> APIFuture[Any]:
        """Queues `fn(trainer actor)`, surviving a trainer death (see the module docstring)."""
        if self._released is not None:
            raise NotFoundError(f"training client {self.model_id!r} was released: {self._released}")
        epoch = self._epoch
        return self._queue.submit(lambda: self._run_guarded(name, fn, args, epoch))

    def _run_guarded(
        self, name: str, fn: Callable[[Any], Any], args: tuple[Any, ...], epoch: int
    ) -> Any:
        host = self._host
        for attempt in range(2):
            self._raise_if_lost(epoch)
            actor, generation = host.current()
            try:
                result = fn(actor)
            except BaseException as error:
                if attempt or not is_trainer_death(error):
                    raise
                host.restart(generation, error)
                if is_out_of_memory(error):  # the same call would most likely run out again
                    self._raise_if_lost(epoch)
                    raise TrainerOutOfMemoryError(self._what_ran_out(name, args)) from None
                continue  # runs again on the restored state, unless calls were lost
            with self._state_lock:
                if host.generation != generation and name in _CHANGES_STATE:
                    # It ran on the old actor, which died right after: its effect is gone.
                    self._lose([name])
                    self._delivered = True
                    assert self._restarted is not None
                    raise self._restarted
                self._record(name, args, result)
            return result
        raise AssertionError("unreachable")

    def _what_ran_out(self, name: str, args: tuple[Any, ...]) -> str:
        """`name` with the size of its batch, for the out-of-memory error."""
        data = args[0] if args and isinstance(args[0], list) else []
        size = ""
        if data:
            tokens = sum(d.model_input.length for d in data if isinstance(d, Datum))
            size = f" of {len(data)} datums ({tokens:,} tokens)"
        limit = self._host.config.memory_limit_gib
        bound = (
            f"its limit of {limit:g} GiB" if limit else f"this machine's {_machine_gib():.0f} GiB"
        )
        return f"the trainer of {self.base_model!r} ran out of memory ({bound}) during {name}{size}"

    def _raise_if_lost(self, epoch: int) -> None:
        """Raises the restart report for calls submitted before it was first raised."""
        with self._state_lock:
            if self._restarted is None:
                return
            if not self._delivered:
                self._delivered = True
                self._epoch += 1  # the calls queued behind this one raise too
                raise self._restarted
            if self._epoch != epoch:
                raise self._restarted

    def _record(self, name: str, args: tuple[Any, ...], result: Any) -> None:
        """Keeps the restore point and the state-changing calls since it up to date."""
        if name in _CHANGES_STATE:
            self._since_save.append(name)
        elif name == "save_state":
            self._restore_point = ("state", result.path, True)
            self._since_save.clear()
        elif name == "load_state":
            self._restore_point = ("state", args[0], bool(args[1]))
            self._since_save.clear()

    def _lose(self, lost: list[str]) -> None:
        """Calls lost in a restart: this one and every call submitted before now raise."""
        kind, path, with_optimizer = self._restore_point
        step = 0
        if kind == "state" and with_optimizer:
            step = read_checkpoint(path, with_optimizer=False).meta.step
        self._epoch += 1
        cause = self._host.last_failure
        self._restarted = TrainerRestartedError(self.model_id, step, lost, cause)
        self._delivered = False

    def restore_on(self, actor: ActorHandle) -> None:
        """Recreates this client on a restarted trainer `actor`, at its restore point."""
        kind, what, with_optimizer = self._restore_point
        if kind == "create":
            ray_get(actor.create_adapter.remote(self.model_id, what))
        else:
            ray_get(actor.create_adapter_from_state.remote(self.model_id, what, with_optimizer))
        with self._state_lock:
            if self._since_save:
                self._lose(self._since_save)
                self._since_save = []

    def _custom_loss(
        self, actor: Any, data: list[Datum], loss_fn: CustomLossFn
    ) -> ForwardBackwardOutput:
        probe = []
        for i, datum in enumerate(data):
            if "target_tokens" not in datum.loss_fn_inputs:
                raise InvalidRequestError(f"datum {i}: forward_backward_custom needs target_tokens")
            targets = datum.loss_fn_inputs["target_tokens"]
            zeros = TensorData.from_numpy(targets.to_numpy() * 0.0)
            probe.append(_with_inputs(datum, targets, zeros))
        forward = ray_get(actor.forward.remote(self.model_id, probe, "cross_entropy"))
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
            actor.forward_backward.remote(self.model_id, weighted, "cross_entropy")
        )
        surrogate = result.metrics.pop("loss:sum", 0.0)
        result.metrics.pop("weights:sum", None)
        result.metrics.update({**metrics, "loss:sum": loss.item(), "surrogate_loss:sum": surrogate})
        return result


def _machine_gib() -> float:
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30


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
