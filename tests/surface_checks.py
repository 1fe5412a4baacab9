"""Checks of the sampling surface shared by the engine tests and the server test: every
option's numbers against a reference model's own log-softmax.

`sample(prompt, num_samples, params, **options)` returns a SampleResponse (ours or the SDK's:
only the fields both share are read); `reference(tokens)` returns [len(tokens) - 1, V]
log-softmax rows, row i the distribution of tokens[i + 1].
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

Sample = Callable[..., Any]
Reference = Callable[[list[int]], torch.Tensor]


def check_topk_sample_logprobs(
    sample: Sample, reference: Reference, prompt: list[int], tol: float
) -> None:
    response = sample(
        prompt, 2, {"max_tokens": 4, "seed": 3, "temperature": 1.0}, topk_sample_logprobs=3
    )
    for sequence in response.sequences:
        rows = reference(prompt + list(sequence.tokens))
        assert len(sequence.topk_logprobs) == len(sequence.tokens)
        for j, top in enumerate(sequence.topk_logprobs):
            row = rows[len(prompt) - 1 + j]
            assert len(top) == 3
            third = torch.topk(row, 3).values[-1].item()
            for token, logprob in top:
                assert logprob == pytest.approx(row[token].item(), abs=tol), (
                    j,
                    token,
                    logprob,
                    row[token].item(),
                )
                assert logprob >= third - tol  # among the three best
            assert [lp for _, lp in top] == sorted((lp for _, lp in top), reverse=True)


def target_ids(prompt: list[int], vocab: int) -> list[list[int]]:
    """[len(prompt) - 1, 3]: the real next token, another id, and -1 on every other row."""
    return [
        [prompt[i + 1], (31 * i + 7) % vocab, -1 if i % 2 == 0 else (i + 2) % vocab]
        for i in range(len(prompt) - 1)
    ]


def check_target_prompt_logprobs(
    values: list[list[float]],
    targets: list[list[int]],
    reference: Reference,
    prompt: list[int],
    tol: float,
) -> None:
    rows = reference(prompt)
    assert len(values) == len(targets)
    for i, (ids, got) in enumerate(zip(targets, values, strict=True)):
        expected = [0.0 if t < 0 else rows[i, t].item() for t in ids]
        assert got == pytest.approx(expected, abs=tol), f"row {i}"


def check_prompt_alt_tokens(
    sample: Sample, reference: Reference, prompt: list[int], tol: float
) -> None:
    params = {"max_tokens": 1, "seed": 5, "temperature": 1.0}
    first = sample(prompt, 1, params, prompt_alt_tokens_k=4).prompt_alt_tokens
    again = sample(prompt, 1, params, prompt_alt_tokens_k=4).prompt_alt_tokens
    tokens, logprobs = _rows(first.tokens), _rows(first.logprobs)
    assert len(tokens) == len(prompt) - 1 and all(len(row) == 4 for row in tokens)
    assert _rows(again.tokens) == tokens  # seeded: the same draws
    assert len({t for row in tokens for t in row}) > 4  # draws, not one token repeated
    rows = reference(prompt)
    for i, (ids, got) in enumerate(zip(tokens, logprobs, strict=True)):
        assert got == pytest.approx([rows[i, t].item() for t in ids], abs=tol), f"row {i}"
    greedy = sample(prompt, 1, {"max_tokens": 1, "temperature": 0.0}, prompt_alt_tokens_k=2)
    best = rows.argmax(dim=-1).tolist()
    assert _rows(greedy.prompt_alt_tokens.tokens) == [[b, b] for b in best]


def check_prompt_logprobs_last_n(
    sample: Sample, reference: Reference, prompt: list[int], tol: float
) -> None:
    response = sample(
        prompt,
        1,
        {"max_tokens": 1},
        include_prompt_logprobs=True,
        topk_prompt_logprobs=2,
        prompt_logprobs_last_n=2,
    )
    rows = reference(prompt)
    scored = len(prompt) - 2
    assert response.prompt_logprobs[:scored] == [None] * scored
    expected = [rows[i - 1, prompt[i]].item() for i in range(scored, len(prompt))]
    assert response.prompt_logprobs[scored:] == pytest.approx(expected, abs=tol)
    assert response.topk_prompt_logprobs[:scored] == [None] * scored
    for i in range(scored, len(prompt)):
        top = response.topk_prompt_logprobs[i]
        assert [t for t, _ in top] == torch.topk(rows[i - 1], 2).indices.tolist()


def _rows(value: Any) -> list[list[Any]]:
    """Nested lists from our nested lists or the SDK's TensorData."""
    return value.tolist() if hasattr(value, "tolist") else [list(row) for row in value]
