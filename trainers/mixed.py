"""Several adapters in one pass over the base model: each row of a batch with its own adapter.

peft computes a LoRA layer's output for rows that name different adapters (`adapter_names`,
one per row: the base projection for all rows at once, then each adapter's low-rank update for
its own rows). It is built for inference, behind a check that the model is in eval mode; the
computation itself is ordinary autograd, so the gradient of each adapter's parameters comes
from its own rows only, exactly as in a pass of its own. These context managers hand the
names to the layers (forward pre-hooks, as peft's own `_enable_peft_forward_hooks` does,
without its eval-mode check): `rows_with_adapters` to the decoder's layers for a batch of rows,
`tokens_with_adapter` to the output head for tokens that all belong to one adapter (the head
runs on the real positions only, flattened, and in chunks on GPU).
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
    """Rows whose datums are `row_datums` each with its datum's adapter (nothing: one adapter
    is active for all, without `mixed`)."""
    if mixed is None:
        yield
        return
    with rows_with_adapters(module, [mixed.names[mixed.owners[i]] for i in row_datums]):
        yield


@contextlib.contextmanager
def rows_with_adapters(module: torch.nn.Module, names: list[str]) -> Iterator[None]:
    """While inside, row i of every LoRA layer's input under `module` uses adapter names[i]."""

    def hand(_: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        kwargs["adapter_names"] = names
        return args, kwargs

    with _hooks(module, hand):
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
def _hooks(module: torch.nn.Module, hook: Any) -> Iterator[None]:
    from peft.tuners.lora import LoraLayer  # here: the driver imports `Call` without peft

    handles = [
        m.register_forward_pre_hook(hook, with_kwargs=True)
        for m in module.modules()
        if isinstance(m, LoraLayer)
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
