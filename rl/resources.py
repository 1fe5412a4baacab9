"""Reserving Ray resources for an actor, with a bound on the wait.

Ray queues an actor it cannot place and waits for resources forever, silently: on a 2-core
machine one actor too many hangs the caller. So every trainer and sampler actor first
reserves its CPUs/GPUs as a one-bundle placement group, waits for that reservation at most
`timeout_s`, and only then starts inside it. A reservation that does not come through is
removed (it changes nothing) and ends the call with `ResourcesUnavailableError`, naming the
resources asked for, what the cluster has, and what is free now.

A restarted actor keeps its reservation (Ray restarts it inside the same bundle), and an actor
that replaces a dead one reuses it, so neither waits again.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import ray
from ray.util.placement_group import (
    PlacementGroup,
    placement_group,
    remove_placement_group,
)
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from rl.errors import EngineRoomError


class ResourcesUnavailableError(EngineRoomError, RuntimeError):
    """An actor's resources could not be reserved within the configured time."""


@dataclass
class Reservation:
    """Resources held for one actor (`group` is None when it asks for nothing)."""

    what: str
    num_cpus: float
    num_gpus: float
    group: PlacementGroup | None

    def actor_options(self) -> dict[str, Any]:
        """Ray `.options(...)` that start an actor inside this reservation."""
        options: dict[str, Any] = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        if self.group is not None:
            options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                self.group, placement_group_bundle_index=0
            )
        return options

    def release(self) -> None:
        """Frees the resources; an actor still running inside is killed by Ray."""
        if self.group is not None:
            with contextlib.suppress(Exception):  # Ray already shut down
                remove_placement_group(self.group)
            self.group = None


def reserve(what: str, num_cpus: float, num_gpus: float, timeout_s: float) -> Reservation:
    """Reserves `num_cpus` / `num_gpus` for the actor `what`, waiting at most `timeout_s`."""
    bundle = {
        name: float(amount) for name, amount in (("CPU", num_cpus), ("GPU", num_gpus)) if amount > 0
    }
    if not bundle:  # nothing to wait for; Ray rejects an empty bundle
        return Reservation(what, num_cpus, num_gpus, None)
    group = placement_group([bundle])
    ready, _ = ray.wait([group.ready()], timeout=timeout_s)
    if not ready:
        with contextlib.suppress(Exception):
            remove_placement_group(group)
        raise ResourcesUnavailableError(
            f"{what} could not be scheduled within {timeout_s:g} s: it asks for "
            f"{_show(bundle)}, and the Ray cluster has {_show(ray.cluster_resources())} in all, "
            f"{_show(ray.available_resources())} free now. Close clients you no longer need, "
            "lower the reservation (TrainerConfig.num_cpus, SamplerConfig.num_cpus_per_actor / "
            "num_gpus_per_actor), or start Ray with more (ray.init(num_cpus=...), "
            "ServiceClient(num_cpus=...)); the wait is TrainerConfig/SamplerConfig."
            "schedule_timeout_s."
        )
    return Reservation(what, num_cpus, num_gpus, group)


def _show(resources: dict[str, float]) -> str:
    """CPU and GPU amounts only (Ray also lists memory and internal node/bundle keys)."""
    shown = {k: round(v, 4) for k, v in resources.items() if k in ("CPU", "GPU")}
    return str(shown or {"CPU": 0.0})
