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

Per-datum losses (`LossSpec.per_datum`): `gspo`'s ratio is a mean over one sequence, so its
function sees one datum at a time (its tokens `[N]`); the trainer sums the datums' losses and
merges their metrics by reduction (`per_datum_loss`). Datums are never split across the
trainer's model calls, so each call's share of the loss is whole datums.

`stable_reinforce` is ours: Thinking Machines has not published the objective behind the
name, only its purpose (REINFORCE that stays stable when the sampling policy differs from the
trained one). Its docstring gives the formula.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
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
    per_datum: bool = False  # fn sees one datum at a time (see per_datum_loss)


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


def gspo(
    target_logprobs: Tensor, inputs: Mapping[str, Tensor], config: Mapping[str, float]
) -> tuple[Tensor, dict[str, float]]:
    """GSPO-token (Zheng et al. 2025) on one datum, as Tinker documents it:

        log s = mean over t in M of (sg(p_t) - q_t)       M = {t : sequence_ratio_mask_t != 0}
        s_t   = exp(log s + p_t - sg(p_t))                 (value s, gradient s * grad p_t)
        L     = -sum_t w_t * min(s_t * A_t, clip(s_t, lo, hi) * A_t)

    The mask M only chooses the tokens whose log-ratios make the sequence ratio; the sum runs
    over every token, each weighted by `weights` w (default 1; advantages are 0 on prompt
    tokens in practice). Without `sequence_ratio_mask`, M is the tokens with nonzero weight if
    `weights` is given, else those with nonzero advantage. A datum with an empty M contributes
    0 and reports no ratio.

    Defaults lo = 1 - 3e-4, hi = 1 + 4e-4 are the GSPO paper's epsilons; the choice is ours, as
    Tinker does not publish gspo's defaults. A sequence ratio is a geometric mean, so it stays
    much closer to 1 than token ratios; but it also carries the sampler/trainer numeric gap:
    fp32 on both sides (~1e-5 nats per token here) is well inside the band, a bf16 sampler
    (~0.05 nats) is not, and wants a wider band (`clip_low_threshold`/`clip_high_threshold`).
    """
    lo, hi = config["clip_low_threshold"], config["clip_high_threshold"]
    if "sequence_ratio_mask" in inputs:
        in_ratio = inputs["sequence_ratio_mask"] != 0
    else:
        in_ratio = _counted(inputs)
    if not bool(in_ratio.any()):
        return (target_logprobs * 0.0).sum(), {"loss:sum": 0.0}
    detached = target_logprobs.detach()
    log_ratio = (detached - inputs["logprobs"])[in_ratio].mean()
    ratio = torch.exp(log_ratio + target_logprobs - detached)
    clipped = torch.clamp(ratio, lo, hi)
    advantages = inputs["advantages"]
    objective = torch.minimum(ratio * advantages, clipped * advantages)
    loss = -(_mask(inputs) * objective).sum()
    sequence_ratio = float(torch.exp(log_ratio))
    return loss, {
        "loss:sum": loss.item(),
        "clip_fraction:mean": float(not lo <= sequence_ratio <= hi),
        "ratio:mean": sequence_ratio,
    }


def stable_reinforce(
    target_logprobs: Tensor, inputs: Mapping[str, Tensor], config: Mapping[str, float]
) -> tuple[Tensor, dict[str, float]]:
    """Ours: REINFORCE with a masked importance weight and a pull towards the sampler.

        r_t   = exp(p_t - q_t)
        w_t   = sg(r_t) * 1[lo <= r_t <= hi]                      (lo, hi: mask_*_threshold)
        k3_t  = r_t - 1 - (p_t - q_t)                    (k3 estimate of KL(q || p) at x_t)
        L     = -sum_t m_t * w_t * A_t * p_t  +  kl_coeff * sum_t m_t * k3_t

    with m_t = `weights` if given, else 1 on tokens with a nonzero advantage (the sampled
    tokens: the KL term must not reach prompt tokens, whose q is a placeholder 0).

    Inside the band the policy gradient is exactly importance sampling's (sg(r) A grad p); a
    token whose ratio has left the band [lo, hi] gets no policy gradient at all, in either
    direction, so stale or mismatched samples cannot push the policy further from the one that
    sampled them; the k3 term (gradient kl_coeff * (r - 1) per token) pulls every counted token
    back towards the sampler, strongest on those that drifted most. Against the others:
    `importance_sampling` weights by the unbounded r, so the tokens that drifted furthest get
    the largest updates; `ppo` stops the gradient only on the side where the clipped objective
    wins (r > hi with A > 0, r < lo with A < 0) and keeps pushing elsewhere, with no pull back;
    `cispo` keeps a gradient on every token, weighted by the clipped ratio.

    Defaults (ours; Tinker names only `kl_coeff`): band [0.5, 2.0] (a token is masked once
    the trainer gives it half or twice the sampler's probability; on-policy with fp32 numerics
    nothing is masked, so on-policy it is REINFORCE plus a vanishing k3 term) and kl_coeff
    0.1, for advantages of order 1 (Tinker's summed loss with unscaled advantages: with
    advantages divided by a token count, scale kl_coeff down alike, or pass the scale in
    `weights`, which weigh both terms). bench/bench_stable_reinforce.py measures the choice.
    """
    lo, hi = config["mask_low_threshold"], config["mask_high_threshold"]
    counted = _counted(inputs)
    delta = torch.where(counted, target_logprobs - inputs["logprobs"], 0.0)
    ratio = torch.exp(delta)
    detached = ratio.detach()
    in_band = (detached >= lo) & (detached <= hi) & counted
    weight = torch.where(in_band, detached, 0.0)
    k3 = ratio - 1.0 - delta  # 0 where not counted (delta = 0 there)
    mask = _mask(inputs)
    policy = -(mask * weight * inputs["advantages"] * target_logprobs).sum()
    kl = (mask * k3).sum()
    loss = policy + config["kl_coeff"] * kl
    masked = (~in_band & counted).float()
    return loss, {
        "loss:sum": loss.item(),
        "ratio:mean": _masked_mean(detached, inputs),
        "masked_fraction:mean": _masked_mean(masked, inputs),
        "kl:mean": _masked_mean(k3.detach(), inputs),
    }


