"""Trainer and sampler agree by default: the same dtype on each device, and every RL step
logs the sampler-trainer logprob gap the sync check measured."""

from __future__ import annotations

from pathlib import Path

import pytest

from rl.loop.metrics_log import read_metrics
from rl.loop.train import main
from samplers.config import SamplerConfig
from trainers import TrainerConfig

ROOT = Path(__file__).resolve().parents[1]


def test_default_dtypes_agree_on_each_device():
    for on_gpu, dtype in ((False, "float32"), (True, "bfloat16")):
        assert TrainerConfig().resolved_dtype(on_gpu) == dtype
        assert SamplerConfig().resolved_dtype(on_gpu) == dtype
    # A dtype the user sets is kept on either device.
    assert TrainerConfig(dtype="bfloat16").resolved_dtype(False) == "bfloat16"
    assert SamplerConfig(dtype="float32").resolved_dtype(True) == "float32"


def test_the_fast_sampler_dtype_is_bfloat16_only_where_it_is_native(monkeypatch):
    """dtype "fast" (the RL loop's preset): bfloat16 on a GPU and for vLLM on a CPU with AMX;
    float32 on other CPUs and for the torch engine on any CPU."""
    import rl.models

    for amx in (True, False):
        monkeypatch.setattr(rl.models, "cpu_has_amx", lambda amx=amx: amx)
        assert SamplerConfig(dtype="fast").resolved_dtype(True) == "bfloat16"
        cpu = SamplerConfig(dtype="fast").resolved_dtype(False)
        assert cpu == ("bfloat16" if amx else "float32")
        assert SamplerConfig(dtype="fast", engine="vllm").resolved_dtype(False) == cpu
        assert SamplerConfig(dtype="fast", engine="torch").resolved_dtype(False) == "float32"
    with pytest.raises(Exception, match="dtype"):
        SamplerConfig(dtype="fastest")


def test_rl_steps_log_the_sync_gap_and_defaults_agree(ray_local, tiny_model, tmp_path, monkeypatch):
    """Default dtypes on both sides (fp32 on CPU): the gap is float32 noise, not bf16's."""
    from rl import ServiceClient

    monkeypatch.syspath_prepend(str(ROOT))  # for env=examples.custom_env:...
    service = ServiceClient(
        trainer_config=TrainerConfig(
            num_cpus=0.1, num_threads=1, checkpoint_dir=str(tmp_path / "ckpt")
        ),
        sampler_config=SamplerConfig(engine="torch", num_cpus_per_actor=0.05),
    )
    args = {
        "base_model": tiny_model,
        "env": "examples.custom_env:build_datasets",
        "env_args": "num_test=4",
        "num_steps": 2,
        "groups_per_batch": 2,
        "group_size": 2,
        "max_tokens": 4,
        "rank": 4,
        "learning_rate": 1e-2,
        "remove_constant_groups": False,
        "eval_every": 0,
        "log_samples": 0,
        "log_dir": str(tmp_path / "run"),
    }
    try:
        trainer = main([f"{k}={v}" for k, v in args.items()], service=service)
    finally:
        service.close()
    records = [r for r in read_metrics(tmp_path / "run") if "progress/step" in r]
    assert [r["step"] for r in records] == [0, 1]
    for record in records:
        assert 0 <= record["sync/logprob_diff_mean"] <= record["sync/logprob_diff_max"]
        assert record["sync/logprob_diff_max"] < 1e-3  # a bf16 trainer gives ~3e-3 here
    assert trainer.history[0]["sync/logprob_diff_mean"] == pytest.approx(
        records[0]["sync/logprob_diff_mean"]
    )
