"""LoRA adapter plumbing on top of peft: which modules to target, and exports.

Exports are in standard PEFT format (`adapter_config.json` + `adapter_model.safetensors` keys
such as `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`), which peft and
vLLM's `LoRARequest` load with no conversion.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model_state_dict

from rl.errors import InvalidRequestError
from rl.types import LoraConfig

# Module-name suffixes per group, covering Llama, Qwen, Mistral, Gemma, Phi and GPT-style models.
ATTN_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "c_attn", "out_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj", "gate_up_proj", "fc1", "fc2", "c_fc")
UNEMBED_MODULES = ("lm_head",)


def target_modules(model: torch.nn.Module, config: LoraConfig) -> list[str]:
    """The Linear-module suffixes present in `model` that `config` asks to train."""
    wanted: tuple[str, ...] = ()
    if config.train_attn:
        wanted += ATTN_MODULES
    if config.train_mlp:
        wanted += MLP_MODULES
    if config.train_unembed:
        wanted += UNEMBED_MODULES
    present = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        # A module peft already wrapped for another adapter keeps its Linear as `base_layer`.
        if isinstance(module, torch.nn.Linear)
        or isinstance(getattr(module, "base_layer", None), torch.nn.Linear)
    }
    found = sorted(s for s in wanted if s in present)
    if not found:
        raise InvalidRequestError(f"no module of this model matches the LoRA targets {wanted}")
    return found


def peft_config(model: torch.nn.Module, config: LoraConfig, alpha: float) -> PeftLoraConfig:
    return PeftLoraConfig(
        r=config.rank,
        lora_alpha=alpha,  # type: ignore[arg-type]  # peft annotates int; floats work
        lora_dropout=0.0,
        target_modules=target_modules(model, config),
        bias="none",
        task_type="CAUSAL_LM",
    )


def adapter_config_dict(peft_model: PeftModel, adapter: str, base_model: str) -> dict[str, Any]:
    """The adapter's `adapter_config.json`, JSON-ready (sets become sorted lists)."""
    config = peft_model.peft_config[adapter].to_dict()
    for key, value in config.items():
        if isinstance(value, set):
            config[key] = sorted(value)
        elif hasattr(value, "value"):  # enums
            config[key] = value.value
    config["base_model_name_or_path"] = base_model
    config["inference_mode"] = True
    return config


def adapter_state_dict(
    peft_model: PeftModel, adapter: str, copy: bool = True
) -> dict[str, torch.Tensor]:
    """PEFT-format adapter weights, fp32 on the CPU: copies, safe to hand out (`copy=False`:
    the live parameters wherever they already are fp32 on the CPU, for a caller that copies)."""
    state = get_peft_model_state_dict(peft_model, adapter_name=adapter, save_embedding_layers=False)
    state = {k: v.detach().to("cpu", torch.float32) for k, v in state.items()}
    return {k: v.clone() for k, v in state.items()} if copy else state


def merged_state_dict(
    peft_model: PeftModel,
    adapter: str,
    full: Callable[[torch.Tensor], torch.Tensor] = lambda weight: weight,
) -> dict[str, torch.Tensor]:
    """The full model's weights with `adapter` merged in, keyed as in the base checkpoint.

    The live model is not modified. With tied embeddings and an `lm_head` adapter the merged
    `lm_head.weight` differs from `model.embed_tokens.weight`; both are returned, and a consumer
    that ties them (vLLM does for tied models) must be told to untie or the delta is lost.
    `full` gathers a sharded base weight whole; a sharded trainer's ranks all call this.
    """
    base = peft_model.get_base_model()
    merged: dict[str, torch.Tensor] = {}
    for name, module in base.named_modules():
        if hasattr(module, "lora_A") and adapter in getattr(module, "lora_A", {}):
            weight = full(module.get_base_layer().weight)
            delta = module.get_delta_weight(adapter).to(weight.dtype)
            merged[f"{name}.weight"] = (weight + delta).detach().cpu()
    state: dict[str, torch.Tensor] = {}
    for key, value in base.state_dict().items():
        if "lora_" in key:
            continue
        clean = key.replace(".base_layer.", ".")
        value = full(value)  # on every key, so that every rank gathers the same weights
        state[clean] = merged.get(clean, value).detach().cpu()
    if "lm_head.weight" in merged:
        state["lm_head.weight"] = merged["lm_head.weight"]
    return state


def enable_checkpointing(model: torch.nn.Module) -> None:
    """Activation checkpointing of every decoder layer (recomputed in the backward pass).

    transformers checkpoints a layer only while it is in training mode; the model stays in
    eval mode (no dropout anywhere, as the logprobs must be deterministic), so only the
    checkpointed layers themselves are flagged as training, not their submodules.
    """
    model.gradient_checkpointing_enable(  # type: ignore[operator]
        gradient_checkpointing_kwargs={"use_reentrant": False}
    )
    for module in model.modules():
        if getattr(module, "gradient_checkpointing", False):
            module.training = True  # this module only: its dropout children stay in eval
