"""The vLLM engine, in-process (no Ray), on a tiny random model. One engine for the module.

Full-weight reloads (merged syncs) run on engines without LoRA; the swap of merged linear
weights is tested here, and the whole stack in tests/test_sampler_vllm_ray.py.

vLLM's CPU attention needs a head size that is a multiple of 32, so the tiny model here has
hidden size 128 (4 heads of 32), not the session fixture's 64.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm")

from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from rl.errors import InvalidRequestError
from rl.types import SamplingParams
from samplers.config import SamplerConfig
from samplers.types import SampleRequest, WeightsVersion
from samplers.validation import build_request

pytestmark = pytest.mark.slow

PROMPT = [1, 504, 3458, 314, 4649, 314, 253]
SEQUENCE = [1, 504, 3458, 314, 4649, 314, 253, 5, 6, 7, 8, 9]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]


@pytest.fixture(scope="module")
def engine(vllm_tiny_model):
    from samplers.engine_vllm import VLLMEngine

    config = SamplerConfig(
        engine="vllm",
        dtype="float32",
        enforce_eager=True,
        max_model_len=256,
        kv_cache_gib=0.25,
        max_loras=2,
        max_lora_rank=8,
    )
    engine = VLLMEngine(vllm_tiny_model, config, enable_lora=True)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def adapters(vllm_tiny_model, tmp_path_factory) -> list[tuple[str, torch.nn.Module]]:
    """Two random (non-zero) PEFT adapters, lm_head included, as (directory, peft model)."""
    out = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        base = AutoModelForCausalLM.from_pretrained(vllm_tiny_model, dtype=torch.float32)
        config = LoraConfig(r=8, lora_alpha=32, target_modules=TARGETS, init_lora_weights=False)
        model = get_peft_model(base, config).eval()
        path = tmp_path_factory.mktemp(f"adapter{seed}")
        model.save_pretrained(path)
        out.append((str(path), model))
    return out


def sample(engine, prompt=PROMPT, num_samples=1, weights=None, adapter_path=None, **kwargs):
    extra = {
        k: kwargs.pop(k) for k in ("include_prompt_logprobs", "topk_prompt_logprobs") if k in kwargs
    }
    request = build_request(prompt, num_samples, SamplingParams(**kwargs), engine.info, **extra)
    if weights is not None:
        request = SampleRequest(**{**request.__dict__, "weights": weights})
    return asyncio.run(engine.sample(request, adapter_path))


def reference_logprobs(model, tokens: list[int]) -> list[float]:
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([tokens])).logits[0, :-1].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    return [logprobs[i, tokens[i + 1]].item() for i in range(len(tokens) - 1)]


def test_shapes_stop_reasons_and_seeds(engine):
    response = sample(engine, num_samples=3, max_tokens=5, seed=11)
    assert [len(s.tokens) for s in response.sequences] == [5, 5, 5]
    assert [len(s.logprobs) for s in response.sequences] == [5, 5, 5]
    assert {s.stop_reason for s in response.sequences} == {"length"}
    assert len({tuple(s.tokens) for s in response.sequences}) > 1
    again = sample(engine, num_samples=3, max_tokens=5, seed=11)
    assert [s.tokens for s in again.sequences] == [s.tokens for s in response.sequences]
    other = sample(engine, num_samples=3, max_tokens=5, seed=12)
    assert [s.tokens for s in other.sequences] != [s.tokens for s in response.sequences]
    greedy = sample(engine, num_samples=2, max_tokens=5, temperature=0.0)
    assert greedy.sequences[0].tokens == greedy.sequences[1].tokens


def test_stop_token_and_stop_string(engine, vllm_tiny_model):
    tokens = sample(engine, max_tokens=8, temperature=0.0, stop=[]).sequences[0].tokens
    stop_at = tokens[3]
    stopped = sample(engine, max_tokens=8, temperature=0.0, stop=[stop_at]).sequences[0]
    assert stopped.stop_reason == "stop"
    assert stopped.tokens == tokens[: tokens.index(stop_at) + 1]
    text = AutoTokenizer.from_pretrained(vllm_tiny_model).decode(tokens[:4])
    by_string = sample(engine, max_tokens=8, temperature=0.0, stop=text[-3:]).sequences[0]
    assert by_string.stop_reason == "stop"
    assert len(by_string.tokens) <= 4


def test_prompt_logprobs_match_forward(engine, vllm_tiny_model):
    model = AutoModelForCausalLM.from_pretrained(vllm_tiny_model, dtype=torch.float32).eval()
    response = sample(
        engine, SEQUENCE, max_tokens=1, include_prompt_logprobs=True, topk_prompt_logprobs=3
    )
    assert response.prompt_logprobs[0] is None
    assert response.prompt_logprobs[1:] == pytest.approx(
        reference_logprobs(model, SEQUENCE), abs=1e-4
    )
    assert response.topk_prompt_logprobs[0] is None
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([SEQUENCE])).logits[0, :-1].float()
    for row, top in zip(
        torch.log_softmax(logits, -1), response.topk_prompt_logprobs[1:], strict=True
    ):
        values, ids = torch.topk(row, 3)
        assert [t for t, _ in top] == ids.tolist()
        assert [v for _, v in top] == pytest.approx(values.tolist(), abs=1e-4)
    # Sampled-token logprobs are the model's own (temperature not applied).
    hot = sample(engine, max_tokens=4, seed=5, temperature=2.0).sequences[0]
    expected = reference_logprobs(model, PROMPT + hot.tokens)[len(PROMPT) - 1 :]
    assert hot.logprobs == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("with_adapter", [False, True])
def test_sampling_surface_matches_the_model(engine, adapters, vllm_tiny_model, with_adapter):
    """topk_sample_logprobs, target_prompt_logprobs (probes with vLLM's logprob_token_ids),
    prompt_alt_tokens_k (probes drawn by vLLM's sampler) and prompt_logprobs_last_n, against
    the model's own log-softmax: the base model's, or a LoRA adapter's (probes batch with the
    adapter's mapping)."""
    from surface_checks import (
        check_prompt_alt_tokens,
        check_prompt_logprobs_last_n,
        check_target_prompt_logprobs,
        check_topk_sample_logprobs,
        target_ids,
    )

    if with_adapter:
        path, model = adapters[0]
        engine.load_adapter(1, path)
        weights = WeightsVersion("adapter", "m1", 1)
    else:
        path, weights = None, None
        model = AutoModelForCausalLM.from_pretrained(vllm_tiny_model, dtype=torch.float32).eval()

    def sample(prompt, num_samples, params, **options):
        request = build_request(
            prompt, num_samples, SamplingParams(**params), engine.info, **options
        )
        if weights is not None:
            request = SampleRequest(**{**request.__dict__, "weights": weights})
        return asyncio.run(engine.sample(request, path))

    def reference(tokens):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([tokens])).logits[0, :-1].float()
        return torch.log_softmax(logits, dim=-1)

    try:
        check_topk_sample_logprobs(sample, reference, SEQUENCE, 1e-4)
        targets = target_ids(SEQUENCE, engine.info.vocab_size)
        response = sample(SEQUENCE, 1, {"max_tokens": 1}, target_prompt_logprobs=targets)
        values = response.target_prompt_logprobs.tolist()
        check_target_prompt_logprobs(values, targets, reference, SEQUENCE, 1e-4)
        check_prompt_alt_tokens(sample, reference, SEQUENCE, 1e-4)
        check_prompt_logprobs_last_n(sample, reference, SEQUENCE, 1e-4)
    finally:
        if with_adapter:
            engine.unload_adapter(1)


def test_two_adapters_at_once(engine, adapters):
    for version, (path, _) in enumerate(adapters, start=1):
        engine.load_adapter(version, path)

    async def both():
        requests = []
        for version, (path, _) in enumerate(adapters, start=1):
            request = build_request(
                SEQUENCE, 1, SamplingParams(max_tokens=2), engine.info, include_prompt_logprobs=True
            )
            request = SampleRequest(
                **{**request.__dict__, "weights": WeightsVersion("adapter", f"m{version}", version)}
            )
            requests += [engine.sample(request, path) for _ in range(4)]
        return await asyncio.gather(*requests)

    responses = asyncio.run(both())
    for i, (_, model) in enumerate(adapters):
        expected = reference_logprobs(model, SEQUENCE)
        for response in responses[4 * i : 4 * i + 4]:
            assert response.prompt_logprobs[1:] == pytest.approx(expected, abs=1e-4)
    assert abs(sum(responses[0].prompt_logprobs[1:]) - sum(responses[4].prompt_logprobs[1:])) > 0.1
    engine.unload_adapter(1)
    engine.unload_adapter(2)


def test_base_logprobs_after_adapters_were_used(engine, vllm_tiny_model):
    """The adapters of test_two_adapters_at_once have left their slots (the last included:
    vLLM's CPU ops read it for rows of no adapter), and the base model scores as itself."""
    from surface_checks import check_topk_sample_logprobs

    model = AutoModelForCausalLM.from_pretrained(vllm_tiny_model, dtype=torch.float32).eval()

    def sample_base(prompt, num_samples, params, **options):
        request = build_request(
            prompt, num_samples, SamplingParams(**params), engine.info, **options
        )
        return asyncio.run(engine.sample(request))

    def reference(tokens):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([tokens])).logits[0, :-1].float()
        return torch.log_softmax(logits, dim=-1)

    check_topk_sample_logprobs(sample_base, reference, SEQUENCE, 1e-4)


