"""Records that travel between the sampling client, the pool, the sampler actors and engines.

The user-facing records (`SamplingParams`, `SampleResponse`) live in `rl/types.py`; these are
the internal ones: which weights serve a request, the request as an engine sees it (already
validated), and what an engine reports about itself.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, TypeAlias, TypeVar

from rl.types import SamplingParams

if TYPE_CHECKING:
    import torch

WeightsKind = Literal["base", "adapter", "merged"]
T = TypeVar("T")


@dataclass(frozen=True)
class WeightsVersion:
    """Which weights must serve a request.

    base: the base model. adapter: the LoRA adapter registered under `version` (an id unique
    within one pool, never reused). merged: full weights of `model_id` at sync number
    `version`, exactly (an engine holding newer ones answers `WeightsSupersededError`).
    """

    kind: WeightsKind = "base"
    model_id: str = ""
    version: int = 0

    def describe(self) -> str:
        if self.kind == "base":
            return "the base model"
        return f"{self.kind} weights of {self.model_id!r} (version {self.version})"


BASE = WeightsVersion()

# Full weights (HF names), or a function that makes them, which the engine calls on its own
# thread once the running requests have finished: a merge there runs ~20% faster on CPU (the
# engine's OpenMP threads are bound and warm; a second thread's team competes with them).
FullWeights: TypeAlias = "Mapping[str, torch.Tensor] | Callable[[], Mapping[str, torch.Tensor]]"


@dataclass(frozen=True)
class SampleRequest:
    """One validated `sample` call: `num_samples` completions of one prompt."""

    request_id: str
    prompt: list[int]
    num_samples: int
    params: SamplingParams
    max_tokens: int  # resolved: never None here
    include_prompt_logprobs: bool = False
    topk_prompt_logprobs: int = 0
    topk_sample_logprobs: int = 0
    """Top-k (token, logprob) pairs at every sampled position, in the sampled logprobs' mode."""
    target_prompt_logprobs: tuple[tuple[int, ...], ...] | None = None
    """Dense [len(prompt) - 1, K] token ids: row i asks for logprobs at prompt position i + 1;
    -1 asks for nothing."""
    prompt_alt_tokens_k: int = 0
    """Draws per prompt position after the first, at the request's sampling settings."""
    prompt_logprobs_last_n: int | None = None
    """Prompt logprobs (and top-k) only for the last N prompt tokens; earlier ones are None."""
    weights: WeightsVersion = BASE
    owner: str = ""
    """Whose request it is, for the pool's fair turns (samplers/fair.py): the server names the
    tenant. "": the model whose weights are sampled (`weights.model_id`; all base-model
    requests of the process then share one turn)."""

    def scored_prompt(self, values: list[T]) -> list[T | None]:
        """Per prompt position, from `values` (one per position after the first): None at
        position 0 and before the last `prompt_logprobs_last_n` tokens."""
        length = len(self.prompt)
        last_n = self.prompt_logprobs_last_n
        first = 1 if last_n is None else length - last_n
        return [None if i < first else values[i - 1] for i in range(length)]

    def turn_owner(self) -> str:
        """The queue the request waits in when the pool's window is full."""
        return self.owner or self.weights.model_id


@dataclass(frozen=True)
class EngineInfo:
    engine: Literal["vllm", "torch"]
    model_dir: str
    vocab_size: int
    max_model_len: int
    dtype: str  # "float32", "bfloat16", ...
    device: str  # "cpu" or "cuda"
    eos_token_id: int | None
    logprobs_mode: Literal["model", "sampled"]
    max_logprobs: int
    lora_enabled: bool
    max_lora_rank: int
    extra: dict[str, Any] = field(default_factory=dict)


class EngineFailedError(RuntimeError):
    """The actor's engine broke (e.g. a kernel refused the model); the actor is ending and
    Ray restarts it. Carries the engine's own error, which a bare process death would lose."""


class WeightsSupersededError(RuntimeError):
    """A merged engine holds newer weights than the request's (a later sync replaced them).

    A merged engine holds one set of weights; the sampling client of the older ones then
    samples them from their adapter on a LoRA pool instead (rl/client/snapshot.py)."""

    def __init__(self, weights: WeightsVersion, holder: str):
        super().__init__(f"{holder} no longer holds {weights.describe()}: a later sync replaced it")
        self.weights = weights
        self.holder = holder

    def __reduce__(self):  # keep the fields through Ray's pickling
        return (type(self), (self.weights, self.holder))


class WeightsNotLoadedError(RuntimeError):
    """The actor does not hold the weights a request asked for (e.g. it was restarted).

    The pool answers by pushing those weights again and resubmitting; callers never see it.
    """

    def __init__(self, weights: WeightsVersion, incarnation: str):
        super().__init__(f"sampler actor {incarnation} does not hold {weights.describe()}")
        self.weights = weights
        self.incarnation = incarnation

    def __reduce__(self):  # keep the fields through Ray's pickling
        return (type(self), (self.weights, self.incarnation))
