"""Checks a `sample` call against the engine's limits and turns it into a `SampleRequest`.

Runs in the client before anything is sent, so bad input raises `InvalidRequestError` naming
the field, and no actor ever sees it.
"""

from __future__ import annotations

import math
import uuid
from typing import Any

import numpy as np

from rl.errors import InvalidRequestError
from rl.types import ModelInput, SamplingParams, TensorData
from samplers.types import BASE, EngineInfo, SampleRequest, WeightsVersion

_INT64_MAX = 2**63 - 1


def prompt_tokens(prompt: Any) -> list[int]:
    """The token ids of a `ModelInput` (or a plain list of ints)."""
    if isinstance(prompt, ModelInput):
        tokens = prompt.to_ints()
    elif isinstance(prompt, (list, tuple)):
        tokens = list(prompt)
    else:
        raise InvalidRequestError(
            f"prompt must be a ModelInput or a list of token ids, got {type(prompt).__name__}"
        )
    for i, token in enumerate(tokens):
        if isinstance(token, bool) or not isinstance(token, int):
            raise InvalidRequestError(f"prompt token {i} is {token!r}, not an int")
    return tokens


def check_tokens(tokens: list[int], vocab_size: int, what: str) -> None:
    for i, token in enumerate(tokens):
        if not 0 <= token < vocab_size:
            raise InvalidRequestError(
                f"{what}[{i}]={token} is outside the vocabulary [0, {vocab_size})"
            )


def check_sampling_params(params: SamplingParams, info: EngineInfo) -> None:
    # vLLM's range; the torch engine keeps it too, so both engines accept the same requests.
    if not math.isfinite(params.temperature) or not 0 <= params.temperature <= 2:
        raise InvalidRequestError(
            f"sampling_params.temperature={params.temperature} must be in [0, 2]"
        )
    if not math.isfinite(params.top_p) or not 0 < params.top_p <= 1:
        raise InvalidRequestError(f"sampling_params.top_p={params.top_p} must be in (0, 1]")
    if params.top_k == 0 or params.top_k < -1:
        raise InvalidRequestError(
            f"sampling_params.top_k={params.top_k} must be -1 (no limit) or >= 1"
        )
    if params.seed is not None and not 0 <= params.seed <= _INT64_MAX:
        raise InvalidRequestError(f"sampling_params.seed={params.seed} must be in [0, 2**63)")
    stop = params.stop
    if isinstance(stop, str):
        stop = [stop]
    for i, item in enumerate(stop or []):
        if isinstance(item, str) and not item:
            raise InvalidRequestError(f"sampling_params.stop[{i}] is an empty string")
        if isinstance(item, int):
            check_tokens([item], info.vocab_size, "sampling_params.stop")
    if stop and len({type(item) for item in stop}) > 1:
        raise InvalidRequestError("sampling_params.stop mixes strings and token ids")
    if params.logprobs_mode != info.logprobs_mode and info.engine == "vllm":
        raise InvalidRequestError(
            f"sampling_params.logprobs_mode={params.logprobs_mode!r}, but this vLLM sampler "
            f"returns {info.logprobs_mode!r} logprobs (vLLM fixes the mode per engine); "
            f"start the sampler with SamplerConfig(logprobs_mode={params.logprobs_mode!r})"
        )


