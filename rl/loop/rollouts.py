"""Rollouts: run groups of envs against a `SamplingClient`, concurrently, into TrajectoryGroups.

Every group of a batch runs at once on one asyncio loop, and every turn of every env is its own
`sample` call, so many requests are in flight and the sampler batches them. A group whose envs
all open with the same observation (every single-turn problem group) samples its first turn
with one request of `num_samples = group_size`, which shares the prompt's prefill.

Errors, per rollout (one env's episode), by `RolloutConfig.error_policy`:

    fail   any error stops the batch with an error that names the group and the cause;
    retry  a sampler failure (or timeout) re-runs the sample call, up to `max_retries`
           times, then fails as above; an `EnvError` (a bug in the env or its reward) fails
           at once, since running it again gives the same answer;
    drop   the failed rollout leaves its group and is counted in `rollout_errors`; a group
           left empty is dropped whole and counted too.

A failed rollout is never scored as reward 0: that would teach the policy that whatever it
sampled deserved a zero. An observation that does not fit the context with `max_tokens`, and a
reward that is NaN or not a float, are `EnvError`s.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from envs.base import (
    Env,
    EnvError,
    EnvGroupBuilder,
    StopCondition,
    Trajectory,
    TrajectoryGroup,
    Transition,
)
from rl.errors import InvalidRequestError
from rl.types import ModelInput, SampledSequence, SamplingParams

ErrorPolicy = Literal["fail", "retry", "drop"]


class RolloutError(RuntimeError):
    """A rollout failed under the `fail` or `retry` policy; the message names group and cause."""


@dataclass(frozen=True)
class RolloutConfig:
    """How to sample one turn, and what to do when a rollout fails (see the module docstring)."""

    max_tokens: int
    temperature: float = 1.0
    max_context: int = 2048
    error_policy: ErrorPolicy = "fail"
    max_retries: int = 2
    timeout_s: float = 0.0  # per sample call; 0 = no limit
    max_turns: int = 32  # a multi-turn env that never ends is an env bug

    def sampling_params(self, stop: StopCondition) -> SamplingParams:
        return SamplingParams(max_tokens=self.max_tokens, temperature=self.temperature, stop=stop)


_LOGGED_ERRORS = 5  # failure messages a batch keeps for the log


@dataclass
class RolloutBatch:
    """The groups of one batch that produced at least one trajectory, and the failure counts."""

    groups: list[TrajectoryGroup]
    builders: list[EnvGroupBuilder]  # aligned with `groups`
    failed_rollouts: int = 0
    dropped_groups: int = 0
    retries: int = 0
    errors: list[str] = field(default_factory=list)  # first few messages, for the log

    def note_errors(self, messages: Sequence[str]) -> None:
        """Keeps the first `_LOGGED_ERRORS` failure messages."""
        self.errors.extend(messages[: max(0, _LOGGED_ERRORS - len(self.errors))])

    def absorb_failures(self, other: RolloutBatch) -> None:
        """Adds `other`'s failure counts and messages to this batch's."""
        self.failed_rollouts += other.failed_rollouts
        self.dropped_groups += other.dropped_groups
        self.retries += other.retries
        self.note_errors(other.errors)

    def metrics(self) -> dict[str, float]:
        return {
            "rollout/failed": float(self.failed_rollouts),
            "rollout/dropped_groups": float(self.dropped_groups),
            "rollout/retries": float(self.retries),
        }


@dataclass
class _Counters:
    retries: int = 0


class _Failed(Exception):
    """One rollout failed; carries the cause for the policy to judge."""

    def __init__(self, cause: BaseException):
        super().__init__(str(cause))
        self.cause = cause


async def run_batch(
    builders: Sequence[EnvGroupBuilder], sampling_client: Any, config: RolloutConfig
) -> RolloutBatch:
    """Rolls out every group of `builders` concurrently with the client's current weights."""
    counters = _Counters()
    results = await asyncio.gather(
        *(_run_group(b, sampling_client, config, counters) for b in builders),
        return_exceptions=config.error_policy != "drop",
    )
    # Under fail / retry the first error (in batch order) is raised, after every group has
    # settled, so no request is left running against a client the caller may replace.
    for g, result in enumerate(results):
        if isinstance(result, BaseException):
            raise _as_rollout_error(g, result) from result
    batch = RolloutBatch(groups=[], builders=[], retries=counters.retries)
    for builder, result in zip(builders, results, strict=True):
        assert not isinstance(result, BaseException)
        group, failed, messages = result
        batch.failed_rollouts += failed
        batch.note_errors(messages)
        if group is None:
            batch.dropped_groups += 1
        else:
            batch.groups.append(group)
            batch.builders.append(builder)
    return batch


def _as_rollout_error(g: int, error: BaseException) -> BaseException:
    cause = error.cause if isinstance(error, _Failed) else error
    if isinstance(cause, (KeyboardInterrupt, SystemExit, asyncio.CancelledError)):
        return cause
    kind = "env error" if isinstance(cause, EnvError) else type(cause).__name__
    return RolloutError(f"rollout of group {g} failed ({kind}): {cause}")


