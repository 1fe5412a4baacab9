"""Trajectories -> datums, advantages and the checks on bad rollouts; hand-built, no model."""

from __future__ import annotations

import math
import pickle

import pytest

from envs.base import EnvError, StepResult, Trajectory, TrajectoryGroup, Transition
from rl.errors import InvalidRequestError
from rl.loop.datums import (
    add_entropy_bonus,
    compute_advantages,
    groups_to_datums,
    remove_constant_reward_groups,
    scale_advantages,
    trajectory_to_datums,
)
from rl.loop.rollouts import check_observation_fits
from rl.loop.step_metrics import rollout_metrics


def _turn(ob, ac, logprobs=None, reward=0.0, done=True, **kw) -> Transition:
    logprobs = logprobs if logprobs is not None else [-0.5] * len(ac)
    return Transition(ob, ac, logprobs, reward, done, **kw)


def _group(*rewards: float, final: list[float] | None = None) -> TrajectoryGroup:
    trajectories = [Trajectory([_turn([1, 2], [3], reward=r)]) for r in rewards]
    final = final if final is not None else [0.0] * len(rewards)
    return TrajectoryGroup(trajectories, final, [{} for _ in rewards])


def _inputs(datum):
    return {k: v.tolist() for k, v in datum.loss_fn_inputs.items()}


def test_single_turn_layout():
    trajectory = Trajectory([_turn([1, 2, 3], [4, 5], [-0.1, -0.2], reward=1.0)])
    (datum,) = trajectory_to_datums(trajectory, advantage=0.5)
    inputs = _inputs(datum)
    assert datum.model_input.to_ints() == [1, 2, 3, 4]
    assert inputs["target_tokens"] == [2, 3, 4, 5]
    assert inputs["weights"] == [0.0, 0.0, 1.0, 1.0]
    assert inputs["logprobs"] == pytest.approx([0.0, 0.0, -0.1, -0.2])
    assert inputs["advantages"] == [0.0, 0.0, 0.5, 0.5]
    assert datum.loss_fn_inputs["target_tokens"].dtype == "int64"


def test_multi_turn_merges_when_observation_extends():
    trajectory = Trajectory(
        [
            _turn([1, 2], [3], [-0.3], done=False),
            _turn([1, 2, 3, 9, 10], [11, 12], [-0.1, -0.2]),
        ]
    )
    (datum,) = trajectory_to_datums(trajectory, advantage=-1.0)
    inputs = _inputs(datum)
    assert datum.model_input.to_ints() == [1, 2, 3, 9, 10, 11]
    assert inputs["target_tokens"] == [2, 3, 9, 10, 11, 12]
    assert inputs["weights"] == [0.0, 1.0, 0.0, 0.0, 1.0, 1.0]
    assert inputs["logprobs"] == pytest.approx([0.0, -0.3, 0.0, 0.0, -0.1, -0.2])
    assert inputs["advantages"] == [0.0, -1.0, 0.0, 0.0, -1.0, -1.0]


def test_multi_turn_splits_when_context_is_rewritten():
    trajectory = Trajectory(
        [_turn([1, 2], [3], done=False), _turn([7, 8], [9], done=False), _turn([7, 8, 9, 4], [5])]
    )
    first, second = trajectory_to_datums(trajectory, advantage=1.0)
    assert first.model_input.to_ints() == [1, 2]
    assert _inputs(first)["weights"] == [0.0, 1.0]
    assert second.model_input.to_ints() == [7, 8, 9, 4]
    assert _inputs(second)["weights"] == [0.0, 1.0, 0.0, 1.0]


def test_advantages_are_group_relative():
    groups = [_group(1.0, 0.0, 0.0, 1.0), _group(3.0, 1.0, final=[0.0, 1.0])]
    advantages = compute_advantages(groups)
    assert advantages[0] == pytest.approx([0.5, -0.5, -0.5, 0.5])
    assert advantages[1] == pytest.approx([0.5, -0.5])  # totals 3 and 2 (step + group reward)


def test_advantages_with_std_normalisation():
    groups = [_group(1.0, 0.0, 0.0, 1.0), _group(2.0, 2.0)]
    advantages = compute_advantages(groups, normalize_std=True)
    assert advantages[0] == pytest.approx([1.0, -1.0, -1.0, 1.0], rel=1e-4)
    assert advantages[1] == [0.0, 0.0]  # constant group: no division by zero


