"""`SamplingClient`: samples from a base model, a saved sampler checkpoint, or a training client.

    client = service.create_sampling_client(base_model="SmolLM2-135M-Instruct")
    client = service.create_sampling_client(model_path=saved.path)     # a sampler checkpoint
    client = training_client.save_weights_and_get_sampling_client()   # the current weights
    response = client.sample(prompt, num_samples=4, sampling_params=params).result()

Each call returns an `APIFuture` at once; any number may be in flight. Requests go to a pool of
sampler actors (samplers/pool.py), started on first use and kept in the ServiceClient: per base
model one pool without LoRA (base-model clients) and one with LoRA (saved checkpoints and
adapter-mode syncs, many adapters per engine); and per training client in merged mode a pool
of its own, because a merged engine holds one set of weights.

Logprobs, as in Tinker: `SampledSequence.logprobs` are the model's own logprobs of the sampled
tokens, with no temperature or top-k/top-p applied (`SamplingParams.logprobs_mode="model"`).
`logprobs_mode="sampled"` gives the logprobs of the distribution actually sampled from; with
vLLM that needs a sampler started with `SamplerConfig(logprobs_mode="sampled")`.

Stops: EOS always stops unless `stop=[]`; `stop` strings or token ids stop too, and the token
that completes a stop is kept in `tokens`. `temperature` is in [0, 2] (vLLM's range); 0 is
greedy, so every one of `num_samples` is the same sequence.

Weight sync (`save_weights_and_get_sampling_client`) takes the weights as they are after the
training client's earlier calls: its trainer side (export the adapter or the merged weights,
and the trainer's logprobs of a probe sequence) runs on the client's ordered queue; the
samplers then load the weights outside the queue, so later trainer calls need not wait for
them (`begin_sync` / `finish_sync`; the RL loop's async mode uses that). "adapter" mode loads
the LoRA adapter into the running engines under a fresh version; "merged" mode merges it into
the base weights and reloads them (the default on CPU, where vLLM's LoRA kernels are slow).
Either way the sampler's logprobs of the probe are compared with the trainer's before the
client is returned: a sync that did not take effect raises `WeightSyncError`. The measured
difference is in `client.sync_metrics`.

A sampling client is a snapshot, as in Tinker: it samples the weights it was made from for as
long as it lives. Adapter versions stay in the LoRA pool (`max_versions_per_model` per
training client; an older one raises NotFoundError). A merged pool holds one set of weights,
so a merged-mode client also keeps its adapter and, once a later sync replaced its merge,
samples that on the LoRA pool (rl/client/snapshot.py).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import ray

from rl.checkpoint_format import read_sampler_checkpoint
from rl.client.snapshot import Snapshot
from rl.errors import CheckpointError, InvalidRequestError
from rl.futures import APIFuture, chain, unwrap_ray_error
from rl.models import load_tokenizer, resolve_model
from rl.types import Datum, ModelInput, SampleResponse, SamplingParams
from samplers.config import SamplerConfig, resolve_sync_mode
from samplers.engine_choice import engine_config_for
from samplers.pool import SamplerPool, submit
from samplers.sync_check import ProbeScores, check_sync, default_tolerance, probe_tokens
from samplers.types import BASE, WeightsVersion
from samplers.validation import build_request

if TYPE_CHECKING:
    from rl.client.service import ServiceClient
    from rl.client.training import TrainingClient

# Tinker arguments we accept and do not need (retries are the pool's job here).
_IGNORED_KWARGS = {"retry_config", "record_stability_info", "kind"}
_pool_lock = threading.Lock()


class SamplingClient:
    def __init__(
        self,
        pool: SamplerPool,
        weights: WeightsVersion,
        base_model: str,
        sync_metrics: dict[str, float] | None = None,
        snapshot: Snapshot | None = None,
    ):
        self._pool = pool
        self.weights = weights
        self._base_model = base_model
        self.sync_metrics: dict[str, float] = dict(sync_metrics or {})
        self._snapshot = snapshot  # merged mode: its adapter, for after a later sync

    def sample(
        self,
        prompt: ModelInput,
        num_samples: int = 1,
        sampling_params: SamplingParams | None = None,
        include_prompt_logprobs: bool = False,
        topk_prompt_logprobs: int = 0,
    ) -> APIFuture[SampleResponse]:
        """`num_samples` completions of `prompt`. Bad input raises InvalidRequestError here."""
        assert self._pool.info is not None
        request = build_request(
            prompt,
            num_samples,
            sampling_params,
            self._pool.info,
            include_prompt_logprobs=include_prompt_logprobs,
            topk_prompt_logprobs=topk_prompt_logprobs,
            weights=self.weights,
        )
        if self._snapshot is not None:
            return APIFuture(submit(self._snapshot.sample(self._pool, request)))
        return APIFuture(submit(self._pool.sample(request)))

    async def sample_async(self, *args: Any, **kwargs: Any) -> SampleResponse:
        return await self.sample(*args, **kwargs)

    def compute_logprobs(self, prompt: ModelInput) -> APIFuture[list[float | None]]:
        """Logprob of each prompt token given the ones before it; entry 0 is None."""
        future = self.sample(
            prompt, 1, SamplingParams(max_tokens=1, temperature=0.0), include_prompt_logprobs=True
        )
        return APIFuture(chain(future.future(), lambda r: list(r.prompt_logprobs or [])))

    async def compute_logprobs_async(self, prompt: ModelInput) -> list[float | None]:
        return await self.compute_logprobs(prompt)

    def get_base_model(self) -> str:
        return self._base_model

    def get_tokenizer(self) -> Any:
        return _tokenizer(self._pool)


# -- construction -------------------------------------------------------------------------


def create_sampling_client(
    service: ServiceClient,
    model_path: str | None = None,
    base_model: str | None = None,
    **kwargs: Any,
) -> SamplingClient:
    """A client for `base_model`, or for the sampler checkpoint at `model_path`."""
    _check_kwargs(kwargs)
    if model_path is None and base_model is None:
        raise InvalidRequestError("create_sampling_client needs model_path or base_model")
    if model_path is None:
        assert base_model is not None
        pool = base_pool(service, resolve_model(base_model))
        return SamplingClient(pool, BASE, base_model)
    path, adapter_config, checkpoint_base = read_sampler_checkpoint(model_path)
    base = base_model or checkpoint_base
    pool = shared_pool(service, resolve_model(base))
    assert pool.info is not None
    rank = int(adapter_config.get("r", 0))
    if rank > pool.info.max_lora_rank:
        raise InvalidRequestError(
            f"checkpoint {model_path!r} has LoRA rank {rank}, above the sampler's max_lora_rank "
            f"{pool.info.max_lora_rank} (raise SamplerConfig.max_lora_rank)"
        )
    weights = pool.path_versions.get(path)
    if weights is None:
        weights = pool.new_version("adapter", path)
        try:
            submit(pool.push(weights, path)).result()
        except Exception as error:
            raise CheckpointError(
                f"the sampler cannot load checkpoint {model_path!r}: {unwrap_ray_error(error)}"
            ) from None
        pool.path_versions[path] = weights
    return SamplingClient(pool, weights, base)


def sampling_client_from_trainer(
    training_client: TrainingClient,
    name: str | None = None,
    sync_mode: str | None = None,
    **kwargs: Any,
) -> SamplingClient:
    """Pushes the training client's current weights to the samplers, checks, returns a client.

    The weights are those after the client's earlier calls; blocks until they are verified.
    `name` is accepted for Tinker compatibility and unused (the weights are not saved).
    """
    return finish_sync(begin_sync(training_client, sync_mode, **kwargs).result())


@dataclass
class PendingSync:
    """A sync whose trainer side is done: the weights to push and the trainer's probe
    logprobs are Ray objects already computed (or queued first on the trainer), so the
    trainer may go on with later calls while the samplers load them (`finish_sync`)."""

    training_client: TrainingClient
    pool: SamplerPool
    mode: str
    source: Any  # ObjectRef: the adapter tensors or the merged state dict
    probe: tuple[list[int], Any] | None  # (probe tokens, ObjectRef of the trainer's forward)
    ticket: int
    began: float
    snapshot_source: Any = None  # merged mode: ObjectRef of the adapter (rl/client/snapshot.py)


def begin_sync(
    training_client: TrainingClient, sync_mode: str | None = None, **kwargs: Any
) -> APIFuture[PendingSync]:
    """Queues the trainer side of a sync on the client's ordered queue (after its earlier
    calls); the future resolves as soon as the trainer work is submitted, before any
    later call of the client runs on the trainer. Every pending sync must then be passed to
    `finish_sync`: later syncs of the client wait for it."""
    _check_kwargs(kwargs)
    if sync_mode not in (None, "adapter", "merged"):
        raise InvalidRequestError(f"sync_mode={sync_mode!r}; expected 'adapter' or 'merged'")
    return training_client._run_in_order(
        lambda: _begin(training_client, sync_mode)  # type: ignore[arg-type]
    )


def _begin(training_client: TrainingClient, sync_mode: str | None) -> PendingSync:
    began = time.perf_counter()
    service = training_client.service
    config = sampler_config(service)
    trainer = training_client._actor
    model_id = training_client.model_id
    model_dir = ray.get(trainer.base_model_path.remote())
    mode, pool = sync_pool(service, model_dir, model_id, sync_mode)
    snapshot_source = None
    if mode == "adapter":
        assert pool.info is not None
        rank = training_client.get_info().lora_rank
        if rank > pool.info.max_lora_rank:
            raise InvalidRequestError(
                f"LoRA rank {rank} is above the sampler's max_lora_rank {pool.info.max_lora_rank}"
                " (raise SamplerConfig.max_lora_rank, or sync with sync_mode='merged')"
            )
        source = trainer.adapter_weights.remote(model_id)
    else:
        # The same weights as an adapter, for this client after a later sync (snapshot).
        snapshot_source = trainer.adapter_weights.remote(model_id)
        assert pool.info is not None
        if pool.info.engine == "vllm":
            # Each sampler merges the adapter into its copy of the base (samplers/merge.py):
            # 20 MB cross the object store instead of the whole model.
            source = snapshot_source
        else:
            source = trainer.merged_weights.remote(model_id)
    probe = _trainer_probe(training_client, pool) if config.verify_sync else None
    # A barrier behind the exports on the trainer: once it answers, the weights are in Ray's
    # object store and outlive the trainer; a trainer that died before raises here, inside
    # the client's queue, which restarts it and runs this sync again (rl/client/trainer_host.py).
    ray.get(trainer.base_model_path.remote())
    ticket = training_client._sync_turns.take()
    return PendingSync(training_client, pool, mode, source, probe, ticket, began, snapshot_source)


def finish_sync(pending: PendingSync) -> SamplingClient:
    """Loads the weights of a `begin_sync` on the samplers and checks them; syncs of one
    training client finish in the order they began."""
    with pending.training_client._sync_turns.turn(pending.ticket):
        return push_and_verify(
            pending.training_client,
            pending.pool,
            pending.mode,
            pending.source,
            probe=pending.probe,
            began=pending.began,
            snapshot_source=pending.snapshot_source,
        )


def push_and_verify(
    training_client: TrainingClient,
    pool: SamplerPool,
    mode: str,
    source: Any,
    probe: tuple[list[int], Any] | None = None,
    began: float | None = None,
    snapshot_source: Any = None,
) -> SamplingClient:
    """Loads `source` (ObjectRef of the trainer's adapter or merged weights) as a new version
    on every actor of `pool`, checks it against the trainer's probe logprobs (`probe`, else
    the trainer's current weights), and returns its client. `snapshot_source` (merged mode:
    the same weights as an adapter) keeps the client sampling them after a later sync;
    without it such a client raises `WeightsSupersededError` then."""
    config = sampler_config(training_client.service)
    start = time.perf_counter() if began is None else began
    weights = pool.new_version(mode, training_client.model_id)
    timings = submit(pool.push(weights, source)).result()
    metrics = {"time/sync_s": time.perf_counter() - start, **_prefixed(timings)}
    if config.verify_sync:
        probe = probe or _trainer_probe(training_client, pool)
        metrics.update(_verify(training_client, pool, weights, config, probe))
    snapshot = None
    if mode == "merged" and snapshot_source is not None:
        rank = training_client.get_info().lora_rank
        snapshot = Snapshot(
            training_client.service, training_client.model_id, rank, snapshot_source
        )
    return SamplingClient(pool, weights, training_client.base_model, metrics, snapshot)


def _trainer_probe(training_client: TrainingClient, pool: SamplerPool) -> tuple[list[int], Any]:
    """(probe tokens, ObjectRef of the trainer's logprobs of them) at the trainer's weights
    as of this call (it queues on the trainer actor before any later call)."""
    assert pool.info is not None
    tokens = probe_tokens(_tokenizer(pool), pool.info.vocab_size)
    datum = Datum.model_validate(
        {
            "model_input": ModelInput.from_ints(tokens[:-1]),
            "loss_fn_inputs": {"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)},
        }
    )
    return tokens, training_client._actor.forward.remote(training_client.model_id, [datum])


def _verify(
    training_client: TrainingClient,
    pool: SamplerPool,
    weights: WeightsVersion,
    config: SamplerConfig,
    probe: tuple[list[int], Any],
) -> dict[str, float]:
    """Compares every sampler actor's probe logprobs with the trainer's (see samplers/sync)."""
    assert pool.info is not None
    start = time.perf_counter()
    tokens, trainer_ref = probe
    request = build_request(
        tokens, 1, SamplingParams(max_tokens=1, temperature=0.0), pool.info,
        include_prompt_logprobs=True, weights=weights,
    )  # fmt: skip
    responses = submit(pool.sample_on_each(request)).result()
    trainer_logprobs = ray.get(trainer_ref).loss_fn_outputs[0]["logprobs"].tolist()
    scores = ProbeScores(
        trainer=[float(x) for x in trainer_logprobs],
        samplers=[[float(x or 0.0) for x in (r.prompt_logprobs or [])[1:]] for r in responses],
    )
    trainer_config = training_client.service.trainer_config
    trainer_dtype = trainer_config.resolved_dtype(
        trainer_config.uses_gpu(ray.cluster_resources().get("GPU", 0))
    )
    tolerance = config.sync_tolerance or default_tolerance(pool.info.dtype, trainer_dtype)
    previous = pool.probe_scores.get(training_client.model_id)
    metrics = check_sync(scores, previous, tolerance, f"{training_client.model_id!r}")
    pool.probe_scores[training_client.model_id] = scores
    return {**metrics, "time/sync_verify_s": time.perf_counter() - start}


# -- pools --------------------------------------------------------------------------------


def release_sampler_memory(client: SamplingClient) -> bool:
    """Puts the engines serving `client` to sleep (SamplerConfig.sleep_between_rollouts):
    their GPU memory is free for a colocated trainer until their next request or weight load
    wakes them. False where they have no sleep mode enabled (a no-op)."""
    return submit(client._pool.sleep()).result()


def sampler_config(service: ServiceClient) -> SamplerConfig:
    config = getattr(service, "sampler_config", None)
    return config if isinstance(config, SamplerConfig) else SamplerConfig()


def base_pool(service: ServiceClient, model_dir: str) -> SamplerPool:
    """The pool for base-model sampling: no LoRA, so requests batch freely (see engine_vllm)."""
    return get_pool(service, model_dir, f"{model_dir}::base", enable_lora=False)


def prestart_sync_pool(
    service: ServiceClient, base_model: str, model_id: str, sync_mode: str | None = None
) -> None:
    """Starts the sampler pool that the first sync of training client `model_id` will load,
    before that client exists: a loop calls it in a thread while the trainer loads, so the
    samplers' start (vLLM: its import, load and warm-up) overlaps the trainer's. The sync
    then finds the pool started, or waits for the start under way (the pools' lock)."""
    sync_pool(service, resolve_model(base_model), model_id, sync_mode)


def sync_pool(
    service: ServiceClient, model_dir: str, model_id: str, sync_mode: str | None
) -> tuple[str, SamplerPool]:
    """(mode, pool) of a sync of training client `model_id`: the shared LoRA pool in adapter
    mode, the client's own pool in merged mode; the pool is started on first use."""
    on_gpu = ray.cluster_resources().get("GPU", 0) > 0
    mode = sync_mode or resolve_sync_mode(sampler_config(service), on_gpu)
    if mode == "adapter":
        return mode, shared_pool(service, model_dir)
    return mode, merged_pool(service, model_dir, model_id)


def shared_pool(service: ServiceClient, model_dir: str) -> SamplerPool:
    """The LoRA pool for saved checkpoints and adapter-mode syncs of `model_dir`."""
    return get_pool(service, model_dir, f"{model_dir}::lora", enable_lora=True)


def merged_pool(service: ServiceClient, model_dir: str, model_id: str) -> SamplerPool:
    """The pool holding the merged weights of one training client."""
    return get_pool(service, model_dir, f"{model_dir}::merged::{model_id}", enable_lora=False)


def get_pool(service: ServiceClient, model_dir: str, key: str, *, enable_lora: bool) -> SamplerPool:
    """One pool per key, kept in `service._sampler_pools` and started on first use."""
    with _pool_lock:
        pool = service._sampler_pools.get(key)
        if pool is None:
            config = sampler_config(service)
            on_gpu = config.resolved_gpus(ray.cluster_resources().get("GPU", 0)) > 0
            # vLLM or torch for this model, decided before any actor starts (see servable).
            config = engine_config_for(model_dir, config, on_gpu)
            pool = SamplerPool(model_dir, config, enable_lora=enable_lora, label=key)
            pool.start()
            service._sampler_pools[key] = pool
        return pool


# -- helpers ------------------------------------------------------------------------------


def _check_kwargs(kwargs: dict[str, Any]) -> None:
    unknown = set(kwargs) - _IGNORED_KWARGS
    if unknown:
        raise InvalidRequestError(f"unexpected arguments: {sorted(unknown)}")


def _prefixed(timings: dict[str, float]) -> dict[str, float]:
    return {f"time/sync_{key}": value for key, value in timings.items()}


def _tokenizer(pool: SamplerPool) -> Any:
    if pool.tokenizer is None:
        pool.tokenizer = load_tokenizer(pool.model_dir)
    return pool.tokenizer


__all__ = [
    "PendingSync",
    "SamplingClient",
    "begin_sync",
    "create_sampling_client",
    "finish_sync",
    "sampling_client_from_trainer",
]
