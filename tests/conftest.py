"""Shared fixtures: a tiny random model, one embedded Ray for the session, a ServiceClient."""

from __future__ import annotations

import os

import pytest
import ray

from rl.models import build_tiny_model

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# The session's shared clients live side by side (trainers for three tiny models, a merged
# pool per training client of every test) on a 2-CPU Ray; a tiny model uses a sliver of a
# core, so the fixtures reserve slivers. The user defaults (1 CPU per trainer, 0.25 per
# sampler actor) on 2 CPUs are tested by tests/test_resources.py in a Ray of their own.
FIXTURE_TRAINER_CPUS = 0.1
FIXTURE_SAMPLER_CPUS = 0.05


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
    """One embedded Ray for the whole test session, stopped at the end. Two CPUs, as a
    user's embedded default has on this machine, so an actor too many shows up here."""
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def service(ray_local, tmp_path_factory: pytest.TempPathFactory):
    from rl import ServiceClient
    from trainers import TrainerConfig

    config = TrainerConfig(
        dtype="float32",
        num_threads=2,
        num_cpus=FIXTURE_TRAINER_CPUS,
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
            dtype="float32",
            num_threads=1,
            num_cpus=FIXTURE_TRAINER_CPUS,
            checkpoint_dir=str(tmp_path_factory.mktemp("ckpt")),
        ),
        sampler_config=SamplerConfig(engine="torch", num_cpus_per_actor=FIXTURE_SAMPLER_CPUS),
    )
    yield client
    client.close()