def test_constant_groups_are_dropped():
    varied, constant = _group(1.0, 0.0), _group(0.5, 0.5, 0.5)
    assert remove_constant_reward_groups([constant, varied, constant]) == [varied]
    datums = groups_to_datums([constant, varied], remove_constant=True)
    assert len(datums) == 2
    assert len(groups_to_datums([constant, varied])) == 5


def test_groups_to_datums_carries_advantages():
    datums = groups_to_datums([_group(1.0, 0.0)])
    assert [_inputs(d)["advantages"][-1] for d in datums] == [0.5, -0.5]


@pytest.mark.parametrize("bad", [math.nan, math.inf, "1.0", None, True])
def test_bad_step_reward_is_refused(bad):
    with pytest.raises(EnvError, match="reward"):
        StepResult(reward=bad, episode_done=True)
    with pytest.raises(EnvError, match="reward"):
        _turn([1], [2], reward=bad)
    with pytest.raises(EnvError, match=r"final_rewards\[1\]"):
        _group(1.0, 0.0, final=[0.0, bad])


def test_overflowing_total_reward_names_the_group():
    trajectory = Trajectory(
        [_turn([1], [2], reward=1e308, done=False), _turn([1, 2], [3], reward=1e308)]
    )
    group = TrajectoryGroup([trajectory], [0.0], [{}])
    with pytest.raises(InvalidRequestError, match="group 1: trajectory 0 total reward"):
        compute_advantages([_group(1.0), group])


def test_step_result_needs_next_observation_unless_done():
    with pytest.raises(EnvError, match="next_observation"):
        StepResult(reward=0.0, episode_done=False)


def test_mismatched_logprobs_are_refused():
    with pytest.raises(EnvError, match="2 action tokens but 1 logprobs"):
        Transition([1], [2, 3], [-0.1], 0.0, True)


def test_observation_longer_than_context():
    check_observation_fits([0] * 10, max_context=16, max_tokens=6)
    with pytest.raises(InvalidRequestError, match="10 tokens \\+ max_tokens=7 exceeds"):
        check_observation_fits([0] * 10, max_context=16, max_tokens=7)
    trajectory = Trajectory([_turn([1] * 10, [2] * 5)])
    assert len(trajectory_to_datums(trajectory, 1.0, max_length=14)) == 1
    with pytest.raises(
        InvalidRequestError, match="trajectory 1: datum of 15 tokens exceeds max_length=14"
    ):
        long = Trajectory([_turn([1] * 10, [2] * 6)])
        groups_to_datums([TrajectoryGroup([trajectory, long], [0.0, 1.0], [{}, {}])], max_length=14)


def test_empty_observation_is_refused():
    with pytest.raises(InvalidRequestError, match="turn 0: empty observation"):
        trajectory_to_datums(Trajectory([_turn([], [1, 2])]), 1.0)


def test_rollout_metrics():
    truncated = Trajectory(
        [_turn([1], [2, 3], reward=0.0, metrics={"correct": 0.0}, stop_reason="length")]
    )
    good = Trajectory([_turn([1], [2], reward=1.0, metrics={"correct": 1.0})])
    group = TrajectoryGroup(
        [truncated, good], [0.0, 0.0], [{"rank": 1.0}, {"rank": 0.0}], rollout_errors=2
    )
    metrics = rollout_metrics([group, _group(0.0, 0.0)])
    assert metrics["env/num_trajectories"] == 4
    assert metrics["env/rollout_errors"] == 2
    assert metrics["env/reward_mean"] == pytest.approx(0.25)
    assert metrics["env/frac_constant_groups"] == 0.5
    assert metrics["env/frac_truncated"] == 0.25
    assert metrics["env/correct"] == 0.5
    assert metrics["env/group/rank"] == 0.5
    assert metrics["env/action_tokens_mean"] == pytest.approx(5 / 4)


def test_records_pickle():
    group = _group(1.0, 0.0)
    assert pickle.loads(pickle.dumps(group)) == group


