"""Weight sync: the trainer's current weights pushed to the samplers, and checked there.

A sync has two halves. `begin` runs on the training client's ordered queue, after the client's
earlier calls: it has the trainer export the weights (the LoRA adapter, or the merged full
weights) and score a probe sequence, both as Ray objects, and returns a `PendingSync` as soon as
that work is queued on the trainer, so the trainer may go on with later calls. `finish` loads
the weights on every sampler actor of the pool, has each score the probe with them, and compares
(samplers/sync_check.py): a sync that did not take effect raises `WeightSyncError`. Syncs of one
training client finish in the order they began. The RL loop's off-policy mode uses the split to
train the next batch while the samplers load; `save_weights_and_get_sampling_client` runs both.

Modes (`SamplerConfig.sync_mode`): "adapter" loads the LoRA adapter into the running engines
under a fresh version (many adapters per engine); "merged" merges it into the base weights of a
pool of the client's own (the default on CPU, where vLLM's LoRA kernels are slow) and keeps the
adapter too, for the sampling client to fall back on once a later sync replaced the merge
(rl/client/pools.py, `AdapterBackup`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import ray

from rl.client.pools import AdapterBackup, SamplerPools
from rl.client.sampling import SamplingClient, pool_tokenizer
from rl.errors import InvalidRequestError
from rl.futures import Turns
from rl.types import Datum, ModelInput, SamplingParams
from samplers.pool import SamplerPool, submit
from samplers.sync_check import ProbeScores, check_sync, default_tolerance, probe_tokens
from samplers.types import WeightsVersion
from samplers.validation import build_request
from trainers.config import TrainerConfig


@dataclass(frozen=True)
class Probe:
    """The probe tokens and an ObjectRef of the trainer's logprobs of them."""

    tokens: list[int]
    trainer_logprobs: Any


@dataclass(frozen=True)
class PendingSync:
    """A sync whose trainer half is done: the weights to push and the trainer's probe scores
    are Ray objects, computed or queued on the trainer before any later call of the client."""

    model_id: str
    base_model: str
    lora_rank: int
    trainer_dtype: str
    pools: SamplerPools
    pool: SamplerPool
    mode: str
    source: Any  # ObjectRef: the adapter tensors or the merged state dict
    probe: Probe | None
    turns: Turns
    ticket: int
    began: float
    backup_source: Any = None  # merged mode: ObjectRef of the adapter (AdapterBackup)


def begin(
    trainer: Any,
    *,
    model_id: str,
    base_model: str,
    lora_rank: int,
    trainer_config: TrainerConfig,
    pools: SamplerPools,
    sync_mode: str | None,
    turns: Turns,
) -> PendingSync:
    """The trainer half of a sync of adapter `model_id` on `trainer` (an actor handle). Call it
    in the training client's queue; every PendingSync must then go to `finish`."""
    if sync_mode not in (None, "adapter", "merged"):
        raise InvalidRequestError(f"sync_mode={sync_mode!r}; expected 'adapter' or 'merged'")
    began = time.perf_counter()
    model_dir = ray.get(trainer.base_model_path.remote())
    mode, pool = pools.for_sync(model_dir, model_id, sync_mode)
    assert pool.info is not None
    backup_source = None
    if mode == "adapter":
        if lora_rank > pool.info.max_lora_rank:
            raise InvalidRequestError(
                f"LoRA rank {lora_rank} is above the sampler's max_lora_rank "
                f"{pool.info.max_lora_rank} (raise SamplerConfig.max_lora_rank, or sync with "
                "sync_mode='merged')"
            )
        source = trainer.adapter_weights.remote(model_id)
    else:
        backup_source = trainer.adapter_weights.remote(model_id)
        # vLLM samplers merge the adapter into their own copy of the base (samplers/merge.py):
        # 20 MB cross the object store instead of the whole model.
        vllm = pool.info.engine == "vllm"
        source = backup_source if vllm else trainer.merged_weights.remote(model_id)
    probe = trainer_probe(trainer, model_id, pool) if pools.config.verify_sync else None
    # A barrier behind the exports: once it answers, the weights are in Ray's object store and
    # outlive the trainer; a trainer that died before raises here, inside the client's queue,
    # which restarts it and runs this sync again (rl/client/trainer_host.py).
    ray.get(trainer.base_model_path.remote())
    on_gpu = trainer_config.uses_gpu(ray.cluster_resources().get("GPU", 0))
    return PendingSync(
        model_id=model_id,
        base_model=base_model,
        lora_rank=lora_rank,
        trainer_dtype=trainer_config.resolved_dtype(on_gpu),
        pools=pools,
        pool=pool,
        mode=mode,
        source=source,
        probe=probe,
        turns=turns,
        ticket=turns.take(),
        began=began,
        backup_source=backup_source,
    )


