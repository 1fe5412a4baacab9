"""Placement settings: GPU shares, custom Ray resources and strategies in TrainerConfig /
SamplerConfig and the entry points' flat configs, checked where they are set, and reserved
in Ray (a custom resource the cluster lacks is a clear error, not a silent wait). The
positive case, actors pinned to two nodes, is tests/test_two_nodes.py."""

from __future__ import annotations

import pytest
import ray

from rl.cli import parse_config
from rl.errors import InvalidRequestError
from rl.placement import ResourcesUnavailableError, parse_resources, reserve
from samplers.config import SamplerConfig
from trainers.config import TrainerConfig


def test_resource_strings_parse_and_bad_ones_name_the_key():
    assert parse_resources("trainer_node=1, fast_disk=0.5", "k") == {
        "trainer_node": 1.0,
        "fast_disk": 0.5,
    }
    assert parse_resources("", "k") == {}
    for text, words in (
        ("trainer_node", "not name=amount"),
        ("a=x", "not name=amount"),
        ("a=0", "positive"),
        ("GPU=1", "not allowed"),
    ):
        with pytest.raises(InvalidRequestError, match=words) as error:
            parse_resources(text, "trainer_resources")
        assert "trainer_resources" in str(error.value)


@pytest.mark.parametrize(
    "settings, words",
    [
        ({"num_gpus": 1.5}, "whole number"),
        ({"num_gpus": -1.0}, "num_gpus"),
        ({"device": "cuda", "num_gpus": 0.0}, "no GPU"),
        ({"resources": {"CPU": 1.0}}, "not allowed"),
        ({"resources": {"trainer_node": float("nan")}}, "positive"),
        ({"logprob_chunk_tokens": -1}, "logprob_chunk_tokens"),
        ({"placement_strategy": "pack"}, "expected one of"),
    ],
)
def test_bad_trainer_placement_is_a_clear_error(settings, words):
    with pytest.raises(InvalidRequestError, match=words):
        TrainerConfig(**settings)


@pytest.mark.parametrize(
    "settings, words",
    [
        ({"num_gpus_per_actor": 2.5}, "whole number"),
        ({"tensor_parallel_size": 2, "num_gpus_per_actor": 1.0}, "needs as many GPUs"),
        ({"tensor_parallel_size": 0}, "tensor_parallel_size"),
        ({"engine": "torch", "sleep_between_rollouts": True}, "vLLM settings"),
        ({"resources_per_actor": {"sampler_node": -1.0}}, "positive"),
    ],
)
def test_bad_sampler_placement_is_a_clear_error(settings, words):
    with pytest.raises(InvalidRequestError, match=words):
        SamplerConfig(**settings)


def test_gpu_defaults_follow_the_cluster():
    assert TrainerConfig().resolved_gpus(0) == 0.0  # CPU-only cluster
    assert TrainerConfig().resolved_gpus(4) == 1.0  # one whole GPU per trainer
    assert TrainerConfig(device="cpu").resolved_gpus(4) == 0.0
    assert TrainerConfig(num_gpus=0.5).resolved_gpus(1) == 0.5  # colocated
    assert SamplerConfig().resolved_gpus(0) == 0.0
    assert SamplerConfig().resolved_gpus(1) == 0.25
    assert SamplerConfig(tensor_parallel_size=4).resolved_gpus(8) == 4.0
    # The fastest attention: sdpa on CPU; flash-attn only on GPU in bfloat16 when installed.
    assert TrainerConfig().resolved_attention(False, "float32") == "sdpa"
    assert TrainerConfig().resolved_attention(True, "float32") == "sdpa"
    assert TrainerConfig(attn_implementation="eager").resolved_attention(True, "x") == "eager"
    assert TrainerConfig().resolved_chunk_tokens(True) == 2048
    assert TrainerConfig().resolved_chunk_tokens(False) == 0
    # Adapter-mode weight sync is the GPU default (vLLM's LoRA kernels are fast there).
    from samplers.config import resolve_sync_mode

    assert resolve_sync_mode(SamplerConfig(), on_gpu=True) == "adapter"
    assert resolve_sync_mode(SamplerConfig(), on_gpu=False) == "merged"


