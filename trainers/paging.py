"""Adapters paged out of the model: everything a training client holds, off the device.

A trainer with `TrainerConfig.max_resident_adapters` N keeps at most N adapters' tensors in
the model; calling a paged adapter brings them back and pages out the least recently used
one. The adapter's modules stay in the model with empty parameters (an inactive adapter takes
no part in a forward pass), so paging moves tensors only: its LoRA weights, its accumulated
gradients (a forward_backward not yet stepped) and its AdamW state, as one flat record of
tensors (`PagedAdapter`). Past `max_host_adapters` records on the host (on GPU, where host
memory is the cheaper tier) a record goes to a safetensors file under the checkpoint
directory and comes back from it. Nothing is recomputed or rounded on the way, so the next
call's loss and gradients and the next optimizer step are those it would have had resident.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file


@dataclass
class PagedAdapter:
    """A paged adapter's tensors, on the host (or in the file `path`: `tensors` is then None).

    Keys: `p<i>` parameter i, `g<i>` its gradient, `o<i>.<name>` its AdamW state; `groups` are
    AdamW's param_groups (kept in memory, on disk too: they are a few numbers)."""

    tensors: dict[str, torch.Tensor] | None
    groups: list[dict[str, Any]]
    path: Path | None = None

    @property
    def on_disk(self) -> bool:
        return self.path is not None

    def to_disk(self, path: Path) -> None:
        """Writes the tensors to `path` (atomically) and drops them from memory."""
        assert self.tensors is not None
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        os.close(fd)
        save_file(self.tensors, tmp)
        os.replace(tmp, path)
        self.tensors, self.path = None, path

    def load(self) -> dict[str, torch.Tensor]:
        """The tensors (read back from the file where they were written; the file goes)."""
        if self.path is None:
            assert self.tensors is not None
            return self.tensors
        tensors = load_file(self.path)
        self.path.unlink(missing_ok=True)
        return tensors


def page_out(params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer) -> PagedAdapter:
    """The parameters' tensors, gradients and optimizer state moved to a host record; the
    parameters are left empty and without gradients."""
    tensors: dict[str, torch.Tensor] = {}
    state = optimizer.state_dict()
    for i, p in enumerate(params):
        tensors[f"p{i}"] = _host(p.data)
        if p.grad is not None:
            tensors[f"g{i}"] = _host(p.grad)
        for name, value in state["state"].get(i, {}).items():
            tensors[f"o{i}.{name}"] = _host(value)
        p.grad = None
        p.data = torch.empty(0, dtype=p.dtype, device=p.device)
    return PagedAdapter(tensors, state["param_groups"])


def page_in(
    params: list[torch.nn.Parameter], paged: PagedAdapter, optimizer: torch.optim.Optimizer
) -> None:
    """Puts a record's tensors back into the (empty) parameters and `optimizer` (new, made
    over these parameters with the same hyperparameters)."""
    tensors = paged.load()
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("o"):
            index, _, name = key[1:].partition(".")
            state.setdefault(int(index), {})[name] = value
    for i, p in enumerate(params):
        p.data = tensors[f"p{i}"].to(p.device)
        grad = tensors.get(f"g{i}")
        p.grad = None if grad is None else grad.to(p.device)
    optimizer.load_state_dict({"state": state, "param_groups": paged.groups})


def _host(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor on the host: itself on CPU (its parameter is emptied), else a copy."""
    return tensor.detach() if tensor.device.type == "cpu" else tensor.detach().to("cpu")
