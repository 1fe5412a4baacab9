"""The console scripts of pyproject.toml: each names a function that reads sys.argv itself (a
console script calls it with no arguments) and answers --help the way `python -m` does."""

from __future__ import annotations

import importlib
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def test_the_expected_scripts_are_declared():
    assert set(SCRIPTS) == {
        "engineroom-train",
        "engineroom-sft",
        "engineroom-plot",
        "engineroom-serve",
        "engineroom-export",
    }


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_script_reads_sys_argv(name, monkeypatch, capsys):
    module_name, _, attr = SCRIPTS[name].partition(":")
    fn = getattr(importlib.import_module(module_name), attr)
    monkeypatch.setattr(sys, "argv", [name, "--help"])
    with pytest.raises(SystemExit) as exit_info:
        fn()  # as the generated script calls it: no arguments
    assert exit_info.value.code in (0, None)
    expected = {
        "engineroom-train": "log_dir=",
        "engineroom-sft": "log_dir=",
        "engineroom-plot": "RUN_DIR",
        "engineroom-serve": "--port",
        "engineroom-export": "source=",
    }
    assert expected[name] in capsys.readouterr().out


@pytest.mark.parametrize(
    ("module", "script"),
    [("rl.loop.train", "engineroom-train"), ("rl.loop.plot", "engineroom-plot")],
)
def test_script_matches_python_dash_m(module, script, tmp_path):
    """A bad argument: the same one-line error and exit code both ways (no Ray is started)."""
    module_name, _, attr = SCRIPTS[script].partition(":")
    code = f"import sys; from {module_name} import {attr}; sys.exit({attr}())"
    args = ["nonsense=1"] if module == "rl.loop.train" else [str(tmp_path / "no-run")]
    as_module = subprocess.run(
        [sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=ROOT
    )
    as_script = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT
    )
    assert as_module.returncode == as_script.returncode == 2
    assert as_module.stderr == as_script.stderr
    assert len(as_module.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("module", "old", "new"),
    [
        ("rl.loop.train", ["trainer_dtype=float32"], "'trainer_dtype' is now 'trainer.dtype'"),
        ("rl.loop.train", ["max_context=512"], "'max_context' is now 'sampler.max_model_len'"),
        ("rl.loop.sft", ["num_gpus=1"], "'num_gpus' is now 'trainer.num_gpus'"),
        ("rl.server", ["--trainer-dtype", "float32"], "'trainer_dtype' is now 'trainer.dtype'"),
        ("rl.server", ["--sync-mode", "merged"], "'sync_mode' is now 'sampler.sync_mode'"),
    ],
)
def test_an_old_flat_key_names_its_new_spelling(module, old, new):
    """The actors' settings are sub-configs now (trainer.*, sampler.*): a key of the old flat
    configs is refused with one line that names its new spelling, and nothing starts."""
    result = subprocess.run(
        [sys.executable, "-m", module, *old], capture_output=True, text=True, cwd=ROOT
    )
    assert result.returncode == 2
    assert new in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_dotted_keys_reach_the_sub_configs():
    from rl.cli import parse_config
    from rl.loop.config import Config
    from rl.server.__main__ import settings
    from rl.server.config import ServerConfig

    config = parse_config(Config, ["trainer.num_threads=3", "sampler.engine=torch", "rank=8"])
    assert config.trainer.num_threads == 3 and config.sampler.engine == "torch"
    assert config.trainer.dtype == "float32"  # the preset's, where not set
    trainer, sampler = config.actor_configs()
    assert sampler.max_lora_rank == 8  # fits `rank`, left at its default
    assert trainer.checkpoint_dir.endswith("runs/rl/checkpoints")
    server = parse_config(
        ServerConfig, settings(["--port", "0", "--verbose", "--sampler.max_model_len", "512"])
    )
    assert server.port == 0 and server.verbose and server.max_context_length == 512