def test_rl_train_and_sft_keys_reach_the_actor_configs(tmp_path):
    from rl.loop.sft import SFTConfig
    from rl.loop.train import Config

    config = parse_config(
        Config,
        [
            "trainer.resources=trainer_node=1",
            "trainer.num_gpus=0.5",
            "trainer.placement_strategy=SPREAD",
            "trainer.gradient_checkpointing=true",
            "sampler.resources_per_actor=sampler_node=0.5",
            "sampler.num_gpus_per_actor=0.5",
            "sampler.gpu_memory_utilization=0.4",
            "sampler.tensor_parallel_size=1",
            "sampler.dtype=bfloat16",
        ],
    )
    trainer, sampler = config.actor_configs()
    assert sampler.dtype == "bfloat16"
    assert trainer.resources == {"trainer_node": 1.0} and trainer.num_gpus == 0.5
    assert trainer.placement_strategy == "SPREAD" and trainer.gradient_checkpointing
    assert sampler.resources_per_actor == {"sampler_node": 0.5}
    assert sampler.num_gpus_per_actor == 0.5 and sampler.gpu_memory_utilization == 0.4
    with pytest.raises(InvalidRequestError, match=r"trainer\.resources"):
        parse_config(Config, ["trainer.resources=trainer_node"])
    with pytest.raises(InvalidRequestError, match="dtype='float8'"):
        parse_config(Config, ["sampler.dtype=float8"])
    with pytest.raises(InvalidRequestError, match=r"'trainer_num_gpus' is now 'trainer\.num_gpus'"):
        parse_config(Config, ["trainer_num_gpus=1"])
    with pytest.raises(InvalidRequestError, match=r"unknown config key 'trainer\.gpus'"):
        parse_config(Config, ["trainer.gpus=1"])
    with pytest.raises(InvalidRequestError, match="vLLM settings"):
        parse_config(Config, ["sampler.engine=torch", "sampler.sleep_between_rollouts=true"])

    sft = parse_config(
        SFTConfig,
        [
            "data=x.jsonl",
            f"log_dir={tmp_path}",
            "trainer.resources=trainer_node=2",
            "trainer.num_gpus=1",
            "trainer.gradient_checkpointing=1",
        ],
    )
    sft_trainer = sft.trainer_config()
    assert sft_trainer.checkpoint_dir == str((tmp_path / "checkpoints").resolve())
    assert sft_trainer.resources == {"trainer_node": 2.0} and sft_trainer.num_gpus == 1.0
    assert sft_trainer.gradient_checkpointing
    with pytest.raises(InvalidRequestError, match="whole number"):
        parse_config(SFTConfig, ["data=x.jsonl", "trainer.num_gpus=1.5"])
    with pytest.raises(InvalidRequestError, match=r"'num_gpus' is now 'trainer\.num_gpus'"):
        parse_config(SFTConfig, ["data=x.jsonl", "num_gpus=1"])


def test_server_keys_reach_the_service(ray_local, tmp_path):
    from rl.server import build_service
    from rl.server.config import ServerConfig

    config = parse_config(
        ServerConfig,
        [
            f"home={tmp_path}",
            "trainer.resources=trainer_node=1",
            "trainer.num_gpus=0.5",
            "sampler.resources_per_actor=sampler_node=1",
            "sampler.gpu_memory_utilization=0.5",
            "sampler.tensor_parallel_size=2",
        ],
    )
    service = build_service(config)
    try:
        assert service.trainer_config.resources == {"trainer_node": 1.0}
        assert service.trainer_config.num_gpus == 0.5
        assert service.pools.config.resources_per_actor == {"sampler_node": 1.0}
        assert service.pools.config.gpu_memory_utilization == 0.5
        assert service.pools.config.tensor_parallel_size == 2
    finally:
        service.close()


def test_a_custom_resource_the_cluster_lacks_is_a_clear_error(ray_local):
    with pytest.raises(ResourcesUnavailableError) as error:
        reserve("the trainer actor for 'm'", 0.1, 0.0, 1.0, {"trainer_node": 1.0})
    message = str(error.value)
    assert "{'CPU': 0.1, 'trainer_node': 1.0}" in message  # asked for
    assert "'trainer_node': 0.0" in message  # what the cluster has
    assert "ray start --resources" in message
    pending = [g for g in ray.util.placement_group_table().values() if g["state"] == "PENDING"]
    assert not pending  # the failed reservation was removed
    with pytest.raises(ResourcesUnavailableError, match=r"'GPU': 0\.5"):
        reserve("a sampler actor", 0.0, 0.5, 1.0)  # a GPU share on a CPU-only cluster


