"""Shared fixtures: a tiny random model, one embedded Ray for the session, a ServiceClient."""

from __future__ import annotations

import os

import pytest
import ray

from rl.models import build_tiny_model

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A 2-layer, hidden-64 random Llama with SmolLM2's tokenizer."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def other_tiny_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A different architecture (3 layers), for incompatible-checkpoint tests."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny3") / "model", num_layers=3)


@pytest.fixture(scope="session")
def vllm_tiny_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """vLLM's CPU attention needs head sizes that are multiples of 32: hidden size 128."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny128") / "model", hidden_size=128)


@pytest.fixture(scope="session")
def ray_local():
    """One embedded Ray for the whole test session, on loopback, stopped at the end."""
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def service(ray_local, tmp_path_factory: pytest.TempPathFactory):
    from rl import ServiceClient
    from trainers import TrainerConfig

    config = TrainerConfig(
        dtype="float32",
        num_threads=2,
        checkpoint_dir=str(tmp_path_factory.mktemp("checkpoints")),
    )
    client = ServiceClient(trainer_config=config)
    yield client
    client.close()


@pytest.fixture(scope="module")
def torch_service(ray_local, tmp_path_factory: pytest.TempPathFactory):
    """A ServiceClient whose samplers use the torch engine (fast with tiny models)."""
    from rl import ServiceClient
    from samplers.config import SamplerConfig
    from trainers import TrainerConfig

    client = ServiceClient(
        trainer_config=TrainerConfig(
            dtype="float32", num_threads=1, checkpoint_dir=str(tmp_path_factory.mktemp("ckpt"))
        ),
        sampler_config=SamplerConfig(engine="torch"),
    )
    yield client
    client.close()
