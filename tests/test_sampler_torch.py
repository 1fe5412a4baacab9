"""The torch sampling engine on a tiny random model, plus the request checks (no Ray, fast)."""

from __future__ import annotations

import asyncio
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rl.errors import InvalidRequestError
from rl.types import ModelInput, SamplingParams
from samplers.config import SamplerConfig
from samplers.engine_torch import TorchEngine, process_logits
from samplers.types import EngineInfo
from samplers.validation import build_request

PROMPT = [1, 504, 3458, 314, 4649, 314, 253]


@pytest.fixture(scope="module")
def engine(tiny_model: str) -> TorchEngine:
    engine = TorchEngine(
        tiny_model, SamplerConfig(engine="torch", dtype="float32", max_model_len=128)
    )
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def hf_model(tiny_model: str):
    return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()


def run(engine: TorchEngine, prompt=PROMPT, num_samples=1, **kwargs):
    request_kwargs = {
        k: kwargs.pop(k) for k in ("include_prompt_logprobs", "topk_prompt_logprobs") if k in kwargs
    }
    request = build_request(
        prompt, num_samples, SamplingParams(**kwargs), engine.info, **request_kwargs
    )
    return asyncio.run(engine.sample(request))


def model_logprobs(hf_model, tokens: list[int], temperature: float = 1.0) -> torch.Tensor:
    """[len-1, V]: row i is the distribution of tokens[i + 1]."""
    with torch.no_grad():
        logits = hf_model(torch.tensor([tokens])).logits[0, :-1].float()
    return torch.log_softmax(logits / temperature, dim=-1)


def test_shapes_and_length_stop(engine):
    response = run(engine, num_samples=3, max_tokens=5, seed=0)
    assert len(response.sequences) == 3
    for sequence in response.sequences:
        assert len(sequence.tokens) == 5
        assert len(sequence.logprobs) == 5
        assert sequence.stop_reason == "length"
        assert all(lp <= 0 for lp in sequence.logprobs)
    assert response.prompt_logprobs is None
    # The samples of one request are drawn independently.
    assert len({tuple(s.tokens) for s in response.sequences}) > 1


def test_seed_reproduces_and_differs(engine):
    first = run(engine, num_samples=2, max_tokens=6, seed=7)
    again = run(engine, num_samples=2, max_tokens=6, seed=7)
    other = run(engine, num_samples=2, max_tokens=6, seed=8)
    assert [s.tokens for s in first.sequences] == [s.tokens for s in again.sequences]
    assert [s.tokens for s in first.sequences] != [s.tokens for s in other.sequences]


def test_stop_token(engine):
    greedy = run(engine, max_tokens=8, temperature=0.0, stop=[])
    tokens = greedy.sequences[0].tokens
    stop_at = tokens[3]
    first = tokens.index(stop_at)
    stopped = run(engine, max_tokens=8, temperature=0.0, stop=[stop_at]).sequences[0]
    assert stopped.stop_reason == "stop"
    assert stopped.tokens == tokens[: first + 1]  # the stop token is included


def test_stop_string(engine, tiny_model):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    greedy = run(engine, max_tokens=8, temperature=0.0, stop=[]).sequences[0].tokens
    text = tokenizer.decode(greedy[:4], skip_special_tokens=True)
    stop = text[-3:] if len(text.strip()) >= 3 else text
    stopped = run(engine, max_tokens=8, temperature=0.0, stop=stop).sequences[0]
    assert stopped.stop_reason == "stop"
    assert len(stopped.tokens) <= 4
    assert stop in tokenizer.decode(stopped.tokens, skip_special_tokens=True)


def test_greedy_samples_agree(engine):
    response = run(engine, num_samples=3, max_tokens=6, temperature=0.0)
    assert len({tuple(s.tokens) for s in response.sequences}) == 1


def test_prompt_logprobs_match_forward(engine, hf_model):
    response = run(engine, max_tokens=1, include_prompt_logprobs=True, topk_prompt_logprobs=3)
    reference = model_logprobs(hf_model, PROMPT)
    assert response.prompt_logprobs[0] is None
    expected = [reference[i, PROMPT[i + 1]].item() for i in range(len(PROMPT) - 1)]
    assert response.prompt_logprobs[1:] == pytest.approx(expected, abs=1e-5)
    assert response.topk_prompt_logprobs[0] is None
    for row, top in zip(reference, response.topk_prompt_logprobs[1:], strict=True):
        values, ids = torch.topk(row, 3)
        assert [t for t, _ in top] == ids.tolist()
        assert [v for _, v in top] == pytest.approx(values.tolist(), abs=1e-5)


@pytest.mark.parametrize("mode", ["model", "sampled"])
def test_logprob_semantics(engine, hf_model, mode):
    temperature = 2.0
    response = run(engine, max_tokens=5, seed=3, temperature=temperature, logprobs_mode=mode)
    sequence = response.sequences[0]
    full = PROMPT + sequence.tokens
    reference = model_logprobs(hf_model, full, temperature if mode == "sampled" else 1.0)
    expected = [reference[len(PROMPT) - 1 + j, t].item() for j, t in enumerate(sequence.tokens)]
    assert sequence.logprobs == pytest.approx(expected, abs=1e-4)


