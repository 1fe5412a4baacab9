"""bench/bench_vs_trl.py gives TRL exactly our loop's task: the prompts rl.loop.train samples, in its
batch order, the same held-out problems and the same reward (TRL itself is not needed here)."""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from envs.chat import ChatRenderer
from rl.cli import parse_config
from rl.loop.pipeline import batch_builders
from rl.loop.train import Config, build_datasets
from rl.models import resolve_model

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


@pytest.mark.parametrize("level", [1, 2])
def test_trl_gets_rl_train_prompts_in_batch_order(bench, tokenizer, level):
    steps = 3
    train, test = bench.task_prompts(tokenizer, steps, level)
    config = parse_config(Config, [f"{k}={v}" for k, v in bench.task_keys(level).items()])
    assert config.env_args == f"level={level},num_test=100"
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


def _run(bench, name, label, accuracies, seconds_per_step=10.0, eval_s=0.0):
    """A side's run with held-out accuracy `accuracies[s]` after step s, each eval taking
    `eval_s` of the step's seconds."""
    side = bench.Side(name, label)
    side.evals = [
        bench.Eval(step, acc, 1.0, 20.0 + seconds_per_step * step, eval_s)
        for step, acc in enumerate(accuracies)
    ]
    return side


def test_times_leave_out_each_sides_evals(bench):
    # Ours reaches 80% at step 2 (40 s, 3 evals of 4 s: 28 s net); TRL at step 1
    # (60 s, 2 evals of 10 s: 40 s net).
    ours = _run(bench, "ours", "ours", [0.2, 0.7, 0.85], eval_s=4.0)
    trl = _run(bench, "trl", "trl", [0.2, 0.81, 0.9], seconds_per_step=40.0, eval_s=10.0)
    assert ours.net_seconds(ours.time_to(0.8)) == pytest.approx(28.0)
    text = bench.summary([ours, trl], 2)
    assert "0.70x" in text  # 28 s against 40 s, where wall times would give 40 / 60


def test_one_run_per_side_prints_the_ratio(bench):
    ours = _run(bench, "ours", "ours", [0.2, 0.85, 0.9])
    trl = _run(bench, "trl", "trl", [0.2, 0.81, 0.9], seconds_per_step=40.0)
    text = bench.summary([ours, trl], 2)
    assert "ours / TRL" in text and "0.50x" in text  # 30 s against 60 s
    assert "over runs" not in text


def test_repeated_runs_give_each_sides_spread(bench):
    runs = [
        _run(bench, "ours", "ours-1", [0.2, 0.85, 0.9]),  # 80% at 30 s
        _run(bench, "ours", "ours-2", [0.2, 0.6, 0.9]),  # at 40 s
        _run(bench, "ours", "ours-3", [0.2, 0.5, 0.7]),  # never
        _run(bench, "trl", "trl-s0", [0.2, 0.81, 0.9], seconds_per_step=40.0),  # at 60 s
        _run(bench, "trl", "trl-s1", [0.2, 0.72, 0.95], seconds_per_step=40.0),  # at 100 s
    ]
    text = bench.summary(runs, 2)
    header = text.splitlines()[0].split()
    assert header == ["ours-1", "ours-2", "ours-3", "trl-s0", "trl-s1"]  # one column per run
    lines = {line.split("  ")[0]: line for line in text.splitlines()}
    # Medians: ours 40 s (30, 40, never); TRL 80 s (60, 100).
    assert lines["median time to 80% held-out, less evals"].split()[-4:] == ["40", "s", "80", "s"]
    assert lines["runs at 80% after step 1"].split()[-2:] == ["1/3", "1/2"]
    assert lines["mean accuracy after 2 steps"].split()[-2:] == ["83.3%", "92.5%"]
    assert "0.50x" in lines["ours / TRL, medians"]
    assert "ours / TRL  " not in text  # no single-run ratio


def test_spreads_show_how_low_runs_fell_from_step_5(bench):
    steady = [0.2, 0.5, 0.7, 0.8, 0.85, 0.9, 0.92, 0.95]
    dipping = [0.2, 0.5, 0.7, 0.8, 0.85, 0.9, 0.6, 0.95]
    runs = [_run(bench, "ours", "ours-1", steady), _run(bench, "ours", "ours-2", dipping)]
    assert runs[1].lowest_from(5) == 0.6
    lines = {line.split("  ")[0]: line for line in bench.summary(runs, 7).splitlines()}
    assert lines["runs never below 88% from step 5"].split()[-1] == "1/2"
    assert lines["median lowest eval from step 5"].split()[-1] == "75%"


def test_spreads_compare_with_trls_final_accuracy(bench, tmp_path):
    runs = [  # a harder level: accuracy after 3 steps, and when each run reaches TRL's
        _run(bench, "ours", "ours-1", [0.1, 0.3, 0.35, 0.4]),  # TRL's 30% at 30 s
        _run(bench, "ours", "ours-2", [0.1, 0.2, 0.3, 0.32]),  # at 40 s
        _run(bench, "ours", "ours-3", [0.1, 0.2, 0.25, 0.28]),  # never
        _run(bench, "trl", "trl-s0", [0.1, 0.2, 0.3, 0.3], seconds_per_step=40.0),  # at 100 s
        _run(bench, "trl", "trl-s1", [0.1, 0.3, 0.25, 0.2], seconds_per_step=40.0),  # at 60 s
        _run(bench, "trl", "trl-s2", [0.1, 0.2, 0.2, 0.35], seconds_per_step=40.0),  # at 140 s
    ]
    text = bench.summary(runs, 3)
    lines = {line.split("  ")[0]: line for line in text.splitlines()}
    assert lines["median accuracy after 3 steps"].split()[-2:] == ["32%", "30%"]
    assert "+2 points" in lines["ours - TRL after 3 steps"]
    # Medians: ours 40 s (30, 40, never); TRL 100 s (60, 100, 140).
    assert lines["median time to TRL's 30%, less evals"].split()[-4:] == ["40", "s", "100", "s"]
    assert "0.40x" in lines["ours / TRL, to TRL's final"]
    # A results file prints the same summary again.
    out = tmp_path / "results.json"
    out.write_text(json.dumps({"steps": 3, "sides": [dataclasses.asdict(r) for r in runs]}))
    assert bench.summary_of(out) == text


def test_bad_seed_lists_and_repeats_are_refused(bench, capsys, tmp_path):
    bad = [["--trl-seed", "0,x"], ["--trl-seed", "1,1"], ["--repeats", "0"], ["--level", "9"]]
    for args in bad:
        with pytest.raises(SystemExit):
            bench.main([*args, "--sides", "ours", "--work", str(tmp_path / "w")])
        assert args[0] in capsys.readouterr().err
    assert not (tmp_path / "w").exists()  # refused before anything ran or was written