def test_base_rows_batched_with_adapter_rows(engine, adapters, vllm_tiny_model):
    """Base-model requests batched with adapter requests, both adapters loaded (the second in
    the last slot): each request's sampled logprobs are its own model's."""
    for version, (path, _) in enumerate(adapters, start=1):
        engine.load_adapter(version, path)
    path, adapter_model = adapters[0]

    async def mixed():
        requests = []
        for i in range(6):
            request = build_request(
                PROMPT, 1, SamplingParams(max_tokens=4, seed=i, temperature=1.0), engine.info
            )
            if i % 2:
                weights = WeightsVersion("adapter", "m1", 1)
                request = SampleRequest(**{**request.__dict__, "weights": weights})
            requests.append(engine.sample(request, path if i % 2 else None))
        return await asyncio.gather(*requests)

    try:
        responses = asyncio.run(mixed())
    finally:
        engine.unload_adapter(1)
        engine.unload_adapter(2)
    base = AutoModelForCausalLM.from_pretrained(vllm_tiny_model, dtype=torch.float32).eval()
    for i, response in enumerate(responses):
        sequence = response.sequences[0]
        expected = reference_logprobs(adapter_model if i % 2 else base, PROMPT + sequence.tokens)
        assert sequence.logprobs == pytest.approx(expected[len(PROMPT) - 1 :], abs=1e-4), i