def test_process_logits_masks():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    top_k = torch.softmax(process_logits(logits, 1.0, 2, 1.0), -1)[0]
    assert top_k.tolist() == pytest.approx([0.625, 0.375, 0.0, 0.0])
    # top_p=0.8: 0.5 + 0.3 reaches it, so 0.15 and 0.05 are dropped.
    top_p = torch.softmax(process_logits(logits, 1.0, -1, 0.8), -1)[0]
    assert top_p.tolist() == pytest.approx([0.625, 0.375, 0.0, 0.0])
    # top_p=0.81 needs the third token too.
    assert torch.softmax(process_logits(logits, 1.0, -1, 0.81), -1)[0, 2] > 0
    hot = torch.softmax(process_logits(logits, 2.0, -1, 1.0), -1)[0]
    expected = torch.tensor([0.5, 0.3, 0.15, 0.05]).sqrt()
    assert hot.tolist() == pytest.approx((expected / expected.sum()).tolist())


# -- request checks (pure) ---------------------------------------------------------------------

INFO = EngineInfo(
    engine="vllm", model_dir="", vocab_size=100, max_model_len=32, dtype="float32", device="cpu",
    eos_token_id=2, logprobs_mode="model", max_logprobs=5, lora_enabled=True, max_lora_rank=32,
)  # fmt: skip


@pytest.mark.parametrize(
    ("prompt", "num_samples", "params", "extra", "match"),
    [
        ([], 1, {}, {}, "prompt is empty"),
        (ModelInput.empty(), 1, {}, {}, "prompt is empty"),
        ([1, 100], 1, {}, {}, r"prompt\[1\]=100 is outside the vocabulary"),
        ([1, -1], 1, {}, {}, r"prompt\[1\]=-1"),
        ([1], 0, {}, {}, "num_samples=0"),
        ([1], -2, {}, {}, "num_samples=-2"),
        ([1], 1, {"max_tokens": 0}, {}, "max_tokens=0"),
        ([1], 1, {"max_tokens": -5}, {}, "max_tokens=-5"),
        ([1] * 30, 1, {"max_tokens": 3}, {}, "exceeds the context length 32"),
        ([1] * 32, 1, {}, {}, "no room left"),
        ([1], 1, {"top_p": 0.0}, {}, "top_p=0.0"),
        ([1], 1, {"top_p": 1.5}, {}, "top_p=1.5"),
        ([1], 1, {"temperature": -1.0}, {}, "temperature=-1.0"),
        ([1], 1, {"temperature": math.nan}, {}, "temperature=nan"),
        ([1], 1, {"temperature": 2.5}, {}, "temperature=2.5"),
        ([1], 1, {"top_k": 0}, {}, "top_k=0"),
        ([1], 1, {"stop": [""]}, {}, r"stop\[0\] is an empty string"),
        ([1], 1, {"stop": [5, 500]}, {}, r"sampling_params.stop\[0\]=500"),
        ([1], 1, {"logprobs_mode": "sampled"}, {}, "logprobs_mode='sampled'"),
        ([1], 1, {}, {"topk_prompt_logprobs": 6}, "topk_prompt_logprobs=6"),
    ],
)
def test_bad_requests(prompt, num_samples, params, extra, match):
    with pytest.raises(InvalidRequestError, match=match):
        build_request(prompt, num_samples, SamplingParams(**params), INFO, **extra)


def test_good_request_resolves_max_tokens():
    request = build_request(ModelInput.from_ints([1, 2, 3]), 2, SamplingParams(), INFO)
    assert request.max_tokens == 29
    assert request.prompt == [1, 2, 3]


def test_sampling_surface_matches_the_model(engine, hf_model):
    """topk_sample_logprobs, target_prompt_logprobs, prompt_alt_tokens_k and
    prompt_logprobs_last_n, each against the model's own log-softmax."""
    from surface_checks import (
        check_prompt_alt_tokens,
        check_prompt_logprobs_last_n,
        check_target_prompt_logprobs,
        check_topk_sample_logprobs,
        target_ids,
    )

    def sample(prompt, num_samples, params, **options):
        request = build_request(
            prompt, num_samples, SamplingParams(**params), engine.info, **options
        )
        return asyncio.run(engine.sample(request))

    def reference(tokens):
        return model_logprobs(hf_model, tokens)

    check_topk_sample_logprobs(sample, reference, PROMPT, 1e-5)
    targets = target_ids(PROMPT, engine.info.vocab_size)
    response = sample(PROMPT, 1, {"max_tokens": 1}, target_prompt_logprobs=targets)
    assert response.target_prompt_logprobs.shape == [len(PROMPT) - 1, 3]
    values = response.target_prompt_logprobs.tolist()
    check_target_prompt_logprobs(values, targets, reference, PROMPT, 1e-5)
    check_prompt_alt_tokens(sample, reference, PROMPT, 1e-5)
    check_prompt_logprobs_last_n(sample, reference, PROMPT, 1e-5)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"topk_sample_logprobs": 21}, "topk_sample_logprobs=21 must be an int in \\[0, 20\\]"),
        ({"prompt_alt_tokens_k": -1}, "prompt_alt_tokens_k=-1"),
        ({"prompt_logprobs_last_n": 2}, "applies to prompt logprobs"),
        ({"include_prompt_logprobs": True, "prompt_logprobs_last_n": 7}, "in \\[1, 6\\]"),
        ({"target_prompt_logprobs": [[1, 2]] * 5}, "shape \\[5, 2\\].*\\[6, K\\]"),
        ({"target_prompt_logprobs": [[1]] * 5 + [[10**9]]}, "target_prompt_logprobs\\[5\\]\\[0\\]"),
        ({"target_prompt_logprobs": [[0.5]] * 6}, "integer token ids"),
    ],
)
def test_sampling_surface_bad_input(engine, options, message):
    with pytest.raises(InvalidRequestError, match=message):
        build_request(PROMPT, 1, SamplingParams(max_tokens=1), engine.info, **options)
