"""Examples run as tests, with tiny settings (a tiny random model, a few steps)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def test_sl_basic_lowers_the_loss(service, tiny_model):
    sl_basic = load_example("sl_basic")
    config = sl_basic.Config(
        base_model=tiny_model, steps=8, batch_size=4, learning_rate=5e-3, rank=8, max_length=96
    )
    losses = sl_basic.main(config, service=service)
    assert len(losses) == 8
    assert sum(losses[-2:]) / 2 < losses[0] * 0.9
