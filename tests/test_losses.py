"""Each built-in loss against values and gradients computed by hand."""

import functools
import math
import operator

import pytest
import torch

from rl.errors import InvalidRequestError
from trainers.losses import LOSSES, resolve_config


def run(name, p, config=None, **inputs):
    p = torch.tensor(p, requires_grad=True)
    tensors = {k: torch.tensor(v) for k, v in inputs.items()}
    loss, metrics = LOSSES[name].fn(p, tensors, resolve_config(name, config))
    loss.backward()
    return loss.item(), p.grad.tolist(), metrics


def test_cross_entropy_is_weighted_negative_sum():
    loss, grad, metrics = run("cross_entropy", [-1.0, -2.0, -0.5], weights=[1.0, 0.5, 0.0])
    assert loss == pytest.approx(1.0 + 1.0)
    assert grad == pytest.approx([-1.0, -0.5, 0.0])
    assert metrics["loss:sum"] == pytest.approx(2.0)


def test_cross_entropy_top_k_targets():
    loss, grad, _ = run(
        "cross_entropy", [[-1.0, -3.0], [-0.1, -2.0]], weights=[[0.7, 0.3], [1.0, 0.0]]
    )
    assert loss == pytest.approx(0.7 + 0.9 + 0.1)
    assert functools.reduce(operator.iadd, grad, []) == pytest.approx([-0.7, -0.3, -1.0, 0.0])


def test_importance_sampling_ratio_times_advantage():
    # p - q = [ln 2, 0]: ratios [2, 1]; loss = -(2*1.5 + 1*(-1)) = -2; d/dp = -A*r.
    loss, grad, _ = run(
        "importance_sampling",
        [math.log(2) - 1, -1.0],
        logprobs=[-1.0, -1.0],
        advantages=[1.5, -1.0],
    )
    assert loss == pytest.approx(-2.0)
    assert grad == pytest.approx([-3.0, 1.0])


def test_ppo_clips_like_torchtune_example():
    # Ratio e everywhere; positive advantage: clipped objective 1.2*A wins (min), no gradient.
    # Negative advantage: min(e*A, 1.2*A) = e*A, unclipped, gradient -A*e.
    e = math.e
    loss, grad, metrics = run("ppo", [0.0, 0.0], logprobs=[-1.0, -1.0], advantages=[1.0, -1.0])
    assert loss == pytest.approx(-(1.2 * 1.0) - (e * -1.0))
    assert grad == pytest.approx([0.0, e])
    assert metrics["clip_fraction:mean"] == pytest.approx(1.0)


def test_ppo_thresholds_come_from_config():
    loss, _, _ = run(
        "ppo", [0.0], {"clip_low_threshold": 0.5, "clip_high_threshold": 2.0},
        logprobs=[-1.0], advantages=[1.0],
    )  # fmt: skip
    assert loss == pytest.approx(-2.0)


def test_cispo_stops_gradient_through_clipped_ratio():
    # r = e clipped to 4.0 -> stays e (below 4); loss = -sg(e) * p * A; d/dp = -e*A.
    e = math.e
    loss, grad, _ = run("cispo", [0.0, -0.5], logprobs=[-1.0, -0.5], advantages=[2.0, 1.0])
    assert loss == pytest.approx(-(e * 0.0 * 2.0) - (1.0 * -0.5 * 1.0))
    assert grad == pytest.approx([-e * 2.0, -1.0])
    # Above the high threshold, the weight is the threshold.
    _, grad, _ = run("cispo", [2.0], logprobs=[0.0], advantages=[1.0])
    assert grad == pytest.approx([-4.0])


def test_dro_quadratic_penalty():
    beta = 0.1
    p, q, a = -1.0, -1.5, 2.0
    loss, grad, _ = run("dro", [p], {"beta": beta}, logprobs=[q], advantages=[a])
    assert loss == pytest.approx(-(p * a - 0.5 * beta * (p - q) ** 2))
    assert grad == pytest.approx([-(a - beta * (p - q))])


def test_rl_losses_honour_weights_mask():
    for name in ("importance_sampling", "ppo", "cispo", "dro"):
        _loss, grad, _ = run(
            name, [-0.3, -2.0], logprobs=[0.0, -2.0], advantages=[0.0, 1.0], weights=[0.0, 1.0]
        )
        assert grad[0] == 0.0, name
        assert grad[1] != 0.0, name


def test_unknown_config_key_is_rejected():
    with pytest.raises(InvalidRequestError, match="clip_low"):
        resolve_config("ppo", {"clip_lo": 0.5})
    with pytest.raises(InvalidRequestError, match="beta"):
        resolve_config("cross_entropy", {"beta": 0.5})
