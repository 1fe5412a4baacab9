"""The learning-rate schedules the loops share (`rl.loop.train` and `rl.loop.sft`)."""

from __future__ import annotations

import math
from typing import Literal

from rl.errors import InvalidRequestError

LrSchedule = Literal["constant", "linear", "cosine"]
LR_SCHEDULES: tuple[LrSchedule, ...] = ("constant", "linear", "cosine")


def lr_multiplier(
    schedule: LrSchedule, step: int, total_steps: int, warmup_steps: int = 0, min_ratio: float = 0.0
) -> float:
    """The learning-rate factor of `step` (0-based) in a run of `total_steps`.

    Warmup: (step + 1) / warmup_steps for the first warmup_steps steps. Then, with
    p = (step - warmup) / (total - warmup) going from 0 towards 1: constant 1, linear
    1 - (1 - min_ratio) * p, cosine min_ratio + (1 - min_ratio) * (1 + cos(pi * p)) / 2.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if schedule == "constant":
        return 1.0
    if schedule == "linear":
        return 1.0 - (1.0 - min_ratio) * progress
    if schedule == "cosine":
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise InvalidRequestError(f"unknown lr_schedule {schedule!r}")
