"""Rollouts -> training datums: group-relative advantages and the token layout of RL datums.

Layout of one datum (as tinker-cookbook's `trajectory_to_data`): the full token sequence is
observation, action, [next observation's new tokens, action, ...]; `model_input` is full[:-1]
and position i predicts `target_tokens[i]` = full[i + 1]. Per target token:

    sampled (action) token:      weights 1, logprobs = sampler logprob, advantages = A
    observation / prompt token:  weights 0, logprobs 0,                 advantages 0

A multi-turn trajectory stays one datum while each observation extends the previous
observation + action token for token; where it does not (the env rewrote the context), a new
datum starts. A = total reward (step rewards + group reward) minus the group mean, optionally
divided by the group's standard deviation (Dr. GRPO argues against; tinker-cookbook omits it).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from envs.base import EnvError, Trajectory, TrajectoryGroup
from rl.client.sampling import SamplingClient
from rl.errors import InvalidRequestError
from rl.types import Datum, ModelInput, TensorData, to_tensor_data


def total_rewards(group: TrajectoryGroup, where: str = "group") -> list[float]:
    """Step rewards + group reward per trajectory; a non-finite total is an error."""
    try:
        return group.total_rewards()
    except EnvError as e:
        raise InvalidRequestError(f"{where}: {e}") from None


def compute_advantages(
    groups: Sequence[TrajectoryGroup], normalize_std: bool = False, eps: float = 1e-6
) -> list[list[float]]:
    """Per group, per trajectory: total reward minus the group mean (/ (std + eps) if asked).

    A constant group gets all-zero advantages either way.
    """
    advantages_P_G: list[list[float]] = []
    for g, group in enumerate(groups):
        rewards = total_rewards(group, f"group {g}")
        if not rewards:
            advantages_P_G.append([])
            continue
        mean = sum(rewards) / len(rewards)
        centred = [r - mean for r in rewards]
        if normalize_std:
            std = math.sqrt(sum(c * c for c in centred) / len(centred))
            centred = [c / (std + eps) for c in centred]
        advantages_P_G.append(centred)
    return advantages_P_G


def is_informative(group: TrajectoryGroup, where: str = "group") -> bool:
    """Whether the group's total rewards differ (so its advantages are not all zero)."""
    rewards = total_rewards(group, where)
    return bool(rewards) and max(rewards) - min(rewards) > 0


def remove_constant_reward_groups(groups: Sequence[TrajectoryGroup]) -> list[TrajectoryGroup]:
    """Drops groups whose trajectories all have the same total reward (no learning signal)."""
    return [group for g, group in enumerate(groups) if is_informative(group, f"group {g}")]


def _tensors(**fields: list[int] | list[float]) -> dict[str, TensorData]:
    return {key: to_tensor_data(value, key) for key, value in fields.items()}


@dataclass
class _Sequence:
    """A datum under construction; per-token fields are aligned with `tokens` (unshifted)."""

    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    advantages: list[float] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)

    def add_observation(self, tokens: Sequence[int]) -> None:
        self.tokens.extend(tokens)
        self.logprobs.extend([0.0] * len(tokens))
        self.advantages.extend([0.0] * len(tokens))
        self.weights.extend([0.0] * len(tokens))

    def add_action(
        self, tokens: Sequence[int], logprobs: Sequence[float], advantage: float
    ) -> None:
        self.tokens.extend(tokens)
        self.logprobs.extend(float(lp) for lp in logprobs)
        self.advantages.extend([advantage] * len(tokens))
        self.weights.extend([1.0] * len(tokens))

    def to_datum(self) -> Datum:
        return Datum(
            model_input=ModelInput.from_ints(self.tokens[:-1]),
            loss_fn_inputs=_tensors(
                target_tokens=self.tokens[1:],
                logprobs=self.logprobs[1:],
                advantages=self.advantages[1:],
                weights=self.weights[1:],
            ),
        )


def trajectory_to_datums(
    trajectory: Trajectory,
    advantage: float,
    max_length: int | None = None,
    where: str = "trajectory",
) -> list[Datum]:
    """One datum per run of turns whose observations extend each other (usually one)."""
    if not math.isfinite(advantage):
        raise InvalidRequestError(f"{where}: advantage {advantage} is not finite")
    sequences: list[_Sequence] = []
    for t, transition in enumerate(trajectory.transitions):
        observation = transition.observation
        current = sequences[-1].tokens if sequences else None
        if current is not None and observation[: len(current)] == current:
            sequences[-1].add_observation(observation[len(current) :])
        else:
            if not observation:
                raise InvalidRequestError(f"{where}, turn {t}: empty observation")
            sequences.append(_Sequence())
            sequences[-1].add_observation(observation)
        if len(transition.action_logprobs) != len(transition.action_tokens):
            raise InvalidRequestError(
                f"{where}, turn {t}: {len(transition.action_tokens)} action tokens but "
                f"{len(transition.action_logprobs)} logprobs"
            )
        sequences[-1].add_action(transition.action_tokens, transition.action_logprobs, advantage)
    for sequence in sequences:
        if max_length is not None and len(sequence.tokens) - 1 > max_length:
            raise InvalidRequestError(
                f"{where}: datum of {len(sequence.tokens) - 1} tokens exceeds max_length={max_length}"
            )
    return [sequence.to_datum() for sequence in sequences]


