"""The trainer as a Ray actor: a thin shell around `LoraTrainer`.

The actor runs one call at a time (max_concurrency=1), which makes every trainer method
atomic; per-client ordering is kept by each client's own queue (rl.futures.OrderedQueue).
Ray pins OMP_NUM_THREADS to the actor's CPU reservation, and OpenMP reads it when torch loads,
before the actor runs: torch.set_num_threads alone then leaves the kernels ~10% slower (as for
the samplers, samplers/pool.py). So the actor's environment sets it to the trainer's thread
count (TrainerConfig.num_threads), and reserving 1 logical CPU does not starve it of cores.
Its resources are reserved first, with a bounded wait (rl.resources): a trainer that cannot
be placed raises instead of hanging.
"""

from __future__ import annotations

from typing import Any

import ray

from rl.resources import Reservation, reserve
from trainers.config import TrainerConfig
from trainers.engine import LoraTrainer


def start_trainer_actor(
    base_model: str, config: TrainerConfig, reservation: Reservation | None = None
) -> tuple[Any, Reservation]:
    """Starts a trainer actor for `base_model` (GPU-backed when the config asks for CUDA);
    returns it with its reservation, which the caller releases when done with the actor.
    A restart passes the dead actor's `reservation`, so it does not wait for resources."""
    if reservation is None:
        wants_gpu = config.uses_gpu(ray.cluster_resources().get("GPU", 0))
        reservation = reserve(
            f"the trainer actor for {base_model!r}",
            config.num_cpus,
            1.0 if wants_gpu else 0.0,
            config.schedule_timeout_s,
        )
    actor_cls = ray.remote(LoraTrainer)
    actor = actor_cls.options(  # type: ignore[attr-defined]
        **reservation.actor_options(),
        max_concurrency=1,
        max_restarts=0,
        runtime_env={"env_vars": {"OMP_NUM_THREADS": str(config.resolved_threads())}},
    ).remote(base_model, config)
    return actor, reservation
