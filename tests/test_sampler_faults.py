"""Models the installed vLLM cannot serve, and sampler actors that keep dying.

The tiny test model (hidden 64, 4 heads: head size 16) is one vLLM's CPU attention cannot
serve; `vllm_tiny_model` (head size 32) is one it can.
"""

from __future__ import annotations

import json
import logging
import shutil
import time

import pytest
import ray
from ray.util.placement_group import placement_group_table

from rl.errors import InvalidRequestError
from rl.types import ModelInput, SamplingParams
from samplers.config import SamplerConfig
from samplers.pool import SamplerUnavailableError
from trainers import TrainerConfig

PROMPT = ModelInput.from_ints([1, 504, 3458, 314])
PARAMS = SamplingParams(max_tokens=3, temperature=1.0, seed=0)


def _service(tmp_path, **sampler_kwargs):
    from rl import ServiceClient

    return ServiceClient(
        trainer_config=TrainerConfig(dtype="float32", num_cpus=0.1, checkpoint_dir=str(tmp_path)),
        sampler_config=SamplerConfig(num_cpus_per_actor=0.05, max_model_len=128, **sampler_kwargs),
    )


def test_vllm_pre_check_names_the_head_size(tiny_model, vllm_tiny_model):
    pytest.importorskip("vllm")
    from samplers.engine_choice import vllm_unsupported_reason

    reason = vllm_unsupported_reason(tiny_model, "float32", on_gpu=False)
    assert reason is not None and "head size 16" in reason
    assert vllm_unsupported_reason(vllm_tiny_model, "float32", on_gpu=False) is None


def test_vllm_pre_check_answers_from_its_facts_file(tiny_model, tmp_path, monkeypatch):
    """vLLM's answers are asked once per installed build and then read from a file: a
    second process does not import vLLM's model registry for them (~5-9 s)."""
    pytest.importorskip("vllm")
    from samplers import engine_choice as servable

    monkeypatch.setenv("ENGINEROOM_HOME", str(tmp_path))
    caches = (servable._facts_path, servable._supported_architectures)
    caches += (servable._cpu_attention_limits,)
    for cache in caches:
        cache.cache_clear()
    try:
        assert servable.vllm_unsupported_reason(tiny_model, "float32", on_gpu=False)
        (path,) = (tmp_path / "vllm").glob("*.json")
        facts = json.loads(path.read_text())
        assert "LlamaForCausalLM" in facts["architectures"]
        assert 16 not in facts["cpu_attention"][0] and "float32" in facts["cpu_attention"][1]
        # A build that declared head size 16 (written here): the file's answer is the one used.
        facts["cpu_attention"][0].append(16)
        path.write_text(json.dumps(facts))
        for cache in caches:
            cache.cache_clear()
        assert servable.vllm_unsupported_reason(tiny_model, "float32", on_gpu=False) is None
    finally:
        for cache in caches:
            cache.cache_clear()


def test_engine_vllm_on_an_unservable_model_fails_before_any_actor(ray_local, tiny_model, tmp_path):
    pytest.importorskip("vllm")
    groups_before = len(placement_group_table())
    service = _service(tmp_path, engine="vllm")
    try:
        with pytest.raises(InvalidRequestError, match=r"engine=.vllm. cannot serve.*head size 16"):
            service.create_sampling_client(base_model=tiny_model)
        assert service.pools.started() == {}
        assert len(placement_group_table()) == groups_before  # nothing was reserved or started
    finally:
        service.close()


def test_engine_auto_falls_back_to_torch_with_one_warning(ray_local, tiny_model, tmp_path, caplog):
    pytest.importorskip("vllm")
    service = _service(tmp_path, engine="auto")
    try:
        with caplog.at_level(logging.WARNING, logger="samplers.engine_choice"):
            client = service.create_sampling_client(base_model=tiny_model)
            training = service.create_lora_training_client(tiny_model, rank=4, seed=0)
            synced = training.save_weights_and_get_sampling_client()  # a second pool
        warnings = [r for r in caplog.records if "vLLM cannot serve" in r.getMessage()]
        assert len(warnings) == 1 and "head size 16" in warnings[0].getMessage()
        assert client.pool.info is not None and client.pool.info.engine == "torch"
        assert len(client.sample(PROMPT, 2, PARAMS).result().sequences) == 2
        assert len(synced.sample(PROMPT, 1, PARAMS).result().sequences) == 1
    finally:
        service.close()


def _wait_until_gone(victim, timeout: float = 60.0) -> None:
    """Returns once the killed actor's old process no longer answers calls (the restart
    fails here, so a call ends with its constructor's error)."""
    incarnation = None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            answered, _ = ray.get(victim.ready.remote(), timeout=30)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            return
        if incarnation is not None and answered != incarnation:
            return
        incarnation = answered
        time.sleep(0.05)
    raise AssertionError("the killed sampler actor still answers")


def test_a_sampler_in_a_crash_loop_ends_the_call_with_its_own_error(
    ray_local, tiny_model, tmp_path
):
    """The model files break under a running pool; the actor is killed and every restart
    then fails in its constructor: the call ends with that error, not a wait or 'died'."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    service = _service(tmp_path, engine="torch", max_restarts=1, max_request_retries=1)
    try:
        client = service.create_sampling_client(base_model=str(model))
        assert len(client.sample(PROMPT, 1, PARAMS).result().sequences) == 1
        (model / "config.json").write_text("{ not json")
        victim = client.pool.actor_handles()[0]
        ray.kill(victim, no_restart=False)  # Ray restarts it
        _wait_until_gone(victim)  # a kill is asynchronous: the old process could still answer
        with pytest.raises(SamplerUnavailableError) as error:
            client.sample(PROMPT, 1, PARAMS).result()
        message = str(error.value)
        assert "keeps dying as it starts" in message and "config.json" in message, message
        # Given up for good: the next call ends at once with the same error.
        with pytest.raises(SamplerUnavailableError, match=r"config\.json"):
            client.sample(PROMPT, 1, PARAMS).result()
    finally:
        service.close()