def groups_to_datums(
    groups: Sequence[TrajectoryGroup],
    normalize_std: bool = False,
    remove_constant: bool = False,
    max_length: int | None = None,
) -> list[Datum]:
    """The usual path: optionally drop constant groups, compute advantages, build datums."""
    if remove_constant:
        groups = remove_constant_reward_groups(groups)
    advantages_P_G = compute_advantages(groups, normalize_std)
    datums_D: list[Datum] = []
    for g, (group, advantages) in enumerate(zip(groups, advantages_P_G, strict=True)):
        for i, (trajectory, advantage) in enumerate(
            zip(group.trajectories, advantages, strict=True)
        ):
            where = f"group {g}, trajectory {i}"
            datums_D.extend(trajectory_to_datums(trajectory, advantage, max_length, where))
    return datums_D


def scale_advantages(datums: Sequence[Datum], factor: float) -> list[Datum]:
    """The datums with every advantage multiplied by `factor` (> 0).

    With `factor` = 1 / (tokens sampled in the batch), a summed policy loss becomes the token
    mean of DAPO and TRL's `loss_type="dapo"`: the gradient no longer grows with the batch's
    length, so a fixed clip norm and learning rate mean the same at any batch size. Exact for
    losses linear in the advantage (importance_sampling, ppo, cispo); dro's quadratic term
    is not scaled.
    """
    if not (math.isfinite(factor) and factor > 0):
        raise InvalidRequestError(f"scale_advantages: factor must be finite and > 0, got {factor}")
    scaled = []
    for datum in datums:
        advantages = datum.loss_fn_inputs["advantages"].to_numpy() * factor
        inputs = {**datum.loss_fn_inputs, "advantages": to_tensor_data(advantages, "advantages")}
        scaled.append(Datum(model_input=datum.model_input, loss_fn_inputs=inputs))
    return scaled


def supervised_datum(tokens: Sequence[int], weights: Sequence[float]) -> Datum:
    """An SFT datum from `ChatRenderer.render_supervised` output (weights aligned with tokens)."""
    if len(tokens) != len(weights) or len(tokens) < 2:
        raise InvalidRequestError(
            f"supervised_datum: need >= 2 tokens and one weight per token, got "
            f"{len(tokens)} tokens and {len(weights)} weights"
        )
    return Datum(
        model_input=ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs=_tensors(target_tokens=list(tokens[1:]), weights=list(weights[1:])),
    )


async def add_kl_penalty(
    datums: list[Datum], base_client: SamplingClient, coef: float
) -> dict[str, float]:
    """advantages += coef * (mean d - d) on sampled tokens, d = sampler - base logprob.

    As tinker-cookbook's `incorporate_kl_penalty`: the base model's logprobs of each whole
    sequence come from a base-model sampling client (`compute_logprobs`), and the mean is
    over every sampled token of the batch.
    """
    sequences = [
        [*d.model_input.to_ints(), int(d.loss_fn_inputs["target_tokens"].tolist()[-1])]
        for d in datums
    ]
    base_D = await asyncio.gather(
        *(base_client.compute_logprobs(ModelInput.from_ints(s)) for s in sequences)
    )
    diffs_D: list[list[float]] = []  # per target position; 0 off the sampled tokens
    for datum, base in zip(datums, base_D, strict=True):
        weights = datum.loss_fn_inputs["weights"].tolist()
        sampler = datum.loss_fn_inputs["logprobs"].tolist()
        reference = [0.0 if lp is None else lp for lp in base[1:]]
        diffs_D.append(
            [q - r if w > 0 else 0.0 for q, r, w in zip(sampler, reference, weights, strict=True)]
        )
    return {"kl/sampler_base": _shift_from_mean(datums, diffs_D, coef)}


def add_entropy_bonus(datums: list[Datum], coef: float) -> None:
    """advantages += coef * (s - mean s) on sampled tokens, s = -(sampler logprob).

    The KL penalty above against a uniform reference, whose logprob is the same for every
    token: a sampled token's surprisal is a one-sample estimate of the policy's entropy at that
    position, so in expectation the shift adds coef x the entropy's gradient to the policy
    gradient. Tokens the policy was sure of are pushed down a little and surprising ones up,
    which slows the entropy's collapse. The mean is over every sampled token of the batch (the
    step logs it as `optim/entropy`).
    """
    surprisal_D = [
        [
            -lp if w > 0 else 0.0
            for lp, w in zip(_floats(d, "logprobs"), _floats(d, "weights"), strict=True)
        ]
        for d in datums
    ]
    _shift_from_mean(datums, surprisal_D, -coef)


def _floats(datum: Datum, key: str) -> list[float]:
    return [float(v) for v in datum.loss_fn_inputs[key].tolist()]


def _shift_from_mean(datums: list[Datum], values_D: list[list[float]], coef: float) -> float:
    """advantages += coef * (mean - value) on sampled tokens, in place (the mean over every
    sampled token of the batch); returns the mean."""
    weights_D = [_floats(d, "weights") for d in datums]
    counted = sum(float(w > 0) for weights in weights_D for w in weights)
    mean = sum(sum(values) for values in values_D) / max(counted, 1.0)
    for datum, values, weights in zip(datums, values_D, weights_D, strict=True):
        advantages = _floats(datum, "advantages")
        datum.loss_fn_inputs["advantages"] = to_tensor_data(
            [
                a + coef * (mean - v) if w > 0 else a
                for a, v, w in zip(advantages, values, weights, strict=True)
            ],
            "advantages",
        )
    return mean
