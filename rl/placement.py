"""Placement: where an actor runs (GPU shares, custom resources) and its bounded reservation.

The configs (TrainerConfig, SamplerConfig, the entry points' configs) check GPU shares and
custom resources where they are built, in processes that may not have Ray (the GPU check,
bench/gpu_check.py), so Ray is imported only by the functions that reserve.

Ray queues an actor it cannot place and waits for resources forever, silently: on a 2-core
machine one actor too many hangs the caller. So every trainer and sampler actor first
reserves its CPUs/GPUs as a placement group, waits for that reservation at most `timeout_s`,
and only then starts inside it. A reservation that does not come through is removed (it
changes nothing) and ends the call with `ResourcesUnavailableError`, naming the resources
asked for, what the cluster has, and what is free now.

A restarted actor keeps its reservation (Ray restarts it inside the same bundle), and an actor
that replaces a dead one reuses it, so neither waits again.

Besides CPUs and GPUs (a fraction of one GPU is allowed, so that a trainer and a sampler can
share it), a reservation may hold custom resources, the names a node was started with
(`ray start --resources '{"trainer_node": 1}'`): asking for one pins the actor to such a node.
"""

from __future__ import annotations

import contextlib
import math
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from rl.errors import EngineRoomError, InvalidRequestError

if TYPE_CHECKING:
    from ray.util.placement_group import PlacementGroup

Strategy = Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"]
STRATEGIES: tuple[Strategy, ...] = typing.get_args(Strategy)


def check_gpus(num_gpus: float, what: str) -> None:
    """A share of one GPU, or whole GPUs: Ray schedules nothing in between (1.5 GPUs)."""
    if not (math.isfinite(num_gpus) and num_gpus >= 0) or (
        num_gpus > 1 and not float(num_gpus).is_integer()
    ):
        raise InvalidRequestError(
            f"{what}: num_gpus={num_gpus!r}; expected a fraction of one GPU (0 to 1) or a "
            "whole number of GPUs"
        )


def check_resources(resources: Mapping[str, float], what: str) -> dict[str, float]:
    """Custom resources as Ray takes them: names other than CPU/GPU, positive finite amounts."""
    out: dict[str, float] = {}
    for name, amount in resources.items():
        if not isinstance(name, str) or not name or name in ("CPU", "GPU", "memory"):
            raise InvalidRequestError(
                f"{what}: custom resource name {name!r} is not allowed (CPU and GPU have "
                "their own settings)"
            )
        value = float(amount)
        if not (math.isfinite(value) and value > 0):
            raise InvalidRequestError(
                f"{what}: custom resource {name!r}={amount!r} must be a positive number"
            )
        out[name] = value
    return out


def parse_resources(text: str, key: str) -> dict[str, float]:
    """'trainer_node=1,fast_disk=0.5' -> {'trainer_node': 1.0, 'fast_disk': 0.5}."""
    out: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, raw = item.partition("=")
        try:
            out[name.strip()] = float(raw)
        except ValueError:
            sep = ""
        if not sep:
            raise InvalidRequestError(
                f"{key}={text!r}: item {item!r} is not name=amount (e.g. trainer_node=1)"
            )
    return check_resources(out, key)


class ResourcesUnavailableError(EngineRoomError, RuntimeError):
    """An actor's resources could not be reserved within the configured time."""


@dataclass
class Reservation:
    """Resources held for one actor (`group` is None when it asks for nothing)."""

    what: str
    num_cpus: float
    num_gpus: float
    group: PlacementGroup | None
    resources: dict[str, float] = field(default_factory=dict)  # custom resources
    bundle_index: int = 0  # this actor's bundle in a group shared by several (reserve_bundles)

    def actor_options(self) -> dict[str, Any]:
        """Ray `.options(...)` that start an actor inside this reservation."""
        options: dict[str, Any] = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        if self.resources:
            options["resources"] = dict(self.resources)
        if self.group is not None:
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

            options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                self.group, placement_group_bundle_index=self.bundle_index
            )
        return options

    def release(self) -> None:
        """Frees the resources; an actor still running inside is killed by Ray."""
        if self.group is not None:
            from ray.util.placement_group import remove_placement_group

            with contextlib.suppress(Exception):  # Ray already shut down
                remove_placement_group(self.group)
            self.group = None


def reserve(
    what: str,
    num_cpus: float,
    num_gpus: float,
    timeout_s: float,
    resources: Mapping[str, float] | None = None,
    strategy: Strategy = "PACK",
) -> Reservation:
    """Reserves `num_cpus` / `num_gpus` / custom `resources` for the actor `what`, waiting at
    most `timeout_s`; `strategy` is the placement group's (rl.placement.Strategy)."""
    return reserve_bundles(what, 1, num_cpus, num_gpus, timeout_s, resources, strategy)[0]


def reserve_bundles(
    what: str,
    count: int,
    num_cpus: float,
    num_gpus: float,
    timeout_s: float,
    resources: Mapping[str, float] | None = None,
    strategy: Strategy = "PACK",
) -> list[Reservation]:
    """`count` actors' resources as one placement group of `count` equal bundles, placed by
    `strategy` (STRICT_PACK: all on one node; SPREAD: over nodes), all or nothing. Each
    returned reservation starts one actor in its own bundle; releasing one frees them all."""
    custom = check_resources(resources or {}, what)
    check_gpus(num_gpus, what)
    bundle = {
        name: float(amount)
        for name, amount in (("CPU", num_cpus), ("GPU", num_gpus), *custom.items())
        if amount > 0
    }
    if not bundle:  # nothing to wait for; Ray rejects an empty bundle
        return [Reservation(what, num_cpus, num_gpus, None, custom) for _ in range(count)]
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    group = placement_group([bundle] * count, strategy=strategy)
    ready, _ = ray.wait([group.ready()], timeout=timeout_s)
    if not ready:
        with contextlib.suppress(Exception):
            remove_placement_group(group)
        keys = set(bundle)
        times = f"{count} x " if count > 1 else ""
        raise ResourcesUnavailableError(
            f"{what} could not be scheduled within {timeout_s:g} s: it asks for "
            f"{times}{_show(bundle, keys)} ({strategy}), and the Ray cluster has "
            f"{_show(ray.cluster_resources(), keys)} in all, "
            f"{_show(ray.available_resources(), keys)} free now. Close clients you no longer "
            "need, lower the reservation (TrainerConfig.num_cpus / num_gpus / resources, "
            "SamplerConfig.num_cpus_per_actor / num_gpus_per_actor / resources_per_actor), or "
            "start Ray with more (ray.init(num_cpus=...), ServiceClient(num_cpus=...), "
            "ray start --resources ... for custom resources); the wait is "
            "TrainerConfig/SamplerConfig.schedule_timeout_s."
        )
    return [Reservation(what, num_cpus, num_gpus, group, custom, i) for i in range(count)]


def _show(resources: dict[str, float], keys: set[str]) -> str:
    """The amounts of `keys` only (Ray also lists memory and internal node/bundle keys)."""
    shown = {k: round(resources.get(k, 0.0), 4) for k in sorted(keys)}
    return str(shown or {"CPU": 0.0})
