"""Several adapters in one pass over the base model: each row of a batch with its own adapter.

A LoRA layer's output is its base projection plus its adapter's low-rank update. In a shared
pass the rows of a batch are grouped by adapter; each LoRA layer computes the base projection
for all rows at once (peft's "__base__" rows, through forward pre-hooks) and each adapter's
update is then added to its own slice of rows (a forward hook). It is ordinary autograd, so
the gradient of each adapter's parameters comes from its own rows only, exactly as in a pass
of its own. `rows_with_adapters` does this for the decoder's layers; `tokens_with_adapter`
hands peft's per-row `adapter_names` to the output head for tokens that all belong to one
adapter (the head runs on the real positions only, flattened, and in chunks on GPU).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from rl.types import Datum


@dataclass
class Call:
    """One adapter's `forward` or `forward_backward`, to run in a shared pass."""

    model_id: str
    data: list[Datum]
    loss_fn: str = "cross_entropy"
    loss_fn_config: dict[str, float] | None = field(default=None)
    backward: bool = True


@dataclass
class MixedBatch:
    """Datums of several adapters in one pass: datum i runs with adapter names[owners[i]]."""

    owners: list[int]
    names: list[str]


@contextlib.contextmanager
def adapters_of_rows(
    module: torch.nn.Module, mixed: MixedBatch | None, row_datums: list[int]
) -> Iterator[None]:
    """Rows whose datums are `row_datums` (sorted by adapter: each adapter's rows are one
    slice) each with its datum's adapter; nothing (one adapter is active for all) without
    `mixed`."""
    if mixed is None:
        yield
        return
    owners = [mixed.owners[i] for i in row_datums]
    assert owners == sorted(owners), "rows must be grouped by adapter"
    spans = []
    for owner in dict.fromkeys(owners):
        start = owners.index(owner)
        spans.append((mixed.names[owner], start, start + owners.count(owner)))
    with rows_with_adapters(module, spans, len(owners)):
        yield


@contextlib.contextmanager
def rows_with_adapters(
    module: torch.nn.Module, spans: list[tuple[str, int, int]], rows: int
) -> Iterator[None]:
    """While inside, rows start:stop of every LoRA layer's input under `module` use adapter
    `name`, for each (name, start, stop) in `spans`: the layer computes its base projection
    alone (peft's "__base__" rows), then each adapter's low-rank update is added to its slice
    of the output (views: no copy of the activations)."""
    base = ["__base__"] * rows

    def base_only(_: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        kwargs["adapter_names"] = base
        return args, kwargs

    def add_updates(layer: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> Any:
        x = args[0]
        for name, start, stop in spans:
            if name in layer.lora_A:
                part = x[start:stop].to(layer.lora_A[name].weight.dtype)
                update = layer.lora_B[name](layer.lora_A[name](layer.lora_dropout[name](part)))
                out[start:stop] += (update * layer.scaling[name]).to(out.dtype)
        return out

    with _hooks(module, base_only, add_updates):
        yield


@contextlib.contextmanager
def tokens_with_adapter(head: torch.nn.Module, name: str) -> Iterator[None]:
    """While inside, every input row of the head's LoRA layers uses adapter `name`, however the
    tokens are chunked."""

    def hand(_: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        kwargs["adapter_names"] = [name] * args[0].shape[0]
        return args, kwargs

    with _hooks(head, hand):
        yield


@contextlib.contextmanager
def _hooks(module: torch.nn.Module, before: Any, after: Any = None) -> Iterator[None]:
    from peft.tuners.lora import LoraLayer  # here: the driver imports `Call` without peft

    handles = []
    for m in module.modules():
        if isinstance(m, LoraLayer):
            handles.append(m.register_forward_pre_hook(before, with_kwargs=True))
            if after is not None:
                handles.append(m.register_forward_hook(after, with_kwargs=True))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