def test_custom_resources_go_into_the_actor_options(ray_local):
    from rl.placement import Reservation

    pinned = Reservation("a pinned actor", 1.0, 0.5, None, {"sampler_node": 0.5})
    assert pinned.actor_options() == {
        "num_cpus": 1.0,
        "num_gpus": 0.5,
        "resources": {"sampler_node": 0.5},
    }
    reservation = reserve("a test actor", 0.05, 0.0, 10.0, {}, "SPREAD")
    try:
        options = reservation.actor_options()
        assert options["num_cpus"] == 0.05 and "resources" not in options

        @ray.remote
        def where() -> str:
            return ray.get_runtime_context().get_node_id()

        node = ray.get(where.options(**options).remote())  # runs inside the reservation
        assert node == ray.get_runtime_context().get_node_id()
    finally:
        reservation.release()


def test_sleep_mode_on_cpu_is_a_clear_error(vllm_tiny_model):
    """vLLM's sleep mode exists on CUDA only: a CPU engine refuses to start with it (before
    vLLM is even imported), naming the setting."""
    from samplers.engine_vllm import VLLMEngine

    config = SamplerConfig(engine="vllm", sleep_between_rollouts=True)
    with pytest.raises(InvalidRequestError, match=r"sleep_between_rollouts .* need vLLM on CUDA"):
        VLLMEngine(vllm_tiny_model, config, enable_lora=False)


def test_sleeping_is_a_no_op_for_engines_without_it(ray_local, tiny_model):
    """The pool's sleep (called by rl.loop.train between rollouts) with the torch engine."""
    from samplers.pool import SamplerPool, submit

    pool = SamplerPool(
        tiny_model,
        SamplerConfig(engine="torch", num_cpus_per_actor=0.05, max_model_len=64),
        enable_lora=False,
        label="sleep-test",
    ).start()
    try:
        assert submit(pool.sleep()).result() is False
    finally:
        pool.close()


def test_ranks_share_one_placement_group_placed_by_its_strategy(ray_local):
    from rl.placement import reserve_bundles

    ranks = reserve_bundles("a 2-rank trainer", 2, 0.05, 0.0, 10.0, None, "STRICT_PACK")
    group = ranks[0].group
    try:
        assert [r.bundle_index for r in ranks] == [0, 1]
        assert group is not None and ranks[1].group is not None and group.id == ranks[1].group.id
        table = ray.util.placement_group_table(group)
        assert table["strategy"] == "STRICT_PACK" and len(table["bundles"]) == 2

        @ray.remote
        def group_of_task() -> str | None:
            return ray.get_runtime_context().get_placement_group_id()

        placed = ray.get([group_of_task.options(**r.actor_options()).remote() for r in ranks])
        assert placed == [group.id.hex()] * 2
    finally:
        for reservation in ranks:
            reservation.release()
    assert ray.util.placement_group_table(group)["state"] == "REMOVED"


@pytest.mark.parametrize(
    ("make", "key"),
    [
        (lambda: TrainerConfig(shared_prefix_row_tokens=-1), "shared_prefix_row_tokens"),
        (lambda: TrainerConfig(shared_prefix_min_tokens=0), "shared_prefix_min_tokens"),
        (lambda: SamplerConfig(block_size=0), "block_size"),
    ],
)
def test_packing_and_kv_block_keys_out_of_range_name_themselves(make, key):
    with pytest.raises(InvalidRequestError, match=rf"{key}=.* is out of range"):
        make()


def test_kv_block_size_defaults_to_32_on_cpu_and_to_vllms_on_gpu():
    assert SamplerConfig().resolved_block_size(on_gpu=False) == 32
    assert SamplerConfig().resolved_block_size(on_gpu=True) is None
    assert SamplerConfig(block_size=64).resolved_block_size(on_gpu=False) == 64
