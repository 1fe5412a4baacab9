"""Placement settings without Ray: checks and parsing of GPU shares and custom resources.

The configs (TrainerConfig, SamplerConfig, the entry points' flat configs) check these where
they are built, in processes that may not have Ray (the GPU check, bench/gpu_check.py);
`rl.resources` turns them into Ray reservations.
"""

from __future__ import annotations

import math
import typing
from collections.abc import Mapping
from typing import Literal

from rl.errors import InvalidRequestError

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