def build_request(
    prompt: Any,
    num_samples: int,
    sampling_params: SamplingParams | None,
    info: EngineInfo,
    *,
    include_prompt_logprobs: bool = False,
    topk_prompt_logprobs: int = 0,
    topk_sample_logprobs: int = 0,
    target_prompt_logprobs: Any = None,
    prompt_alt_tokens_k: int = 0,
    prompt_logprobs_last_n: int | None = None,
    weights: WeightsVersion = BASE,
) -> SampleRequest:
    """Validates one `sample` call; raises `InvalidRequestError` naming the bad field."""
    tokens = prompt_tokens(prompt)
    if not tokens:
        raise InvalidRequestError("prompt is empty: at least one token is needed")
    check_tokens(tokens, info.vocab_size, "prompt")
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise InvalidRequestError(f"num_samples={num_samples!r} must be an int >= 1")
    params = sampling_params if sampling_params is not None else SamplingParams()
    if not isinstance(params, SamplingParams):
        raise InvalidRequestError(
            f"sampling_params must be a SamplingParams, got {type(params).__name__}"
        )
    check_sampling_params(params, info)
    room = info.max_model_len - len(tokens)
    if params.max_tokens is None:
        if room < 1:
            raise InvalidRequestError(
                f"prompt has {len(tokens)} tokens: no room left to generate in the "
                f"{info.max_model_len}-token context"
            )
        max_tokens = room
    elif params.max_tokens < 1:
        raise InvalidRequestError(f"sampling_params.max_tokens={params.max_tokens} must be >= 1")
    elif params.max_tokens > room:
        raise InvalidRequestError(
            f"prompt ({len(tokens)} tokens) + max_tokens ({params.max_tokens}) exceeds the "
            f"context length {info.max_model_len}"
        )
    else:
        max_tokens = params.max_tokens
    for name, k in (
        ("topk_prompt_logprobs", topk_prompt_logprobs),
        ("topk_sample_logprobs", topk_sample_logprobs),
        ("prompt_alt_tokens_k", prompt_alt_tokens_k),
    ):
        check_count(name, k, info.max_logprobs)
    scored = bool(include_prompt_logprobs) or bool(topk_prompt_logprobs)
    check_last_n(prompt_logprobs_last_n, scored, len(tokens))
    targets = target_rows(target_prompt_logprobs, len(tokens), info.vocab_size)
    return SampleRequest(
        request_id=uuid.uuid4().hex,
        prompt=tokens,
        num_samples=num_samples,
        params=params,
        max_tokens=max_tokens,
        include_prompt_logprobs=bool(include_prompt_logprobs),
        topk_prompt_logprobs=int(topk_prompt_logprobs),
        topk_sample_logprobs=int(topk_sample_logprobs),
        target_prompt_logprobs=targets,
        prompt_alt_tokens_k=int(prompt_alt_tokens_k),
        prompt_logprobs_last_n=prompt_logprobs_last_n,
        weights=weights,
    )


def check_count(name: str, k: Any, limit: int) -> None:
    """A per-position count (top-k, draws) is an int in [0, SamplerConfig.max_logprobs]."""
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= limit:
        raise InvalidRequestError(
            f"{name}={k!r} must be an int in [0, {limit}] (SamplerConfig.max_logprobs)"
        )


def check_last_n(last_n: Any, scored: bool, prompt_length: int) -> None:
    if last_n is None:
        return
    if not scored:
        raise InvalidRequestError(
            "prompt_logprobs_last_n applies to prompt logprobs: set include_prompt_logprobs "
            "or topk_prompt_logprobs"
        )
    if isinstance(last_n, bool) or not isinstance(last_n, int) or not 1 <= last_n < prompt_length:
        raise InvalidRequestError(
            f"prompt_logprobs_last_n={last_n!r} must be an int in [1, {prompt_length - 1}] "
            f"(the prompt has {prompt_length} tokens)"
        )


def target_rows(
    targets: Any, prompt_length: int, vocab_size: int
) -> tuple[tuple[int, ...], ...] | None:
    """`target_prompt_logprobs` (a TensorData, array or nested list of ints) as dense rows of
    [len(prompt) - 1, K] token ids; -1 asks for nothing."""
    if targets is None:
        return None
    if isinstance(targets, TensorData):
        if targets.dtype != "int64":
            raise InvalidRequestError(
                f"target_prompt_logprobs must hold int64 token ids, got {targets.dtype}"
            )
        targets = targets.to_numpy(pad=-1)  # unlisted cells of a sparse one ask for nothing
    try:
        array = np.asarray(targets)
    except ValueError:
        raise InvalidRequestError(
            "target_prompt_logprobs is ragged: every row needs K ids"
        ) from None
    if array.ndim != 2 or array.shape[0] != prompt_length - 1:
        raise InvalidRequestError(
            f"target_prompt_logprobs has shape {list(array.shape)}; it must be "
            f"[len(prompt) - 1, K] = [{prompt_length - 1}, K]"
        )
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise InvalidRequestError(
            f"target_prompt_logprobs must hold integer token ids, got {array.dtype}"
        )
    bad = np.argwhere((array < -1) | (array >= vocab_size))
    if len(bad):
        row, col = (int(x) for x in bad[0])
        raise InvalidRequestError(
            f"target_prompt_logprobs[{row}][{col}]={int(array[row, col])} is outside the "
            f"vocabulary [0, {vocab_size}) (-1 asks for nothing)"
        )
    return tuple(tuple(int(x) for x in row) for row in array.astype(np.int64))
