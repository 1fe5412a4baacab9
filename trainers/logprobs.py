"""Target-token logprobs without a `[tokens, vocab]` float32 tensor for the whole sequence.

The plain computation projects every hidden state onto the vocabulary, upcasts the logits to
float32, takes `log_softmax` and picks the targets: at 16k tokens and Qwen3's 151,936-word
vocabulary that is ~10 GB of logits plus as much again for the log-softmax, kept alive for
the backward pass. Here the tokens go through the output head in chunks: each chunk's logits
are computed, reduced to the targets' logprobs, and dropped. Each chunk runs under activation
checkpointing, so the backward pass recomputes one chunk's logits at a time instead of keeping
all of them: peak memory is one chunk's logits, for one extra output-head matmul per chunk.

Any output head works (a plain Linear, or a peft LoRA layer on it), since the chunk function
calls the module itself. Row-wise, the numbers are the plain computation's.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.checkpoint import checkpoint

Tensor = torch.Tensor


def target_logprobs(
    head: Callable[[Tensor], Tensor],
    hidden_T_H: Tensor,
    targets_T_K: Tensor,
    softcap: float | None = None,
    chunk_tokens: int = 0,
) -> Tensor:
    """log p(targets[t, k] | hidden[t]) as float32 `[T, K]`: `head` maps `[n, H]` hidden
    states to `[n, V]` logits; `softcap` is Gemma-style tanh capping. `chunk_tokens` tokens
    per chunk; 0 computes all tokens at once (the plain computation)."""
    if chunk_tokens <= 0 or hidden_T_H.shape[0] <= chunk_tokens:
        return _chunk(head, softcap, hidden_T_H, targets_T_K)
    checkpointed = torch.is_grad_enabled()
    pieces = []
    for start in range(0, hidden_T_H.shape[0], chunk_tokens):
        hidden, targets = (
            hidden_T_H[start : start + chunk_tokens],
            targets_T_K[start : start + chunk_tokens],
        )
        if checkpointed:
            pieces.append(checkpoint(_chunk, head, softcap, hidden, targets, use_reentrant=False))
        else:
            pieces.append(_chunk(head, softcap, hidden, targets))
    return torch.cat(pieces)  # type: ignore[arg-type]


def _chunk(
    head: Callable[[Tensor], Tensor], softcap: float | None, hidden: Tensor, targets: Tensor
) -> Tensor:
    logits = head(hidden).float()  # [n, V]
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    # log_softmax, not logits - logsumexp: its fused kernels (forward and backward) take less
    # than half the time on CPU.
    return torch.log_softmax(logits, dim=-1).gather(-1, targets)