def finish(pending: PendingSync) -> SamplingClient:
    """Loads the weights of `pending` on its pool, checks them, returns their client; syncs of
    one training client finish in the order they began."""
    with pending.turns.turn(pending.ticket):
        return push_and_verify(pending)


def push_and_verify(pending: PendingSync) -> SamplingClient:
    """Loads `pending.source` as a new version on every actor of its pool and checks it against
    the trainer's probe scores."""
    pool = pending.pool
    weights = pool.new_version(pending.mode, pending.model_id)
    timings = submit(pool.push(weights, pending.source)).result()
    metrics = {"time/sync_s": time.perf_counter() - pending.began}
    metrics.update({f"time/sync_{key}": value for key, value in timings.items()})
    if pending.probe is not None:
        metrics.update(_verify(pending, weights))
    backup = None
    if pending.mode == "merged" and pending.backup_source is not None:
        backup = AdapterBackup(
            pending.pools, pending.model_id, pending.lora_rank, pending.backup_source
        )
    return SamplingClient(pool, weights, pending.base_model, metrics, backup)


def trainer_probe(trainer: Any, model_id: str, pool: SamplerPool) -> Probe:
    """The probe, and the trainer's logprobs of it at the weights as of this call (queued on
    the trainer actor before any later call)."""
    assert pool.info is not None
    tokens = probe_tokens(pool_tokenizer(pool), pool.info.vocab_size)
    datum = Datum.model_validate(
        {
            "model_input": ModelInput.from_ints(tokens[:-1]),
            "loss_fn_inputs": {"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)},
        }
    )
    return Probe(tokens, trainer.forward.remote(model_id, [datum]))


def _verify(pending: PendingSync, weights: WeightsVersion) -> dict[str, float]:
    """Compares every sampler actor's probe logprobs with the trainer's (samplers/sync_check)."""
    pool, probe = pending.pool, pending.probe
    assert pool.info is not None and probe is not None
    start = time.perf_counter()
    request = build_request(
        probe.tokens, 1, SamplingParams(max_tokens=1, temperature=0.0), pool.info,
        include_prompt_logprobs=True, weights=weights,
    )  # fmt: skip
    responses = submit(pool.sample_on_each(request)).result()
    trainer_logprobs = ray.get(probe.trainer_logprobs).loss_fn_outputs[0]["logprobs"].tolist()
    scores = ProbeScores(
        trainer=[float(x) for x in trainer_logprobs],
        samplers=[[float(x or 0.0) for x in (r.prompt_logprobs or [])[1:]] for r in responses],
    )
    config = pending.pools.config
    tolerance = config.sync_tolerance or default_tolerance(pool.info.dtype, pending.trainer_dtype)
    previous = pool.probe_scores.get(pending.model_id)
    metrics = check_sync(scores, previous, tolerance, f"{pending.model_id!r}")
    pool.probe_scores[pending.model_id] = scores
    return {**metrics, "time/sync_verify_s": time.perf_counter() - start}


__all__ = ["PendingSync", "Probe", "begin", "finish", "push_and_verify", "trainer_probe"]
