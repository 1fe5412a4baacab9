"""Merging a LoRA adapter into base weights on the sampler's side of a merged-mode sync.

A merged sync used to ship the whole merged model from the trainer (540 MB for SmolLM2 in
float32) and reload every tensor. Only the adapter's target modules change, and the adapter
itself is small (r16 on SmolLM2's seven linear modules: 20 MB), so the trainer sends the
adapter and each sampler computes `W = W0 + scale * B @ A` for those modules from a copy of
the base weights it read once from the checkpoint. The engine then reloads just those
tensors. Adapters this cannot merge exactly (embedding or DoRA adapters, modules missing from
the checkpoint) make `merge_plan` answer None, and the sync ships full weights as before.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

_PEFT_PREFIX = "base_model.model."
# A tied output head is not stored: its base weight is the input embedding (the engine of a
# merged pool unties the two, so a merged head does not change the embedding).
_TIED = {"lm_head.weight": "model.embed_tokens.weight"}
# Weights that engines stack into one matrix, in their stacked order (vLLM's `qkv_proj` and
# `gate_up_proj`). Their merged weights are row blocks of one buffer, so an engine that
# stacks them takes the buffer as it is (samplers.vllm_swap) instead of copying them together.
FUSED_ROWS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def merge_plan(
    adapter_config: Mapping[str, Any], state: Mapping[str, torch.Tensor]
) -> dict[str, tuple[str, str]] | None:
    """{base weight name: (lora_A key, lora_B key)} for a plain LoRA adapter over linear
    layers; None for anything else (the caller then merges on the trainer)."""
    if adapter_config.get("use_dora") or adapter_config.get("peft_type", "LORA") != "LORA":
        return None
    plan: dict[str, tuple[str, str]] = {}
    for key in state:
        if ".lora_A." not in key and ".lora_B." not in key:
            return None  # embedding adapters, biases, magnitude vectors...
        if ".lora_A." in key:
            module = key.split(".lora_A.")[0]
            b_key = key.replace(".lora_A.", ".lora_B.")
            if b_key not in state or not module.startswith(_PEFT_PREFIX):
                return None
            plan[f"{module.removeprefix(_PEFT_PREFIX)}.weight"] = (key, b_key)
    return plan or None


def lora_scale(adapter_config: Mapping[str, Any]) -> float:
    rank = float(adapter_config["r"])
    alpha = float(adapter_config.get("lora_alpha", rank))
    return alpha / math.sqrt(rank) if adapter_config.get("use_rslora") else alpha / rank


class BaseWeights:
    """The base checkpoint's tensors that adapters target, read on first use and kept
    (float32, on the CPU)."""

    def __init__(self, model_dir: str):
        self._dir = Path(model_dir)
        self._tensors: dict[str, torch.Tensor] = {}
        self._files: dict[str, Path] | None = None

    def get(self, names: list[str]) -> dict[str, torch.Tensor] | None:
        """The named base weights; None if any is not in the checkpoint's safetensors."""
        missing = [n for n in names if n not in self._tensors]
        if missing:
            files = self._index()
            stored = {n: _TIED.get(n, n) if n not in files else n for n in missing}
            if any(s not in files for s in stored.values()):
                return None
            from safetensors import safe_open

            by_file: dict[Path, list[str]] = {}
            for name in missing:
                by_file.setdefault(files[stored[name]], []).append(name)
            for path, wanted in by_file.items():
                with safe_open(str(path), framework="pt") as f:
                    for name in wanted:
                        self._tensors[name] = f.get_tensor(stored[name]).to(torch.float32)
        return {n: self._tensors[n] for n in names}

    def _index(self) -> dict[str, Path]:
        if self._files is None:
            index = self._dir / "model.safetensors.index.json"
            if index.exists():
                weight_map = json.loads(index.read_text())["weight_map"]
                self._files = {k: self._dir / v for k, v in weight_map.items()}
            else:
                from safetensors import safe_open

                self._files = {}
                for path in sorted(self._dir.glob("*.safetensors")):
                    with safe_open(str(path), framework="pt") as f:
                        self._files.update({k: path for k in f.keys()})  # noqa: SIM118
        return self._files


def merged_weights(
    base: BaseWeights,
    adapter_config: Mapping[str, Any],
    state: Mapping[str, torch.Tensor],
    dtype: torch.dtype,
) -> dict[str, torch.Tensor] | None:
    """The adapter's target weights merged into the base, in `dtype`, keyed as in the
    checkpoint; None if this adapter cannot be merged here (see `merge_plan`)."""
    plan = merge_plan(adapter_config, state)
    if plan is None:
        return None
    bases = base.get(sorted(plan))
    if bases is None:
        return None
    scale = lora_scale(adapter_config)
    for name, (a_key, b_key) in plan.items():
        rows, cols = bases[name].shape
        if state[b_key].shape[0] != rows or state[a_key].shape[1] != cols:
            return None  # a layout this does not know (e.g. fan_in_fan_out)
    merged: dict[str, torch.Tensor] = {}
    for group in _fused_groups(list(plan), bases):
        heights = [bases[n].shape[0] for n in group]
        buffer = torch.empty(sum(heights), bases[group[0]].shape[1], dtype=torch.float32)
        blocks = buffer.split(heights)
        for name, block in zip(group, blocks, strict=True):
            a_key, b_key = plan[name]
            a = state[a_key].to(torch.float32)
            b = state[b_key].to(torch.float32)
            torch.addmm(bases[name], b, a, alpha=scale, out=block)
        if dtype != torch.float32:
            blocks = buffer.to(dtype).split(heights)
        merged.update(zip(group, blocks, strict=True))
    return merged


def _fused_groups(names: list[str], bases: Mapping[str, torch.Tensor]) -> list[list[str]]:
    """`names` grouped into the stacks of FUSED_ROWS where a stack is whole (and its parts
    have one width); every other name alone."""
    groups: list[list[str]] = []
    taken: set[str] = set()
    wanted = set(names)
    for name in names:
        if name in taken:
            continue
        parent, _, leaf = name.removesuffix(".weight").rpartition(".")
        stack = next((s for s in FUSED_ROWS if leaf in s), None)
        group = [f"{parent}.{part}.weight" for part in stack] if stack else [name]
        if not all(n in wanted for n in group) or len({bases[n].shape[1] for n in group}) > 1:
            group = [name]
        groups.append(group)
        taken.update(group)
    return groups
