"""The metrics of an RL step: rewards and accuracy of its rollouts, and what training saw.

`env/...`: rewards, episode shape and the envs' own metrics (`correct`, `format`, ...).
`optim/...`: the KL between the sampler's and the trainer's logprobs of the sampled tokens
(`kl_sample_train_v1` = mean(q - p), `_v2` = mean((q - p)^2) / 2, as tinker-cookbook), an
entropy estimate (-mean q) and the loss's own metrics.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from envs.base import TrajectoryGroup
from rl.loop.datums import total_rewards
from rl.types import Datum, ForwardBackwardOutput


def accuracy(groups: Sequence[TrajectoryGroup]) -> float:
    """Share of trajectories solved: the env's `correct`/`success` metric, else reward > 0."""
    solved = []
    for group in groups:
        for trajectory, total in zip(group.trajectories, group.total_rewards(), strict=True):
            flags = [
                t.metrics[key]
                for t in trajectory.transitions
                for key in ("correct", "success")
                if key in t.metrics
            ]
            solved.append(max(flags) if flags else float(total > 0))
    return sum(solved) / len(solved) if solved else float("nan")


def train_metrics(datums: list[Datum], outputs: list[ForwardBackwardOutput]) -> dict[str, float]:
    """KL between the sampler's and the trainer's logprobs, entropy estimate, loss metrics."""
    diffs, sampled = [], []
    train_logprobs = [out["logprobs"].tolist() for o in outputs for out in o.loss_fn_outputs]
    for datum, target in zip(datums, train_logprobs, strict=True):
        weights = datum.loss_fn_inputs["weights"].tolist()
        sampler = datum.loss_fn_inputs["logprobs"].tolist()
        for w, q, p in zip(weights, sampler, target, strict=True):
            if w > 0:
                diffs.append(q - p)
                sampled.append(q)
    n = max(len(diffs), 1)
    metrics = {
        "optim/kl_sample_train_v1": sum(diffs) / n,
        "optim/kl_sample_train_v2": 0.5 * sum(d * d for d in diffs) / n,
        "optim/entropy": -sum(sampled) / n,
        "optim/num_tokens": float(len(diffs)),
    }
    for key in ("clip_fraction:mean", "ratio:mean"):
        values = [o.metrics[key] for o in outputs if key in o.metrics]
        if values:
            metrics[f"optim/{key.split(':')[0]}"] = sum(values) / len(values)
    metrics["optim/loss"] = sum(o.metrics.get("loss:sum", 0.0) for o in outputs) / n
    return metrics


def rollout_metrics(groups: Sequence[TrajectoryGroup]) -> dict[str, float]:
    """`env/...` metrics of a batch: rewards, episode shape, and the envs' own step metrics."""
    rewards = [r for g, group in enumerate(groups) for r in total_rewards(group, f"group {g}")]
    trajectories = [t for group in groups for t in group.trajectories]
    transitions = [tr for t in trajectories for tr in t.transitions]
    metrics: dict[str, float] = {
        "env/num_groups": float(len(groups)),
        "env/num_trajectories": float(len(trajectories)),
        "env/rollout_errors": float(sum(group.rollout_errors for group in groups)),
    }
    if rewards:
        mean = sum(rewards) / len(rewards)
        metrics["env/reward_mean"] = mean
        metrics["env/reward_std"] = math.sqrt(sum((r - mean) ** 2 for r in rewards) / len(rewards))
        constant = sum(1 for g in groups if len(set(total_rewards(g))) == 1)
        metrics["env/frac_constant_groups"] = constant / len(groups)
        metrics["env/turns_mean"] = len(transitions) / len(trajectories)
    if transitions:
        action_tokens = sum(len(t.action_tokens) for t in transitions)
        metrics["env/action_tokens_mean"] = action_tokens / len(transitions)
        truncated = sum(t.stop_reason == "length" for t in transitions)
        metrics["env/frac_truncated"] = truncated / len(transitions)
    # The envs' own metrics (e.g. `correct`, `format`), averaged over the turns that report them,
    # and the group-level metrics from `compute_group_rewards`.
    sums: dict[str, list[float]] = {}
    for tr in transitions:
        for key, value in tr.metrics.items():
            sums.setdefault(f"env/{key}", []).append(value)
    for group in groups:
        for group_metrics in group.metrics:
            for key, value in group_metrics.items():
                sums.setdefault(f"env/group/{key}", []).append(value)
    metrics.update({key: sum(values) / len(values) for key, values in sums.items()})
    return metrics
