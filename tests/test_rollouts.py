"""Rollouts against a real sampler (torch engine, tiny random model): concurrency, the shape of
trajectories, and the error policies (fail / retry / drop), with envs that break on purpose."""

from __future__ import annotations

import asyncio
import math
import threading
from dataclasses import dataclass

import pytest

from envs.base import EnvGroupBuilder, StepResult
from rl.loop.rollouts import RolloutConfig, RolloutError, run_batch

STOP = [2]


@pytest.fixture(scope="module")
def client(torch_service, tiny_model):
    return torch_service.create_sampling_client(base_model=tiny_model)


class CountingClient:
    """Wraps a real sampling client: counts calls and requests in flight, fails on demand."""

    def __init__(self, inner, fail_first: int = 0):
        self.inner = inner
        self.fail_first = fail_first
        self.calls = 0
        self.inflight = 0
        self.max_inflight = 0
        self._lock = threading.Lock()

    def sample(self, prompt, num_samples=1, sampling_params=None):
        with self._lock:
            self.calls += 1
            if self.calls <= self.fail_first:
                raise ConnectionError(f"sampler unavailable (call {self.calls})")
            self.inflight += 1
            self.max_inflight = max(self.max_inflight, self.inflight)
        future = self.inner.sample(prompt, num_samples, sampling_params)
        future.future().add_done_callback(lambda _: self._done())
        return future

    def _done(self) -> None:
        with self._lock:
            self.inflight -= 1


class LengthEnv:
    """Single turn; reward = number of sampled tokens / 10 (varies within a group)."""

    def __init__(self, prompt: list[int], reward: float | None = None):
        self.prompt = prompt
        self.reward = reward

    async def initial_observation(self):
        return self.prompt, STOP

    async def step(self, action):
        reward = len(action) / 10 if self.reward is None else self.reward
        return StepResult(reward=reward, episode_done=True, metrics={"len": float(len(action))})


class TwoTurnEnv:
    """Two turns; the second observation extends the first observation + action."""

    def __init__(self, prompt: list[int]):
        self.prompt = prompt
        self.turn = 0

    async def initial_observation(self):
        return self.prompt, STOP

    async def step(self, action):
        self.turn += 1
        if self.turn == 2:
            return StepResult(reward=1.0, episode_done=True)
        return StepResult(0.0, False, [*self.prompt, *action, 5, 6, 7], STOP)


@dataclass(frozen=True)
class Builder(EnvGroupBuilder):
    prompt: tuple[int, ...]
    size: int = 3
    kind: str = "length"
    bad_member: int = -1  # this member's reward is `bad_reward`
    bad_reward: object = math.nan

    async def make_envs(self):
        envs = []
        for i in range(self.size):
            if self.kind == "two_turn":
                envs.append(TwoTurnEnv(list(self.prompt)))
            else:
                reward = self.bad_reward if i == self.bad_member else None
                envs.append(LengthEnv(list(self.prompt), reward))  # type: ignore[arg-type]
        return envs


def config(**kwargs) -> RolloutConfig:
    return RolloutConfig(**{"max_tokens": 6, "max_context": 512, **kwargs})


def run(builders, client, **kwargs):
    return asyncio.run(run_batch(builders, client, config(**kwargs)))


def test_groups_run_concurrently_one_request_per_shared_prompt(client):
    counting = CountingClient(client)
    builders = [Builder(prompt=(1, 100 + g, 200 + g), size=3) for g in range(5)]
    batch = run(builders, counting)
    # One request per group (the 3 members share the prompt), all in flight together.
    assert counting.calls == 5
    assert counting.max_inflight >= 3
    assert len(batch.groups) == 5 and batch.failed_rollouts == 0
    for builder, group in zip(builders, batch.groups, strict=True):
        assert len(group.trajectories) == 3
        for trajectory in group.trajectories:
            (transition,) = trajectory.transitions
            assert transition.observation == list(builder.prompt)
            assert 1 <= len(transition.action_tokens) <= 6
            assert len(transition.action_logprobs) == len(transition.action_tokens)
            assert all(lp <= 0 for lp in transition.action_logprobs)
            assert transition.reward == len(transition.action_tokens) / 10


def test_multi_turn_episode(client):
    batch = run([Builder(prompt=(1, 2, 3), size=2, kind="two_turn")], client)
    for trajectory in batch.groups[0].trajectories:
        first, second = trajectory.transitions
        assert second.observation[: len(first.observation)] == first.observation
        assert second.observation[-3:] == [5, 6, 7]
        assert trajectory.step_reward == 1.0


@pytest.mark.parametrize("bad_reward", [math.nan, "1.0"])
def test_fail_policy_names_the_group_and_cause(client, bad_reward):
    builders = [Builder((1, 2)), Builder((1, 3), bad_member=1, bad_reward=bad_reward)]
    with pytest.raises(RolloutError, match=r"group 1 failed \(env error\).*reward"):
        run(builders, client, error_policy="fail")


def test_drop_policy_drops_bad_rollouts_without_scoring_them(client):
    builders = [
        Builder((1, 2)),
        Builder((1, 3), bad_member=0),
        Builder((1, 4), size=1, bad_member=0),  # its only member fails: the group goes
    ]
    batch = run(builders, client, error_policy="drop")
    assert batch.failed_rollouts == 2 and batch.dropped_groups == 1
    assert [len(g.trajectories) for g in batch.groups] == [3, 2]
    assert batch.groups[1].rollout_errors == 1
    # The dropped rollout is gone, not scored 0: every remaining reward is its length / 10.
    for group in batch.groups:
        for trajectory in group.trajectories:
            assert trajectory.step_reward == len(trajectory.transitions[0].action_tokens) / 10
    assert batch.metrics()["rollout/failed"] == 2


def test_observation_longer_than_context_is_an_env_error(client):
    long_prompt = tuple(range(1, 600))
    with pytest.raises(RolloutError, match="exceeds the context"):
        run([Builder(long_prompt)], client, error_policy="fail")
    batch = run([Builder(long_prompt), Builder((1, 2))], client, error_policy="drop")
    assert batch.dropped_groups == 1 and batch.failed_rollouts == 3 and len(batch.groups) == 1


def test_retry_policy_recovers_from_sampler_failures(client):
    flaky = CountingClient(client, fail_first=2)
    batch = run([Builder((1, 2))], flaky, error_policy="retry", max_retries=2)
    assert batch.retries == 2 and len(batch.groups[0].trajectories) == 3

    flaky = CountingClient(client, fail_first=3)
    with pytest.raises(RolloutError, match="ConnectionError"):
        run([Builder((1, 2))], flaky, error_policy="retry", max_retries=2)


def test_retry_does_not_retry_env_errors(client):
    counting = CountingClient(client)
    with pytest.raises(RolloutError, match="env error"):
        run([Builder((1, 2), bad_member=0)], counting, error_policy="retry")
    assert counting.calls == 1


def test_sampler_failure_under_drop_drops_the_group(client):
    flaky = CountingClient(client, fail_first=1)
    batch = run([Builder((1, 2)), Builder((1, 3))], flaky, error_policy="drop")
    assert batch.dropped_groups == 1 and batch.failed_rollouts == 3
    assert len(batch.groups) == 1
