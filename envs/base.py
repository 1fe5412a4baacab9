"""The contracts between environments and the RL loop, and the records a rollout produces.

An env speaks tokens: it hands out an observation (prompt tokens) and a stop condition, takes
the sampled action tokens, and answers with a reward and, for multi-turn envs, the next
observation. Envs are single use (no reset): an `EnvGroupBuilder` makes a fresh group of them
per problem, and the loop compares rewards within the group (GRPO-style advantages).

This package imports no torch, ray or vllm, and nothing from `rl` (whose package import pulls
in ray), so an env author installs nothing heavy. As in tinker-cookbook's `rl/types.py`, except:
observations are plain token lists (not `ModelInput`), and `make_envs` / `compute_group_rewards`
are async so builders may do I/O (start a sandbox, call a judge).
"""

from __future__ import annotations

import math
import numbers
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

Tokens = list[int]
Metrics = dict[str, float]
# Strings or token ids that end a sampled turn (`SamplingParams.stop`).
StopCondition = list[str] | list[int]
StopReason = Literal["stop", "length"]


class EnvError(ValueError):
    """An env or reward function broke its contract (e.g. a reward that is not a finite float)."""


def check_reward(value: object, where: str) -> float:
    """Returns `value` as a float, or raises EnvError if it is not a finite real number.

    bool is refused on purpose: `lambda r: r == answer` is almost always a bug in disguise.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise EnvError(f"{where}: reward must be a float, got {type(value).__name__} {value!r}")
    reward = float(value)
    if not math.isfinite(reward):
        raise EnvError(f"{where}: reward must be finite, got {reward}")
    return reward


def check_metrics(metrics: object, where: str) -> Metrics:
    """Metrics must map str to finite-or-not floats (NaN is allowed: a metric can be undefined)."""
    if not isinstance(metrics, dict):
        raise EnvError(f"{where}: metrics must be a dict, got {type(metrics).__name__}")
    out: Metrics = {}
    for key, value in metrics.items():
        if (
            not isinstance(key, str)
            or isinstance(value, bool)
            or not isinstance(value, numbers.Real)
        ):
            raise EnvError(f"{where}: metric {key!r}={value!r} must be str -> float")
        out[key] = float(value)
    return out


@dataclass(frozen=True)
class StepResult:
    """What an env answers to one action. The reward is validated here, at the env boundary."""

    reward: float
    episode_done: bool
    next_observation: Tokens | None = None
    next_stop_condition: StopCondition | None = None
    metrics: Metrics = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "reward", check_reward(self.reward, "StepResult.reward"))
        object.__setattr__(self, "metrics", check_metrics(self.metrics, "StepResult.metrics"))
        if not self.episode_done and (
            self.next_observation is None or self.next_stop_condition is None
        ):
            raise EnvError(
                "StepResult: an episode that is not done needs next_observation "
                "and next_stop_condition"
            )


class Env(Protocol):
    """One episode. Call `initial_observation` once, then `step` until `episode_done`."""

    async def initial_observation(self) -> tuple[Tokens, StopCondition]: ...

    async def step(self, action: Tokens) -> StepResult: ...


class EnvGroupBuilder(ABC):
    """Makes a group of envs for one problem; subclass it and implement `make_envs`.

    Must be picklable (keep callables module-level functions or `functools.partial`s, not
    lambdas), so rollouts can run in other processes.
    """

    @abstractmethod
    async def make_envs(self) -> Sequence[Env]:
        """A fresh env per group member (async, so a builder may start sandboxes or the like)."""

    async def compute_group_rewards(
        self, trajectories: Sequence[Trajectory], envs: Sequence[Env]
    ) -> list[tuple[float, Metrics]]:
        """Rewards that need the whole group (pairwise, ranking), added to the step rewards."""
        return [(0.0, {}) for _ in trajectories]

    def logging_tags(self) -> list[str]:
        """Names to group metrics by (e.g. the dataset name)."""
        return []


@dataclass(frozen=True)
class Transition:
    """One turn: the observation, what was sampled (with the sampler's logprobs), the reward."""

    observation: Tokens
    action_tokens: Tokens
    action_logprobs: list[float]
    reward: float
    episode_done: bool
    metrics: Metrics = field(default_factory=dict)
    stop_reason: StopReason = "stop"

    def __post_init__(self) -> None:
        object.__setattr__(self, "reward", check_reward(self.reward, "Transition.reward"))
        if len(self.action_logprobs) != len(self.action_tokens):
            raise EnvError(
                f"Transition: {len(self.action_tokens)} action tokens but "
                f"{len(self.action_logprobs)} logprobs"
            )


@dataclass(frozen=True)
class Trajectory:
    """One episode. `final_observation` is what the env would show next (often empty)."""

    transitions: list[Transition]
    final_observation: Tokens = field(default_factory=list)

    @property
    def step_reward(self) -> float:
        return sum(t.reward for t in self.transitions)


@dataclass(frozen=True)
class TrajectoryGroup:
    """The episodes of one `EnvGroupBuilder`, with group rewards from `compute_group_rewards`.

    `rollout_errors` counts episodes that failed and were dropped from `trajectories`.
    """

    trajectories: list[Trajectory]
    final_rewards: list[float]
    metrics: list[Metrics]
    rollout_errors: int = 0

    def __post_init__(self) -> None:
        n = len(self.trajectories)
        if len(self.final_rewards) != n or len(self.metrics) != n:
            raise EnvError(
                f"TrajectoryGroup: {n} trajectories but {len(self.final_rewards)} final rewards "
                f"and {len(self.metrics)} metrics"
            )
        for i, (reward, metrics) in enumerate(zip(self.final_rewards, self.metrics, strict=True)):
            check_reward(reward, f"TrajectoryGroup.final_rewards[{i}]")
            check_metrics(metrics, f"TrajectoryGroup.metrics[{i}]")

    def total_rewards(self) -> list[float]:
        """Per trajectory: the sum of its step rewards plus its group reward."""
        return [
            check_reward(traj.step_reward + final, f"trajectory {i} total reward")
            for i, (traj, final) in enumerate(
                zip(self.trajectories, self.final_rewards, strict=True)
            )
        ]


class RLDataset(Protocol):
    """Batches of group builders. `get_batch(i)` must be deterministic given the dataset's seed."""

    def get_batch(self, index: int) -> list[EnvGroupBuilder]: ...

    def __len__(self) -> int: ...
