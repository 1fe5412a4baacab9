"""The RL loop's keys for steady learning: the learning-rate schedule and bounded dynamic
sampling (pure functions and config checks; no Ray)."""

from __future__ import annotations

from typing import Any

import pytest

from envs.base import Trajectory, TrajectoryGroup, Transition
from rl.cli import parse_config
from rl.errors import InvalidRequestError
from rl.loop.config import Config
from rl.loop.dynamic_sampling import (
    DynamicBatch,
    count_informative,
    extra_batch_index,
    is_informative,
    needs_more,
    top_up,
)
from rl.loop.rollouts import RolloutBatch
from rl.loop.schedule import lr_multiplier


def group(*rewards: float) -> TrajectoryGroup:
    trajectories = [
        Trajectory([Transition([1, 2], [3], [-0.5], reward, episode_done=True)])
        for reward in rewards
    ]
    return TrajectoryGroup(trajectories, [0.0] * len(rewards), [{} for _ in rewards])


def batch(*groups: TrajectoryGroup, failed: int = 0, names: str = "builder-") -> RolloutBatch:
    builders: list[Any] = [f"{names}{i}" for i in range(len(groups))]  # only carried along
    return RolloutBatch(groups=list(groups), builders=builders, failed_rollouts=failed)


# -- learning-rate schedule -------------------------------------------------------------------


def test_the_loop_learning_rate_follows_its_schedule():
    constant = Config(lr_schedule="constant")
    assert [constant.learning_rate_at(s) for s in (0, 10, 19)] == [1e-3] * 3
    linear = Config(lr_schedule="linear", num_steps=20)
    assert [linear.learning_rate_at(s) for s in (0, 10, 19)] == pytest.approx(
        [1e-3, 0.5e-3, 0.05e-3]
    )
    floored = Config(lr_schedule="cosine", min_lr_ratio=0.2, num_steps=20)
    assert floored.learning_rate_at(0) == pytest.approx(1e-3)
    assert floored.learning_rate_at(10) == pytest.approx(0.6e-3)
    assert floored.learning_rate_at(19) > 0.2e-3
    warm = Config(lr_schedule="linear", warmup_steps=4, num_steps=20)
    assert [warm.learning_rate_at(s) for s in range(5)] == pytest.approx(
        [0.25e-3, 0.5e-3, 0.75e-3, 1e-3, 1e-3]
    )
    assert warm.learning_rate_at(12) == pytest.approx(1e-3 * (1 - 8 / 16))


def test_scale_lr_by_signal_shrinks_a_step_on_few_groups():
    scaled = Config(scale_lr_by_signal=True, lr_schedule="linear", num_steps=20)
    assert scaled.learning_rate_at(0, informative_groups=12) == pytest.approx(1e-3)
    assert scaled.learning_rate_at(0, informative_groups=3) == pytest.approx(0.25e-3)
    assert scaled.learning_rate_at(10, informative_groups=1) == pytest.approx(0.5e-3 / 12)
    assert scaled.learning_rate_at(0, informative_groups=30) == pytest.approx(1e-3)  # <= 1
    assert Config().learning_rate_at(0, informative_groups=1) == 1e-3  # off in the preset


def test_sft_and_the_rl_loop_share_one_schedule():
    from rl.loop import sft

    assert sft.lr_multiplier is lr_multiplier
    with pytest.raises(InvalidRequestError, match="unknown lr_schedule"):
        lr_multiplier("step", 0, 10)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["lr_schedule=step"], "lr_schedule='step': expected one of"),
        (["warmup_steps=-1"], "warmup_steps=-1 must be >= 0 and < num_steps=20"),
        (["warmup_steps=20"], "warmup_steps=20 must be >= 0 and < num_steps=20"),
        (["min_lr_ratio=1.5"], r"min_lr_ratio=1.5 must be in \[0, 1\]"),
        (["dynamic_sampling_rounds=-1"], "dynamic_sampling_rounds=-1 must be >= 0"),
        (["dynamic_sampling_min_groups=0"], "dynamic_sampling_min_groups=0 must be >= 1"),
    ],
)
def test_bad_schedule_and_sampling_keys_are_clear_errors(argv, message):
    with pytest.raises(InvalidRequestError, match=message):
        parse_config(Config, argv)


def test_the_keys_parse():
    config = parse_config(
        Config,
        ["lr_schedule=cosine", "warmup_steps=2", "dynamic_sampling_rounds=2",
         "dynamic_sampling_min_groups=20"],
    )  # fmt: skip
    assert (config.lr_schedule, config.warmup_steps, config.dynamic_sampling_rounds) == (
        "cosine",
        2,
        2,
    )
    # A target above the batch is allowed: the batch's size bounds it.
    assert needs_more(batch(group(0, 1)), config.dynamic_sampling_min_groups, cap=1) is False


# -- dynamic sampling -------------------------------------------------------------------------


def test_a_group_is_informative_when_its_rewards_differ():
    assert is_informative(group(0.0, 1.0, 1.0))
    assert not is_informative(group(1.0, 1.0))
    assert not is_informative(group(0.0, 0.0, 0.0))
    assert count_informative([group(0, 1), group(1, 1), group(2, 0)]) == 2


def test_needs_more_until_the_target_or_the_batch_size():
    one = batch(group(0, 1), group(1, 1), group(0, 0))
    assert needs_more(one, min_groups=2, cap=12)
    assert not needs_more(one, min_groups=1, cap=12)
    assert not needs_more(one, min_groups=6, cap=1)  # the batch size bounds the target


def test_top_up_adds_only_informative_groups_up_to_the_cap():
    planned = batch(group(0, 1), group(1, 1), group(1, 1))
    extra = batch(
        group(1, 1), group(0, 2), group(0, 0), group(1, 0), group(2, 1), failed=3, names="x"
    )
    added = top_up(planned, extra, cap=3)
    assert added == 2  # room for 2 more informative groups: x1 and x3, in order
    assert planned.builders == ["builder-0", "builder-1", "builder-2", "x1", "x3"]
    assert count_informative(planned.groups) == 3
    assert planned.failed_rollouts == 3
    full = batch(group(0, 1))
    assert top_up(full, batch(group(0, 1)), cap=1) == 0


def test_the_dynamic_batch_reports_its_rounds_and_keeps_its_own_groups_first():
    planned = batch(group(1, 1), group(0, 1))
    sampled = DynamicBatch(planned, planned=2, sampled_groups=2)
    top_up(planned, batch(group(0, 1), group(1, 1)), cap=12)
    sampled.rounds, sampled.sampled_groups = 1, 4
    assert len(sampled.planned_groups) == 2
    assert sampled.metrics() == {
        "dynamic/rounds": 1.0,
        "dynamic/added_groups": 1.0,
        "dynamic/sampled_groups": 4.0,
    }


def test_extra_rounds_read_distinct_batches_from_the_far_end():
    indices = [extra_batch_index(s, r, rounds=2, num_batches=500) for s in range(3) for r in (0, 1)]
    assert indices == [499, 498, 497, 496, 495, 494]
    assert extra_batch_index(0, 0, rounds=1, num_batches=1) == 0  # wraps within the dataset
    assert extra_batch_index(5, 0, rounds=1, num_batches=4) == (4 - 1 - 5) % 4
