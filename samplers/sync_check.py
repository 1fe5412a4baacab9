"""Checking that a weight sync took effect: sampler vs trainer logprobs on a probe sequence.

After every sync the sampler scores a fixed probe sequence (prompt logprobs) with the new
weights, and the trainer scores the same tokens (`forward`). Two checks, both pure functions:

1. Agreement: mean |sampler - trainer| must be within the tolerance (numerical noise on
   SmolLM2-135M: ~1e-5 nats in float32, ~0.05 in bfloat16).
2. Movement: when the trainer's logprobs moved since the previous sync by more than the noise,
   the sampler must have moved towards them; a sampler still answering with the old weights
   (a reload that silently did nothing) fails this even when the step was too small for (1).

The measured differences are returned as metrics (`sync/logprob_diff_mean`, `..._max`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rl.errors import WeightSyncError

PROBE_TEXT = (
    "The capital of France is Paris. Two plus two is four, and the sky is blue because "
    "air scatters short wavelengths of sunlight more than long ones."
)
FLOAT32_TOLERANCE = 1e-3
LOW_PRECISION_TOLERANCE = 0.2  # bf16 vLLM vs bf16 trainer: ~0.05 mean on SmolLM2


@dataclass(frozen=True)
class ProbeScores:
    """Logprobs of probe[1:], from the trainer and from each sampler actor."""

    trainer: list[float]
    samplers: list[list[float]]


def probe_tokens(tokenizer: Any, vocab_size: int) -> list[int]:
    """A fixed natural-text sequence (~30 tokens), all ids inside the vocabulary."""
    tokens = [t for t in tokenizer.encode(PROBE_TEXT) if 0 <= t < vocab_size]
    if len(tokens) < 8:  # an odd tokenizer: fall back to fixed ids
        tokens = [(7919 * i + 13) % vocab_size for i in range(32)]
    return tokens


def default_tolerance(sampler_dtype: str, trainer_dtype: str) -> float:
    if sampler_dtype == "float32" and trainer_dtype == "float32":
        return FLOAT32_TOLERANCE
    return LOW_PRECISION_TOLERANCE


def mean_abs_diff(a: list[float], b: list[float]) -> float:
    if len(a) != len(b) or not a:
        raise WeightSyncError(f"probe logprobs have lengths {len(a)} and {len(b)}")
    return sum(abs(x - y) for x, y in zip(a, b, strict=True)) / len(a)


def max_abs_diff(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


def check_sync(
    new: ProbeScores, previous: ProbeScores | None, tolerance: float, what: str
) -> dict[str, float]:
    """Raises WeightSyncError if a sampler disagrees with the trainer or did not move.

    Returns `sync/logprob_diff_mean` and `sync/logprob_diff_max` (worst actor).
    """
    if not new.samplers:
        raise WeightSyncError(f"weight sync of {what}: no sampler answered the probe")
    mismatches = [mean_abs_diff(s, new.trainer) for s in new.samplers]
    diff_max = max(max_abs_diff(s, new.trainer) for s in new.samplers)
    stale_from = None if previous is None else _stale_bound(new.trainer, previous)
    for index, (sampler, mismatch) in enumerate(zip(new.samplers, mismatches, strict=True)):
        stale = stale_from is not None and mismatch >= stale_from
        if mismatch > tolerance or stale:
            reason = (
                "the sampler still answers with the previous weights"
                if stale or (previous is not None and _same(sampler, previous.samplers[0]))
                else "the sampler's weights differ from the trainer's"
            )
            raise WeightSyncError(
                f"weight sync of {what} did not take effect on sampler actor {index}: "
                f"{reason} (mean |sampler - trainer| logprob difference on the probe = "
                f"{mismatch:.3g} nats, tolerance {tolerance:.3g})"
            )
    return {"sync/logprob_diff_mean": max(mismatches), "sync/logprob_diff_max": diff_max}


def _stale_bound(trainer: list[float], previous: ProbeScores) -> float | None:
    """The sampler-trainer difference from which a sampler counts as still serving the
    previous weights; None when the trainer hardly moved (nothing to tell apart)."""
    noise = max(
        max(mean_abs_diff(s, previous.trainer) for s in previous.samplers),
        1e-6,
    )
    if mean_abs_diff(trainer, previous.trainer) <= 3 * noise:
        return None
    return 0.5 * mean_abs_diff(previous.samplers[0], trainer)


def _same(a: list[float], b: list[float]) -> bool:
    return max_abs_diff(a, b) < 1e-7
