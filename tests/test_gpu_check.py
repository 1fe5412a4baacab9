"""The GPU check (bench/gpu_check.py) runs on CPU with tiny shapes, as on the device machine:
without Ray and vLLM importable, and its outputs are sane. Keeps the script from rotting
between sessions that are lent a GPU."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainers.losses import LOSSES

ROOT = Path(__file__).resolve().parents[1]

# The device machine has neither Ray nor vLLM: make both unimportable, then run the script.
RUN = (
    "import runpy, sys; sys.modules['ray'] = None; sys.modules['vllm'] = None; "
    "sys.argv = ['gpu_check.py', *sys.argv[1:]]; "
    "runpy.run_path('bench/gpu_check.py', run_name='__main__')"
)


def _run(tmp_path: Path, *args: str) -> tuple[dict, str]:
    out = tmp_path / "gpu_check.json"
    done = subprocess.run(
        [sys.executable, "-c", RUN, *args, "shapes=tiny", "steps=1", f"json={out}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,  # ~25 s on a quiet machine; a loaded one takes many times that
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text()), done.stdout


def test_gpu_check_on_cpu_with_tiny_shapes(tmp_path):
    results, stdout = _run(tmp_path, "device=cpu")
    assert results["device_name"] == "cpu"

    rows = results["throughput"]
    assert [row["seq_len"] for row in rows] == [64, 32]
    for row in rows:
        for key in ("ours_tokens_per_s", "plain_tokens_per_s", "ours_vs_plain"):
            assert math.isfinite(row[key]) and row[key] > 0, key
        assert row["ours_vs_anchor"] == row["ours_tokens_per_s"] / 13_300

    mfu = results["mfu"]
    assert mfu["flops_per_token"] > 0 and mfu["ours_tokens_per_s"] > 0
    assert mfu["peak_flops"] is None and mfu["ours_mfu"] is None  # no known peak on a CPU

    numerics = results["numerics"]
    assert numerics["compared"] == "cpu vs cpu"  # no GPU: the CPU against itself
    assert numerics["max_logprob_diff"] == 0.0 and numerics["logprobs_ok"]
    assert sorted(numerics["losses"]) == sorted(LOSSES)  # every built-in loss
    for loss in numerics["losses"].values():
        assert loss["cpu"] == loss["device"] and loss["cpu"] != 0.0
    assert numerics["losses_ok"]

    sampler = results["sampler"]
    assert sampler["engine_device"] == "cpu"
    assert sampler["prompts"] == sampler["prompts_asked"] == 4
    assert sampler["tokens"] == 4 * 8 and sampler["tokens_per_s"] > 0

    tenants = results["tenants"]
    assert [row["tenants"] for row in tenants] == [1, 2, 4, 8]
    for row in tenants:
        for key in ("shared", "one_by_one", "one_tenant", "shared_vs_one_by_one"):
            assert math.isfinite(row[key]) and row[key] > 0, key

    # The printed report names every part and its comparison.
    for text in ("throughput seq 64", "vs prime-rl anchor", "numerics (cpu vs cpu", "sampler"):
        assert text in stdout, text


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_check_numerics_and_sampler_on_cuda(tmp_path):
    results, _ = _run(tmp_path, "device=cuda", "parts=numerics,sampler")
    numerics = results["numerics"]
    assert numerics["compared"] == "cuda vs cpu"
    assert numerics["logprobs_ok"] and numerics["losses_ok"], numerics
    assert results["sampler"]["engine_device"] == "cuda"


def test_engine_imports_without_ray():
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; sys.modules['ray'] = None; import trainers.trainer, "
            "samplers.engine_torch, trainers.losses",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
