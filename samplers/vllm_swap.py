"""Replacing merged linear weights in a CPU vLLM model without its layerwise reload.

On CPU, vLLM packs each linear layer's weight into a oneDNN handle after loading and drops
the original tensor. `reload_weights` therefore rebuilds every touched layer: it restores the
layer's parameters from meta tensors, runs the checkpoint's weight loaders (one copy per
shard), then packs again. A merged LoRA sync touches only linear layers and always sends all
of a fused layer's shards (q, k and v; gate and up), so the rebuild can be skipped: stack the
shards in the order the model fuses them and hand the tensor to the layer's own
`process_weights_after_loading`, which packs it exactly as a load would.

`plan_swap` decides, before anything changes, whether a state dict can take this path: every
tensor must be a whole linear layer (or all shards of a fused one) or an untied output head,
of the right shape, in a Llama-style model that vLLM runs eagerly on one CPU worker. Anything
else answers None and the caller reloads through vLLM as before.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

import torch

# Architectures whose vLLM `load_weights` stacks checkpoint shards unchanged in the order of
# `packed_modules_mapping` (no permutation, no renaming of these modules), checked against a
# forward in tests/test_sampler_vllm.py. Others (Qwen2's loader looks the same) reload.
SWAPPABLE_ARCHITECTURES = frozenset({"LlamaForCausalLM"})


@dataclass(frozen=True)
class LayerSwap:
    """One layer's new weight: the layer, and its shards' names in fused order."""

    layer: Any
    shards: tuple[str, ...]
    head: bool  # the output head (an embedding-shaped layer that keeps its weight)


def plan_swap(
    model: Any, architecture: str, weights: Mapping[str, torch.Tensor]
) -> list[LayerSwap] | None:
    """How to swap in `weights` (checkpoint names), or None if this model or these weights
    (their names or shapes) need vLLM's full reload."""
    from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
    from vllm.model_executor.layers.vocab_parallel_embedding import (
        ParallelLMHead,
        UnquantizedEmbeddingMethod,
    )

    if architecture not in SWAPPABLE_ARCHITECTURES or not weights:
        return None
    packed: Mapping[str, list[str]] = getattr(model, "packed_modules_mapping", {}) or {}
    fused_of = {part: fused for fused, parts in packed.items() for part in parts}
    modules = dict(model.named_modules())
    plan: dict[str, LayerSwap] = {}
    for name in weights:
        if not name.endswith(".weight") or weights[name].dim() != 2:
            return None
        parent, _, leaf = name.removesuffix(".weight").rpartition(".")
        fused = fused_of.get(leaf)
        module_name = f"{parent}.{fused}" if fused and parent else name.removesuffix(".weight")
        if module_name in plan:
            continue
        layer = modules.get(module_name)
        if layer is None or getattr(layer, "tp_size", 1) != 1:
            return None
        if isinstance(layer, ParallelLMHead):
            embed = modules.get(module_name.replace("lm_head", "model.embed_tokens"))
            weight = cast(torch.Tensor, layer.weight)
            tied = embed is not None and cast(torch.Tensor, embed.weight).data_ptr() == (
                weight.data_ptr()
            )
            rows, cols = weights[name].shape
            if (
                not isinstance(layer.quant_method, UnquantizedEmbeddingMethod)
                or tied
                or weight.dim() != 2
                or cols != weight.shape[1]
                or rows > weight.shape[0]
            ):
                return None
            plan[module_name] = LayerSwap(layer, (name,), head=True)
            continue
        if not isinstance(layer, LinearBase) or not isinstance(
            layer.quant_method, UnquantizedLinearMethod
        ):
            return None
        shards = tuple(f"{parent}.{part}.weight" for part in packed[fused]) if fused else (name,)
        if any(shard not in weights for shard in shards):
            return None  # part of a fused layer: the other parts' weights are packed away
        sizes = getattr(layer, "output_partition_sizes", [layer.output_size_per_partition])
        if [weights[s].shape[0] for s in shards] != list(sizes) or any(
            weights[s].shape[1] != layer.input_size_per_partition for s in shards
        ):
            return None
        plan[module_name] = LayerSwap(layer, shards, head=False)
    return list(plan.values())


def apply_swap(
    plan: list[LayerSwap], weights: Mapping[str, torch.Tensor], dtype: torch.dtype
) -> None:
    """Stacks each layer's shards and packs them through the layer's own quant method."""
    for swap in plan:
        layer = swap.layer
        if swap.head:
            new = weights[swap.shards[0]]
            layer.weight.data[: new.shape[0]].copy_(new)
        else:
            tensors = [weights[s].to(dtype) for s in swap.shards]
            stacked = _one_buffer(tensors)
            if stacked is None:
                stacked = tensors[0].contiguous() if len(tensors) == 1 else torch.cat(tensors)
            layer.weight = torch.nn.Parameter(stacked, requires_grad=False)
        layer.quant_method.process_weights_after_loading(layer)


def _one_buffer(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """The contiguous matrix whose consecutive row blocks `tensors` are (as
    `samplers.merge.merged_weights` writes stacked weights), or None."""
    whole = tensors[0]._base
    if whole is None or whole.dim() != 2 or not whole.is_contiguous():
        return None
    if whole.shape[0] != sum(t.shape[0] for t in tensors):
        return None
    at = whole.data_ptr()
    for t in tensors:
        if t._base is not whole or t.data_ptr() != at or t.shape[1:] != whole.shape[1:]:
            return None
        at += t.numel() * t.element_size()
    return whole


def swap_on_worker(worker: Any, weights: dict[str, torch.Tensor]) -> bool:
    """Runs on the vLLM worker (`collective_rpc`): swaps the weights in and answers True, or
    answers False having changed nothing."""
    vllm_config = worker.vllm_config
    model_config = vllm_config.model_config
    if (
        not model_config.enforce_eager
        or model_config.quantization is not None
        or vllm_config.parallel_config.world_size != 1
        or worker.device.type != "cpu"
    ):
        return False
    model = worker.model_runner.get_model()
    architecture = (model_config.architectures or [""])[0]
    plan = plan_swap(model, architecture, weights)
    if plan is None:
        return False
    apply_swap(plan, weights, model_config.dtype)
    return True
