"""Dynamic sampling, bounded: a step's batch is topped up with groups whose rewards differ.

A group whose rewards are all equal has zero advantages and teaches nothing; once most
problems come back all right (or all wrong), `remove_constant_groups` leaves a step only a
handful of groups, and the step is a full-size optimizer update on a few samples. DAPO samples
more problems until the batch holds enough groups with a signal. Here that is bounded: at most
`rounds` extra rounds of fresh problems per step, each adding its non-constant groups until the
batch holds `min_groups` of them (extra constant groups are dropped: they would only dilute the
token mean). The first round's groups all stay, so the batch's `env/` metrics describe the
policy as before, over its first `planned` groups.

The extra problems come from the far end of the training dataset, counting down (round r of
step s reads batch len - 1 - (s * rounds + r)), so a run's data is fixed by its config and a
resumed run samples what it would have.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from envs.base import TrajectoryGroup
from rl.loop.datums import is_informative
from rl.loop.rollouts import RolloutBatch


def count_informative(groups: Sequence[TrajectoryGroup]) -> int:
    return sum(is_informative(group) for group in groups)


def extra_batch_index(step: int, round_: int, rounds: int, num_batches: int) -> int:
    """The dataset batch that extra round `round_` (0-based) of step `step` samples."""
    return (num_batches - 1 - (step * rounds + round_)) % num_batches


def needs_more(batch: RolloutBatch, min_groups: int, cap: int) -> bool:
    """Whether the batch holds fewer than min(min_groups, cap) non-constant groups."""
    return count_informative(batch.groups) < min(min_groups, cap)


def top_up(batch: RolloutBatch, extra: RolloutBatch, cap: int) -> int:
    """Appends `extra`'s non-constant groups (in order) to `batch` until it holds `cap`
    non-constant groups; adds its failure counts. Returns how many groups were added."""
    room = cap - count_informative(batch.groups)
    added = 0
    for group, builder in zip(extra.groups, extra.builders, strict=True):
        if added >= room:
            break
        if is_informative(group):
            batch.groups.append(group)
            batch.builders.append(builder)
            added += 1
    batch.absorb_failures(extra)
    return added


@dataclass
class DynamicBatch:
    """A step's batch after dynamic sampling: its first `planned` groups are the step's own
    problems, the rest came from `rounds` extra rounds; all from curriculum stage `stage`
    (rl/loop/curriculum.py), and the step after it samples stage `next_stage`."""

    batch: RolloutBatch
    planned: int
    rounds: int = 0
    sampled_groups: int = 0  # every group sampled this step, the extra rounds' constant ones too
    stage: int = 0
    next_stage: int = 0

    @property
    def planned_groups(self) -> list[TrajectoryGroup]:
        return self.batch.groups[: self.planned]

    def metrics(self) -> dict[str, float]:
        return {
            "dynamic/rounds": float(self.rounds),
            "dynamic/added_groups": float(len(self.batch.groups) - self.planned),
            "dynamic/sampled_groups": float(self.sampled_groups),
        }
