"""Checks a batch before it touches the model, and turns it into tensors.

Everything that can be wrong with a request is found here, so a bad request fails before any
gradient is accumulated. Errors name the datum index and the field.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from rl.errors import InvalidRequestError
from rl.types import Datum
from trainers import custom_graph
from trainers.custom_graph import CustomGraph
from trainers.losses import LOSSES, resolve_config

FLOAT_KEYS = ("weights", "advantages", "logprobs", "sequence_ratio_mask")


@dataclass
class PreparedDatum:
    tokens: torch.Tensor  # [N] int64
    inputs: dict[str, torch.Tensor]  # each [N] or [N, K]

    @property
    def length(self) -> int:
        return int(self.tokens.shape[0])


@dataclass
class PreparedBatch:
    loss_fn: str
    loss_fn_config: dict[str, float]
    datums: list[PreparedDatum]
    custom: CustomGraph | None = None  # the rebuilt graph of loss_fn "custom"


def prepare_batch(
    data: Sequence[Datum],
    loss_fn: str,
    loss_fn_config: Mapping[str, float] | None,
    *,
    vocab_size: int,
    max_context: int,
) -> PreparedBatch:
    custom, config = None, {}
    if loss_fn == custom_graph.CUSTOM:  # loss_fn_config holds the graph (trainers/custom_graph.py)
        custom = custom_graph.from_config(loss_fn_config)
    elif loss_fn not in LOSSES:
        known = ", ".join(sorted(LOSSES))
        raise InvalidRequestError(
            f"unknown loss {loss_fn!r}; built-in losses: {known} (and 'custom', a graph)"
        )
    else:
        config = resolve_config(loss_fn, loss_fn_config)
    if not isinstance(data, (list, tuple)) or len(data) == 0:
        raise InvalidRequestError("empty batch: forward_backward needs at least one datum")
    datums = [
        _prepare_datum(i, datum, loss_fn, custom, vocab_size=vocab_size, max_context=max_context)
        for i, datum in enumerate(data)
    ]
    trailing = {tuple(d.inputs["target_tokens"].shape[1:]) for d in datums}
    if len(trailing) > 1:
        raise InvalidRequestError(
            f"target_tokens of the batch mix trailing shapes {sorted(trailing)}; top-K targets "
            "must use the same K in every datum of one call"
        )
    return PreparedBatch(loss_fn, config, datums, custom)


def _prepare_datum(
    index: int,
    datum: Datum,
    loss_fn: str,
    custom: CustomGraph | None,
    *,
    vocab_size: int,
    max_context: int,
) -> PreparedDatum:
    where = f"datum {index}"
    if isinstance(datum, dict):
        try:
            datum = Datum.model_validate(datum)
        except ValueError as e:
            raise InvalidRequestError(f"{where}: {e}") from None
    if not isinstance(datum, Datum):
        raise InvalidRequestError(f"{where}: expected a Datum, got {type(datum).__name__}")
    tokens = datum.model_input.to_ints()
    n = len(tokens)
    if n == 0:
        raise InvalidRequestError(f"{where}: model_input is empty")
    if n > max_context:
        raise InvalidRequestError(
            f"{where}: model_input has {n} tokens, more than the model's context of {max_context}"
        )
    _check_token_ids(f"{where}: model_input", np.asarray(tokens), vocab_size)
    if custom is not None:
        return _custom_datum(where, datum, tokens, custom, vocab_size)

    spec = LOSSES[loss_fn]
    provided = set(datum.loss_fn_inputs)
    missing = [k for k in spec.required if k not in provided]
    if missing:
        raise InvalidRequestError(
            f"{where}: loss_fn_inputs is missing {missing} required by {loss_fn!r}"
        )
    unknown = sorted(provided - set(spec.required) - set(spec.optional))
    if unknown:
        raise InvalidRequestError(
            f"{where}: loss_fn_inputs keys {unknown} are not used by {loss_fn!r} "
            f"(it takes {list(spec.required) + list(spec.optional)})"
        )

    inputs: dict[str, torch.Tensor] = {}
    target_shape: tuple[int, ...] = ()
    for key in spec.required + spec.optional:
        if key not in provided:
            continue
        array = datum.loss_fn_inputs[key].to_numpy()
        field = f"{where}: loss_fn_inputs[{key!r}]"
        if array.ndim == 0 or array.shape[0] != n:
            raise InvalidRequestError(
                f"{field} has shape {list(array.shape)} but model_input has {n} tokens"
            )
        if key == "target_tokens":
            if array.ndim > 2 or (array.ndim == 2 and loss_fn != "cross_entropy"):
                raise InvalidRequestError(
                    f"{field} has shape {list(array.shape)}; [N, K] targets are only "
                    "supported by cross_entropy"
                )
            _check_token_ids(field, array, vocab_size)
            target_shape = array.shape
            inputs[key] = torch.from_numpy(array.astype(np.int64))
        else:
            if array.ndim > 2:
                raise InvalidRequestError(f"{field} has shape {list(array.shape)}")
            if not np.isfinite(array).all():
                bad = int(np.flatnonzero(~np.isfinite(array.reshape(-1)))[0])
                raise InvalidRequestError(
                    f"{field} holds a non-finite value ({array.reshape(-1)[bad]}) at flat index {bad}"
                )
            inputs[key] = torch.from_numpy(array.astype(np.float32))
    for key, tensor in inputs.items():
        if key != "target_tokens" and tuple(tensor.shape) != tuple(target_shape):
            raise InvalidRequestError(
                f"{where}: loss_fn_inputs[{key!r}] has shape {list(tensor.shape)} but "
                f"target_tokens has shape {list(target_shape)}"
            )
    return PreparedDatum(tokens=torch.tensor(tokens, dtype=torch.int64), inputs=inputs)


def _custom_datum(
    where: str, datum: Datum, tokens: list[int], custom: CustomGraph, vocab_size: int
) -> PreparedDatum:
    """A datum of a custom loss: the keys its graph reads, at their declared ranks (others
    are ignored: the SDK sends every key)."""
    inputs = custom.datum_inputs(where, datum.loss_fn_inputs, len(tokens))
    field = f"{where}: loss_fn_inputs['target_tokens']"
    _check_token_ids(field, inputs["target_tokens"].numpy(), vocab_size)
    return PreparedDatum(tokens=torch.tensor(tokens, dtype=torch.int64), inputs=inputs)


def _check_token_ids(field: str, array: np.ndarray, vocab_size: int) -> None:
    flat = array.reshape(-1)
    bad = np.flatnonzero((flat < 0) | (flat >= vocab_size))
    if bad.size:
        i = int(bad[0])
        raise InvalidRequestError(
            f"{field}: token id {int(flat[i])} at flat index {i} is outside the vocabulary "
            f"[0, {vocab_size})"
        )
