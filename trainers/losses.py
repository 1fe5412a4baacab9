"""Built-in losses: pure functions with one signature, in a name -> spec table.

Each loss takes the learner's `target_logprobs` for every token of every datum, concatenated
into one flat tensor `[T]` (or `[T, K]` for top-K cross entropy), the datums' `loss_fn_inputs`
concatenated the same way, and the `loss_fn_config`. It returns the loss as a plain SUM over
tokens (Tinker's reduction: no mean, no per-sequence normalisation) and `name:reduction` metrics.

Notation as in TINKER_API.md section 3: p = target_logprobs, q = sampler logprobs
(`logprobs`), A = `advantages`, r = exp(p - q).

Departure from Tinker: the RL losses accept an optional per-token `weights` mask (default 1)
that multiplies each token's loss. Our datum builder sets it to 0 on observation tokens, which
matters for `dro`, whose quadratic term would otherwise pull prompt logprobs towards the
placeholder q = 0 there.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

Tensor = torch.Tensor
LossFn = Callable[
    [Tensor, Mapping[str, Tensor], Mapping[str, float]], tuple[Tensor, dict[str, float]]
]


@dataclass(frozen=True)
class LossSpec:
    fn: LossFn
    required: tuple[str, ...]
    optional: tuple[str, ...] = ()
    config_defaults: dict[str, float] = field(default_factory=dict)


def cross_entropy(
    target_logprobs: Tensor, inputs: Mapping[str, Tensor], config: Mapping[str, float]
) -> tuple[Tensor, dict[str, float]]:
    """-sum w * p; with `[T, K]` targets, -sum_k w_k * log p(x_k) (top-K distillation)."""
    weights = inputs["weights"]
    loss = -(weights * target_logprobs).sum()
    return loss, {"loss:sum": loss.item(), "weights:sum": weights.sum().item()}


def importance_sampling(
    target_logprobs: Tensor, inputs: Mapping[str, Tensor], config: Mapping[str, float]
) -> tuple[Tensor, dict[str, float]]:
    """-sum r * A: REINFORCE corrected by the unbounded ratio to the sampling policy."""
    ratio = torch.exp(target_logprobs - inputs["logprobs"])
    loss = -(_mask(inputs) * ratio * inputs["advantages"]).sum()
    return loss, {"loss:sum": loss.item(), **_ratio_metrics(ratio, inputs)}


def ppo(
    target_logprobs: Tensor, inputs: Mapping[str, Tensor], config: Mapping[str, float]
) -> tuple[Tensor, dict[str, float]]:
    """-sum min(r * A, clip(r, lo, hi) * A), token-wise."""
    lo, hi = config["clip_low_threshold"], config["clip_high_threshold"]
    advantages = inputs["advantages"]
    ratio = torch.exp(target_logprobs - inputs["logprobs"])
    clipped = torch.clamp(ratio, lo, hi)
    objective = torch.minimum(ratio * advantages, clipped * advantages)
    loss = -(_mask(inputs) * objective).sum()
    clip_fraction = _masked_mean((ratio != clipped).float(), inputs)
    return loss, {
        "loss:sum": loss.item(),
        "clip_fraction:mean": clip_fraction,
        **_ratio_metrics(ratio, inputs),
    }


def cispo(
    target_logprobs: Tensor, inputs: Mapping[str, Tensor], config: Mapping[str, float]
) -> tuple[Tensor, dict[str, float]]:
    """-sum sg(clip(r, lo, hi)) * p * A: the clipped ratio only weights the policy gradient."""
    lo, hi = config["clip_low_threshold"], config["clip_high_threshold"]
    ratio = torch.exp(target_logprobs - inputs["logprobs"])
    clipped = torch.clamp(ratio, lo, hi).detach()
    loss = -(_mask(inputs) * clipped * target_logprobs * inputs["advantages"]).sum()
    clip_fraction = _masked_mean((ratio.detach() != clipped).float(), inputs)
    return loss, {
        "loss:sum": loss.item(),
        "clip_fraction:mean": clip_fraction,
        **_ratio_metrics(ratio, inputs),
    }


def dro(
    target_logprobs: Tensor, inputs: Mapping[str, Tensor], config: Mapping[str, float]
) -> tuple[Tensor, dict[str, float]]:
    """-sum (p * A - beta/2 * (p - q)^2): policy gradient with a quadratic pull towards q."""
    beta = config["beta"]
    delta = target_logprobs - inputs["logprobs"]
    objective = target_logprobs * inputs["advantages"] - 0.5 * beta * delta.square()
    loss = -(_mask(inputs) * objective).sum()
    ratio = torch.exp(delta.detach())
    return loss, {"loss:sum": loss.item(), **_ratio_metrics(ratio, inputs)}


def _mask(inputs: Mapping[str, Tensor]) -> Tensor | float:
    return inputs.get("weights", 1.0)


def _masked_mean(values: Tensor, inputs: Mapping[str, Tensor]) -> float:
    if "weights" in inputs:
        mask = (inputs["weights"] != 0).float()
    else:
        mask = (inputs["advantages"] != 0).float()
    total = mask.sum()
    return float((values * mask).sum() / total) if total > 0 else 0.0


def _ratio_metrics(ratio: Tensor, inputs: Mapping[str, Tensor]) -> dict[str, float]:
    return {"ratio:mean": _masked_mean(ratio.detach(), inputs)}


_RL_KEYS = ("target_tokens", "logprobs", "advantages")
_CLIP_PPO = {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}
_CLIP_CISPO = {"clip_low_threshold": 0.0, "clip_high_threshold": 4.0}

LOSSES: dict[str, LossSpec] = {
    "cross_entropy": LossSpec(cross_entropy, required=("target_tokens", "weights")),
    "importance_sampling": LossSpec(importance_sampling, _RL_KEYS, ("weights",)),
    "ppo": LossSpec(ppo, _RL_KEYS, ("weights",), _CLIP_PPO),
    "cispo": LossSpec(cispo, _RL_KEYS, ("weights",), _CLIP_CISPO),
    "dro": LossSpec(dro, _RL_KEYS, ("weights",), {"beta": 0.05}),
}


def resolve_config(name: str, config: Mapping[str, float] | None) -> dict[str, float]:
    """The loss's defaults overridden by `config`; unknown keys are an error (a typo'd key
    silently falling back to the default would train with the wrong clip range)."""
    from rl.errors import InvalidRequestError

    spec = LOSSES[name]
    merged = dict(spec.config_defaults)
    for key, value in (config or {}).items():
        if key not in spec.config_defaults:
            known = ", ".join(sorted(spec.config_defaults)) or "none"
            raise InvalidRequestError(
                f"loss_fn_config key {key!r} is not used by {name!r} (its keys: {known})"
            )
        if not isinstance(value, (int, float)) or value != value:
            raise InvalidRequestError(f"loss_fn_config[{key!r}] must be a number, got {value!r}")
        merged[key] = float(value)
    return merged