def test_datums_fit_the_rl_losses():
    """Contract with the trainer: our datums pass its validation for every RL loss, and with
    target logprobs equal to the sampler's, importance sampling gives -sum(weights * A)."""
    import torch

    from trainers.losses import LOSSES
    from trainers.validation import prepare_batch

    trajectory = Trajectory([_turn([1, 2], [3], [-0.3], done=False), _turn([1, 2, 3, 4], [5, 6])])
    group = TrajectoryGroup([trajectory, Trajectory([_turn([1], [2])])], [1.0, 0.0], [{}, {}])
    datums = groups_to_datums([group])
    for loss_fn in ("importance_sampling", "ppo", "cispo", "dro"):
        prepare_batch(datums, loss_fn, None, vocab_size=100, max_context=64)
    batch = prepare_batch(datums, "importance_sampling", None, vocab_size=100, max_context=64)
    inputs = {
        key: torch.cat([d.inputs[key] for d in batch.datums]) for key in batch.datums[0].inputs
    }
    loss, _ = LOSSES["importance_sampling"].fn(inputs["logprobs"], inputs, batch.loss_fn_config)
    # Advantages 0.5 (3 sampled tokens) and -0.5 (1 sampled token).
    assert loss.item() == pytest.approx(-(3 * 0.5 - 0.5))


def test_scaled_advantages_give_the_token_mean_of_the_linear_losses():
    """scale_advantages(datums, 1/N) turns each linear policy loss (sum over tokens) into
    its mean over N tokens, leaves the input datums unchanged, and refuses a bad factor."""
    import torch

    from trainers.losses import LOSSES
    from trainers.validation import prepare_batch

    trajectory = Trajectory([_turn([1, 2], [3], [-0.3], done=False), _turn([1, 2, 3, 4], [5, 6])])
    group = TrajectoryGroup([trajectory, Trajectory([_turn([1], [2])])], [1.0, 0.0], [{}, {}])
    datums = groups_to_datums([group])
    before = [_inputs(d) for d in datums]
    scaled = scale_advantages(datums, 1 / 4)
    assert [_inputs(d) for d in datums] == before
    for loss_fn in ("importance_sampling", "ppo", "cispo"):
        losses = []
        for batch_datums in (datums, scaled):
            batch = prepare_batch(batch_datums, loss_fn, None, vocab_size=100, max_context=64)
            inputs = {
                k: torch.cat([d.inputs[k] for d in batch.datums]) for k in batch.datums[0].inputs
            }
            target = inputs["logprobs"] + 0.05  # a moved policy: ratios != 1, clipping active
            losses.append(LOSSES[loss_fn].fn(target, inputs, batch.loss_fn_config)[0].item())
        assert losses[1] == pytest.approx(losses[0] / 4, rel=1e-6), loss_fn
    for bad in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(InvalidRequestError, match="factor"):
            scale_advantages(datums, bad)


def test_entropy_bonus_is_the_entropys_gradient_in_expectation():
    """add_entropy_bonus shifts only sampled tokens' advantages, by coef x (surprisal - the
    batch's mean); weighting one datum per outcome of a categorical policy by its probability,
    the importance-sampling gradient of the shifted advantages is coef x grad H exactly."""
    import torch

    logits = torch.tensor([1.5, 0.2, -0.7, -2.0], dtype=torch.float64, requires_grad=True)
    logp = torch.log_softmax(logits, -1)
    trajectories = [Trajectory([_turn([7, 8], [x], [logp[x].item()])]) for x in range(4)]
    datums = groups_to_datums([TrajectoryGroup(trajectories, [0.0] * 4, [{}] * 4)])
    coef = 0.2
    add_entropy_bonus(datums, coef)
    surprisal = [-logp[x].item() for x in range(4)]
    mean = sum(surprisal) / 4
    for x, datum in enumerate(datums):
        advantages = _inputs(datum)["advantages"]
        assert advantages[0] == 0.0  # a prompt position
        assert advantages[1] == pytest.approx(coef * (surprisal[x] - mean))
    shifted = torch.tensor([_inputs(d)["advantages"][1] for d in datums], dtype=torch.float64)
    weighted = (logp.exp().detach() * shifted * logp).sum()
    (grad,) = torch.autograd.grad(weighted, logits, retain_graph=True)
    entropy = -(logp.exp() * logp).sum()
    (entropy_grad,) = torch.autograd.grad(entropy, logits)
    torch.testing.assert_close(grad, coef * entropy_grad)
