"""bench/bench_vs_trl.py gives TRL exactly our loop's task: the prompts rl.train samples, in its
batch order, the same held-out problems and the same reward (TRL itself is not needed here)."""

from __future__ import annotations

import asyncio
import importlib.util
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from envs.chat import ChatRenderer
from rl.cli import parse_config
from rl.models import resolve_model
from rl.train import Config, batch_builders, build_datasets

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_vs_trl.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_vs_trl", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(resolve_model("SmolLM2-135M-Instruct"))


def _observations(builders):
    """(prompt tokens, answer) of the first env of each group, as the loop samples them."""
    out = []
    for builder in builders:
        env = asyncio.run(builder.make_envs())[0]
        tokens, _ = asyncio.run(env.initial_observation())
        out.append((tokens, env.problem.answer))
    return out


def test_trl_gets_rl_train_prompts_in_batch_order(bench, tokenizer):
    steps = 3
    train, test = bench.task_prompts(tokenizer, steps)
    config = parse_config(Config, [f"{k}={v}" for k, v in bench.TASK_KEYS.items()])
    our_train, our_test = build_datasets(config, ChatRenderer(tokenizer))
    expected_train = _observations(
        [b for step in range(steps) for b in batch_builders(our_train, step)]
    )
    expected_test = _observations([b for i in range(len(our_test)) for b in our_test.get_batch(i)])
    assert len(train) == steps * config.groups_per_batch and len(test) == 100
    assert [(p.tokens, p.answer) for p in train] == expected_train
    assert [(p.tokens, p.answer) for p in test] == expected_test
    # TRL tokenizes the template's text itself; it must come out as our tokens.
    assert all(tokenizer(text=p.text)["input_ids"] == p.tokens for p in (*train, *test))
    assert "Reply with only the equation" in train[0].text


def test_trl_reward_is_the_env_reward(bench, tokenizer):
    renderer = ChatRenderer(tokenizer)
    end = renderer.stop_condition[0]
    reply = tokenizer.encode("3 + 7 = 10", add_special_tokens=False)
    assert bench.score(renderer, [*reply, end], "10") == {
        "reward": 1.0,
        "correct": 1.0,
        "format": 1.0,
    }
    # Cut off by the token limit: the format does not count, the answer does.
    assert bench.score(renderer, reply, "10") == {"reward": 0.0, "correct": 1.0, "format": 0.0}
    words = tokenizer.encode("ten", add_special_tokens=False)
    assert bench.score(renderer, [*words, end], "10")["reward"] == -1.0