def test_the_cpu_engine_compiles_nothing(engine):
    """vLLM's sampler compiles a helper on an engine's first logprobs request even in eager
    mode (2.3-2.5 s of the first sync on CPU); an eager CPU engine runs it uncompiled."""
    from torch._dynamo.utils import counters

    sample(engine, SEQUENCE, max_tokens=2, include_prompt_logprobs=True)
    assert counters["stats"]["unique_graphs"] == 0


def test_engine_rejects_bad_request_and_keeps_serving(engine):
    request = build_request(PROMPT, 1, SamplingParams(max_tokens=2), engine.info)
    bad = SampleRequest(**{**request.__dict__, "prompt": [1, 10**7]})  # skips client checks
    with pytest.raises(InvalidRequestError, match="rejected"):
        asyncio.run(engine.sample(bad))
    assert len(sample(engine, max_tokens=3).sequences[0].tokens) == 3


# Tests that start engines of their own come last: a second engine in the process tears down
# vLLM's parallel groups, which the module's engine needs.


def test_engine_without_lora_sampled_logprobs(vllm_tiny_model):
    """An engine for merged syncs (no LoRA, output head untied from the tied embedding) in
    "sampled" mode: logprobs of the processed distribution, as the torch engine computes it."""
    from samplers.engine_torch import process_logits
    from samplers.engine_vllm import VLLMEngine

    config = SamplerConfig(
        engine="vllm",
        dtype="float32",
        enforce_eager=True,
        max_model_len=256,
        kv_cache_gib=0.25,
        logprobs_mode="sampled",
    )
    engine = VLLMEngine(vllm_tiny_model, config, enable_lora=False)
    try:
        assert engine.info.extra["untied_embeddings"]
        model = AutoModelForCausalLM.from_pretrained(vllm_tiny_model, dtype=torch.float32).eval()
        scored = sample(engine, SEQUENCE, max_tokens=1, include_prompt_logprobs=True,
                        logprobs_mode="sampled")  # fmt: skip
        assert scored.prompt_logprobs[1:] == pytest.approx(
            reference_logprobs(model, SEQUENCE), abs=1e-4
        )
        for temperature, top_k, top_p in [(2.0, -1, 1.0), (0.7, 50, 0.9)]:
            sequence = sample(
                engine, max_tokens=4, seed=1, temperature=temperature, top_k=top_k, top_p=top_p,
                logprobs_mode="sampled",
            ).sequences[0]  # fmt: skip
            full = PROMPT + sequence.tokens
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([full])).logits[0, :-1].float()
            logprobs = torch.log_softmax(process_logits(logits, temperature, top_k, top_p), -1)
            expected = [
                logprobs[len(PROMPT) - 1 + j, t].item() for j, t in enumerate(sequence.tokens)
            ]
            assert sequence.logprobs == pytest.approx(expected, abs=1e-4)
        with pytest.raises(InvalidRequestError, match="logprobs_mode"):
            sample(engine, max_tokens=2)  # "model" logprobs from a "sampled" engine
    finally:
        engine.shutdown()


