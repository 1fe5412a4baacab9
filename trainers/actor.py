"""The trainer as a Ray actor: a thin shell around `LoraTrainer`.

The actor runs one call at a time (max_concurrency=1), which makes every trainer method
atomic; per-client ordering is kept by each client's own queue (rl.futures.OrderedQueue).
Ray pins OMP_NUM_THREADS to the actor's CPU reservation, and OpenMP reads it when torch loads,
before the actor runs: torch.set_num_threads alone then leaves the kernels ~10% slower (as for
the samplers, samplers/pool.py). So the actor's environment sets it to the trainer's thread
count (TrainerConfig.num_threads), and reserving 1 logical CPU does not starve it of cores.
Its resources are reserved first, with a bounded wait (rl.placement): a trainer that cannot
be placed raises instead of hanging. A sharded trainer (`TrainerConfig.world_size` N > 1) is N
such actors, one reservation each, started and joined by trainers/sharded.py.
"""

from __future__ import annotations

from typing import Any

import ray

from rl.placement import Reservation, reserve_bundles
from trainers.config import TrainerConfig


def reserve_trainer(base_model: str, config: TrainerConfig) -> list[Reservation]:
    """One reservation per trainer rank, all in one placement group, whose strategy
    (`TrainerConfig.placement_strategy`) places the ranks: PACK / STRICT_PACK on as few nodes
    as possible / on one, SPREAD / STRICT_SPREAD over nodes. All or none."""
    ranks = f" ({config.world_size} ranks)" if config.world_size > 1 else ""
    return reserve_bundles(
        f"the trainer actor for {base_model!r}{ranks}",
        config.world_size,
        config.num_cpus,
        config.resolved_gpus(ray.cluster_resources().get("GPU", 0)),
        config.schedule_timeout_s,
        config.resources,
        config.placement_strategy,
    )


def start_trainer(
    base_model: str, config: TrainerConfig, reservations: list[Reservation]
) -> list[Any]:
    """Starts the trainer for `base_model` in `reservations` (one per rank, see
    `reserve_trainer`); returns its actors, rank 0 first: the one clients call. A restart
    passes the dead trainer's reservations, so it does not wait for resources."""
    options = [
        {
            **reservation.actor_options(),
            "max_concurrency": 1,
            "max_restarts": 0,
            "runtime_env": {"env_vars": {"OMP_NUM_THREADS": str(config.resolved_threads())}},
        }
        for reservation in reservations
    ]
    if config.world_size > 1:
        from trainers.sharded import start_ranks

        return start_ranks(base_model, config, options)
    # Imported here: the driver needs the class only to start it (peft loads with it).
    from trainers.trainer import LoraTrainer

    return [ray.remote(LoraTrainer).options(**options[0]).remote(base_model, config)]  # type: ignore[attr-defined]