def per_datum_loss(
    fn: LossFn,
    logprobs_D: Sequence[Tensor],
    inputs_D: Sequence[Mapping[str, Tensor]],
    config: Mapping[str, float],
) -> tuple[Tensor, dict[str, float]]:
    """A per-datum loss over several datums: the sum of their losses; metrics merged by their
    reduction (`:sum` adds, `:max`/`:min` as named, `:mean` averages over the datums that
    report it, so a gspo `ratio:mean` is the mean sequence ratio)."""
    losses, reported = [], []
    for logprobs, inputs in zip(logprobs_D, inputs_D, strict=True):
        loss, metrics = fn(logprobs, inputs, config)
        losses.append(loss)
        reported.append(metrics)
    return torch.stack(losses).sum(), merge_metrics(reported)


def merge_metrics(reported: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """`name:reduction` metrics of several parts merged by their reduction."""
    values: dict[str, list[float]] = {}
    for metrics in reported:
        for key, value in metrics.items():
            values.setdefault(key, []).append(value)
    merged = {}
    for key, vs in values.items():
        reduction = key.rpartition(":")[2]
        if reduction == "max":
            merged[key] = max(vs)
        elif reduction == "min":
            merged[key] = min(vs)
        elif reduction == "mean":
            merged[key] = sum(vs) / len(vs)
        else:
            merged[key] = sum(vs)
    return merged


def _counted(inputs: Mapping[str, Tensor]) -> Tensor:
    """The tokens a loss counts, as booleans: nonzero weight if `weights` is given, else a
    nonzero advantage."""
    if "weights" in inputs:
        return inputs["weights"] != 0
    return inputs["advantages"] != 0


def _mask(inputs: Mapping[str, Tensor]) -> Tensor | float:
    return inputs.get("weights", 1.0)


def _masked_mean(values: Tensor, inputs: Mapping[str, Tensor]) -> float:
    mask = _counted(inputs).float()
    total = mask.sum()
    return float((values * mask).sum() / total) if total > 0 else 0.0


def _ratio_metrics(ratio: Tensor, inputs: Mapping[str, Tensor]) -> dict[str, float]:
    return {"ratio:mean": _masked_mean(ratio.detach(), inputs)}


_RL_KEYS = ("target_tokens", "logprobs", "advantages")
_CLIP_PPO = {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}
_CLIP_CISPO = {"clip_low_threshold": 0.0, "clip_high_threshold": 4.0}
_CLIP_GSPO = {"clip_low_threshold": 1.0 - 3e-4, "clip_high_threshold": 1.0 + 4e-4}
_STABLE_REINFORCE = {"kl_coeff": 0.1, "mask_low_threshold": 0.5, "mask_high_threshold": 2.0}

LOSSES: dict[str, LossSpec] = {
    "cross_entropy": LossSpec(cross_entropy, required=("target_tokens", "weights")),
    "importance_sampling": LossSpec(importance_sampling, _RL_KEYS, ("weights",)),
    "ppo": LossSpec(ppo, _RL_KEYS, ("weights",), _CLIP_PPO),
    "cispo": LossSpec(cispo, _RL_KEYS, ("weights",), _CLIP_CISPO),
    "dro": LossSpec(dro, _RL_KEYS, ("weights",), {"beta": 0.05}),
    "gspo": LossSpec(
        gspo, _RL_KEYS, ("weights", "sequence_ratio_mask"), _CLIP_GSPO, per_datum=True
    ),
    "stable_reinforce": LossSpec(stable_reinforce, _RL_KEYS, ("weights",), _STABLE_REINFORCE),
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