def test_merged_weights_are_swapped_into_the_packed_layers(vllm_tiny_model, adapters):
    """A merged sync's weights (every linear layer and the head, from samplers.merge) go
    straight into vLLM's packed CPU layers, not through its layerwise reload, and the engine
    then scores as the model with those weights does. A state dict the swap cannot take (one
    with a norm's weight) goes through vLLM's reload, after a swap as well."""
    from samplers.engine_vllm import VLLMEngine
    from samplers.merge import BaseWeights, merged_weights
    from samplers.vllm_swap import plan_swap

    path, _ = adapters[0]
    adapter_config = json.loads((Path(path) / "adapter_config.json").read_text())
    saved = load_file(str(Path(path) / "adapter_model.safetensors"))
    lora = {k: v for k, v in saved.items() if ".lora_" in k}  # not the tied head peft adds
    merged = merged_weights(BaseWeights(vllm_tiny_model), adapter_config, lora, torch.float32)
    assert merged is not None and "lm_head.weight" in merged
    reference = AutoModelForCausalLM.from_pretrained(vllm_tiny_model, dtype=torch.float32).eval()
    reference.lm_head.weight = torch.nn.Parameter(reference.lm_head.weight.detach().clone())
    before = reference_logprobs(reference, SEQUENCE)
    config = SamplerConfig(engine="vllm", dtype="float32", enforce_eager=True,
                           max_model_len=256, kv_cache_gib=0.25)  # fmt: skip
    engine = VLLMEngine(vllm_tiny_model, config, enable_lora=False)
    try:
        reference.load_state_dict(merged, strict=False)
        engine.load_full_weights(merged)
        assert engine.reloads == {"swap": 1}
        swapped = sample(engine, SEQUENCE, max_tokens=1, include_prompt_logprobs=True)
        expected = reference_logprobs(reference, SEQUENCE)
        assert swapped.prompt_logprobs[1:] == pytest.approx(expected, abs=1e-4)
        assert max(abs(a - b) for a, b in zip(expected, before, strict=True)) > 0.05

        # A final norm beside them is no linear layer: vLLM reloads the lot.
        changed = {**merged, "model.norm.weight": reference.model.norm.weight.detach() * 1.5}
        reference.load_state_dict(changed, strict=False)
        engine.load_full_weights(changed)
        assert engine.reloads == {"swap": 1, "reload": 1}
        reloaded = sample(engine, SEQUENCE, max_tokens=1, include_prompt_logprobs=True)
        expected_now = reference_logprobs(reference, SEQUENCE)
        assert reloaded.prompt_logprobs[1:] == pytest.approx(expected_now, abs=1e-4)
        assert max(abs(a - b) for a, b in zip(expected_now, expected, strict=True)) > 1e-3

        # One shard of a fused layer cannot be swapped in (the others are packed away).
        q_proj = "model.layers.0.self_attn.q_proj.weight"
        lone = {q_proj: merged[q_proj]}
        plans = engine._llm.collective_rpc(
            lambda worker: plan_swap(worker.model_runner.get_model(), "LlamaForCausalLM", lone)
        )
        assert plans == [None]
    finally:
        engine.shutdown()