async def _run_group(
    builder: EnvGroupBuilder, client: Any, config: RolloutConfig, counters: _Counters
) -> tuple[TrajectoryGroup | None, int, list[str]]:
    """(group or None if every rollout failed, failed rollouts, their messages)."""
    envs = list(await builder.make_envs())
    if not envs:
        raise EnvError(f"{type(builder).__name__}.make_envs returned no envs")
    firsts = await asyncio.gather(
        *(_guard(env.initial_observation()) for env in envs), return_exceptions=True
    )
    first_actions: list[Any] = [None] * len(envs)
    shared = [i for i, f in enumerate(firsts) if not isinstance(f, BaseException)]
    if len(shared) > 1 and all(firsts[i] == firsts[shared[0]] for i in shared):
        observation, stop = firsts[shared[0]]  # type: ignore[misc]
        try:
            _check_fits(observation, config)
            sequences = await _sample(client, observation, stop, len(shared), config, counters)
            for i, sequence in zip(shared, sequences, strict=True):
                first_actions[i] = sequence
        except _Failed as failed:
            for i in shared:
                firsts[i] = failed
    episodes = await asyncio.gather(
        *(
            _episode(env, first, action, client, config, counters)
            for env, first, action in zip(envs, firsts, first_actions, strict=True)
        ),
        return_exceptions=True,
    )
    kept = [(env, e) for env, e in zip(envs, episodes, strict=True) if isinstance(e, Trajectory)]
    failures = [e for e in episodes if not isinstance(e, Trajectory)]
    for failure in failures:
        if config.error_policy != "drop" or not isinstance(failure, _Failed):
            raise failure
    messages = [str(f) for f in failures]
    if not kept:
        return None, len(failures), messages
    trajectories = [t for _, t in kept]
    try:
        rewards = await builder.compute_group_rewards(trajectories, [env for env, _ in kept])
        group = TrajectoryGroup(
            trajectories,
            [r for r, _ in rewards],
            [m for _, m in rewards],
            rollout_errors=len(failures),
        )
        group.total_rewards()  # a non-finite total is the env's fault, caught here
    except (EnvError, ValueError, TypeError) as error:
        if config.error_policy != "drop":
            raise _Failed(_env_error(error, "compute_group_rewards")) from error
        return None, len(envs), [*messages, str(error)]
    return group, len(failures), messages


async def _episode(
    env: Env,
    first: Any,
    first_action: SampledSequence | None,
    client: Any,
    config: RolloutConfig,
    counters: _Counters,
) -> Trajectory:
    """One env's episode: observe, sample, step until done."""
    if isinstance(first, BaseException):
        raise first
    observation, stop = first
    transitions: list[Transition] = []
    action = first_action
    for _ in range(config.max_turns):
        if action is None:
            _check_fits(observation, config)
            action = (await _sample(client, observation, stop, 1, config, counters))[0]
        result = await _guard(env.step(action.tokens))
        transitions.append(_transition(observation, action, result))
        if result.episode_done:
            return Trajectory(transitions)
        assert result.next_observation is not None and result.next_stop_condition is not None
        observation, stop, action = result.next_observation, result.next_stop_condition, None
    raise _Failed(EnvError(f"the episode did not end within max_turns={config.max_turns}"))


async def _sample(
    client: Any,
    observation: list[int],
    stop: StopCondition,
    num_samples: int,
    config: RolloutConfig,
    counters: _Counters,
) -> list[SampledSequence]:
    """One sample call with the retry policy; failures come out as `_Failed`."""
    params = config.sampling_params(stop)
    attempts = 1 + (config.max_retries if config.error_policy == "retry" else 0)
    for attempt in range(attempts):
        try:
            future = client.sample(ModelInput.from_ints(observation), num_samples, params)
            call = future.result_async() if hasattr(future, "result_async") else future
            response = await (
                asyncio.wait_for(call, config.timeout_s) if config.timeout_s else call
            )
            return list(response.sequences)
        except InvalidRequestError as error:
            # The sampler refused what the env asked for (a token id out of the vocabulary,
            # a bad stop condition): a bug in the env, so it is not retried.
            raise _Failed(EnvError(f"the sampler refused the env's request: {error}")) from None
        except Exception as error:
            if attempt + 1 >= attempts:
                cause = error if str(error) else RuntimeError(f"{type(error).__name__} (timeout?)")
                raise _Failed(cause) from None
            counters.retries += 1
    raise AssertionError("unreachable")


async def _guard(call: Any) -> Any:
    """Awaits an env call; any exception it raises is an env failure."""
    try:
        return await call
    except _Failed:
        raise
    except Exception as error:
        raise _Failed(_env_error(error, "env")) from None


def _env_error(error: BaseException, where: str) -> EnvError:
    if isinstance(error, EnvError):
        return error
    return EnvError(f"{where} raised {type(error).__name__}: {error}")


def _check_fits(observation: list[int], config: RolloutConfig) -> None:
    try:
        check_observation_fits(observation, config.max_context, config.max_tokens)
    except InvalidRequestError as error:
        raise _Failed(EnvError(str(error))) from None


def _transition(observation: list[int], action: SampledSequence, result: Any) -> Transition:
    try:
        return Transition(
            observation=list(observation),
            action_tokens=list(action.tokens),
            action_logprobs=_logprobs(action),
            reward=result.reward,
            episode_done=result.episode_done,
            metrics=result.metrics,
            stop_reason=action.stop_reason,
        )
    except EnvError as error:
        raise _Failed(error) from None


def _logprobs(sequence: SampledSequence) -> list[float]:
    """The sampler's logprob of each sampled token; missing or non-finite ones are errors."""
    logprobs = sequence.logprobs
    if logprobs is None or len(logprobs) != len(sequence.tokens):
        raise _Failed(RuntimeError("the sampler returned no logprob for some sampled tokens"))
    if not all(math.isfinite(lp) for lp in logprobs):
        raise _Failed(RuntimeError("the sampler returned a non-finite logprob"))
    return list(logprobs)


def check_observation_fits(tokens: Sequence[int], max_context: int, max_tokens: int = 0) -> None:
    """Raises if an observation plus `max_tokens` sampled tokens exceeds `max_context`."""
    if len(tokens) + max_tokens > max_context:
        raise InvalidRequestError(
            f"observation of {len(tokens)} tokens + max_tokens={max_tokens} exceeds the "
            f"context of {max_context} tokens"
        )
