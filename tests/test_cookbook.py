"""tinker-cookbook, unmodified, against `python -m rl.server` (slow: it sets up the cookbook's
own environment on first use and starts a real server process).

A short version of `scripts/cookbook.sh`: the math_rl recipe (env=arithmetic) and the
supervised chat recipe on the repo's conversations file, two steps each, on a tiny model with
the torch sampler. The full-size figures (SmolLM2) are in docs/server.md.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from server_process import ROOT, server_process

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    """A real server process; yields (base url, api key)."""
    with server_process(tiny_model, tmp_path_factory.mktemp("cookbook-server")) as running:
        yield running


def run_recipe(server, tiny_model: str, recipe: str, log_path: Path, *args: str) -> None:
    url, key = server
    env = {
        **os.environ,
        "TINKER_BASE_URL": url,
        "TINKER_API_KEY": key,
        "COOKBOOK_MODEL": tiny_model,
    }
    result = subprocess.run(
        ["bash", "scripts/cookbook.sh", recipe, f"log_path={log_path}", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-5000:])


def metrics(log_path: Path) -> list[dict]:
    return [json.loads(line) for line in (log_path / "metrics.jsonl").read_text().splitlines()]


def test_math_rl_and_supervised_recipes_run_unmodified(server, tiny_model, tmp_path):
    import tinker

    math_path = tmp_path / "math_rl"
    run_recipe(
        server, tiny_model, "math_rl", math_path,
        "max_steps=2", "groups_per_batch=2", "group_size=4", "max_tokens=4", "save_every=0",
    )  # fmt: skip
    # The last row holds only the run's cumulative token counts.
    rows = [r for r in metrics(math_path) if "env/all/correct" in r]
    assert [r["step"] for r in rows] == [0, 1]
    assert all("optim/kl_sample_train_v1" in r for r in rows)
    # At its default loss, stable_reinforce, which samples with record_stability_info=True.
    config = json.loads((math_path / "config.json").read_text())
    assert config["loss_fn"] == "stable_reinforce"

    sl_path = tmp_path / "sl"
    run_recipe(server, tiny_model, "sl", sl_path, "max_steps=2", "batch_size=4", "save_every=2")
    rows = metrics(sl_path)
    assert len(rows) == 2 and all(r["train_mean_nll"] > 0 for r in rows)

    # The recipes' checkpoints are on the server, listed for this key's tenant.
    url, key = server
    rest = tinker.RestClient(base_url=url, api_key=key)
    checkpoints = rest.list_user_checkpoints().result().checkpoints
    assert any(c.checkpoint_id == "weights/final" for c in checkpoints)
    assert any(c.checkpoint_id == "sampler_weights/final" for c in checkpoints)


def test_rl_loop_datums_train_through_the_sdk(server, tiny_model):
    """recipes/rl_loop.py needs gsm8k from the hub; its datum construction (with the recipe's
    own provenance helper) trains at stable_reinforce, gspo and importance_sampling."""
    subprocess.run(["bash", "scripts/cookbook.sh", "install"], cwd=ROOT, check=True, timeout=1500)
    url, key = server
    env = {**os.environ, "TINKER_BASE_URL": url, "TINKER_API_KEY": key, "TINKER_TELEMETRY": "0"}
    result = subprocess.run(
        [str(ROOT / ".venv-cookbook/bin/python"), "tests/cookbook_rl_loop.py", tiny_model],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-5000:]
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [r["loss_fn"] for r in rows] == ["stable_reinforce", "gspo", "importance_sampling"]
    assert all(r["finite"] and r["datums"] == 4 for r in rows), rows
