"""Envs, rewards and answer extraction, driven by scripted replies (no model); the renderer uses
SmolLM2's real tokenizer."""

from __future__ import annotations

import asyncio
import functools
import json
import pickle
import re
import subprocess
import sys

import pytest
from transformers import AutoTokenizer

from envs import arithmetic, guess_number, math_word
from envs.answers import (
    bare_number_format,
    check_number,
    equation_format,
    extract_answer,
    has_answer_marker,
    is_bare_number,
)
from envs.base import EnvError, EnvGroupBuilder, Trajectory, TrajectoryGroup, Transition
from envs.chat import ChatRenderer
from envs.math_word_templates import DATA_PATH, generate
from envs.problem import Problem, ProblemDataset, ProblemEnv, ProblemGroupBuilder, ProblemTask
from rl.loop.datums import groups_to_datums
from rl.models import resolve_model


@pytest.fixture(scope="module")
def renderer() -> ChatRenderer:
    return ChatRenderer(AutoTokenizer.from_pretrained(resolve_model("SmolLM2-135M-Instruct")))


def _reply(renderer: ChatRenderer, text: str, ended: bool = True) -> list[int]:
    tokens = list(renderer.tokenizer.encode(text, add_special_tokens=False))
    return [*tokens, renderer.end_of_turn_token] if ended else tokens


def _run(coro):
    return asyncio.run(coro)


# ---------------------------------------------------------------------------------------------
# Answer extraction


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The answer is 42.", 42),
        ("5 + 3 = 8, so #### 8", 8),
        ("We get \\boxed{1,234} at the end.", 1234),
        ("\\boxed{\\frac{7}{1}} hmm", None),  # two numbers in the box: not a clean answer
        ("First 3 apples, then 5 more: 8 apples", 8),
        ("Answer: -17", -17),
        ("It costs $1,250 in total.", 1250),
        ("The answer is 12. Check: 3 * 4 = 12, and 99 bottles.", 12),
        ("I have no idea.", None),
        ("3.5", 3.5),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_answer_markers_and_bare_numbers():
    assert has_answer_marker("so the answer is 7")
    assert has_answer_marker("#### 7") and has_answer_marker("\\boxed{7}")
    assert not has_answer_marker("I think 7")
    assert is_bare_number(" 42. ") and is_bare_number("-3") and is_bare_number("1,000")
    assert not is_bare_number("42 apples") and not is_bare_number("")


def test_check_number():
    assert check_number("The answer is 42.", "42") == 1.0
    assert check_number("The answer is 41.", "42") == 0.0
    assert check_number("nothing here", "42") == 0.0
    with pytest.raises(ValueError, match="not a number"):
        check_number("42", "forty-two")


# ---------------------------------------------------------------------------------------------
# Single-turn problems


def _always(value, reply: str, answer: str):
    return value


def _task(check_answer=check_number, check_format=None, name="t") -> ProblemTask:
    return ProblemTask(name=name, check_answer=check_answer, check_format=check_format)


def _step(renderer, task, text, ended=True):
    env = ProblemEnv(renderer, task, Problem("What is 6 * 7?", "42"))
    _run(env.initial_observation())
    return _run(env.step(_reply(renderer, text, ended)))


def test_problem_env_prompt(renderer):
    task = ProblemTask(name="t", check_answer=check_number, system_prompt="Be brief.")
    prompt, stop = _run(
        ProblemEnv(renderer, task, Problem("What is 6 * 7?", "42")).initial_observation()
    )
    text = renderer.tokenizer.decode(prompt)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert text.endswith("user\nWhat is 6 * 7?<|im_end|>\n<|im_start|>assistant\n")
    assert stop == renderer.stop_condition


def test_problem_reward_formula(renderer):
    task = _task(check_format=bare_number_format)
    cases = [("42", True, 1.0, 1.0), ("It is 42", True, 0.9, 0.0), ("41", True, 0.0, 1.0)]
    cases += [("It is 41", True, -0.1, 0.0), ("42", False, 0.9, 0.0)]  # cut off: format fails
    for text, ended, reward, format_ok in cases:
        result = _step(renderer, task, text, ended)
        assert result.episode_done
        assert result.reward == pytest.approx(reward), text
        assert result.metrics["format"] == format_ok


def test_arithmetic_asks_for_the_equation_and_weighs_format_as_much_as_the_answer(renderer):
    well_formed = ["3 + 7 = 10", "3 + 7 = 10.", "12 - 3 * 2 = 6", " 3+7=10 "]
    assert [equation_format(t) for t in well_formed] == [1.0] * 4
    ill_formed = ["10", "The answer is 10.", "3 + 7 = 10\n\nSo the sum is 10", "= 10", "3 = 3"]
    assert [equation_format(t) for t in ill_formed] == [0.0] * 5
    # _step asks "What is 6 * 7?"
    cases = [("6 * 7 = 42", 1.0), ("6 * 7 = 41", 0.0), ("It is 42.", 0.0), ("Forty", -1.0)]
    for text, reward in cases:
        result = _step(renderer, arithmetic.TASK, text, True)
        assert result.reward == pytest.approx(reward), text


@pytest.mark.parametrize("bad", [float("nan"), "1", None, True])
def test_bad_reward_function_is_refused(renderer, bad):
    with pytest.raises(EnvError, match="t: check_answer: reward must be"):
        _step(renderer, _task(check_answer=functools.partial(_always, bad)), "42")


def test_problem_dataset_is_deterministic(renderer):
    problems = [Problem(f"q{i}", str(i)) for i in range(10)]

    def questions(seed, index):
        dataset = ProblemDataset(problems, _task(), renderer, 4, 3, seed=seed, num_epochs=2)
        return [b.problem.question for b in dataset.get_batch(index)]  # type: ignore[attr-defined]

    dataset = ProblemDataset(problems, _task(), renderer, batch_size=4, group_size=3, num_epochs=2)
    assert len(dataset) == 4  # 2 batches per epoch (2 problems dropped), 2 epochs
    assert questions(0, 1) == questions(0, 1)
    assert questions(0, 0) != questions(1, 0)
    assert questions(0, 0) != questions(0, 2)  # each epoch reshuffles
    assert len(set(questions(0, 0) + questions(0, 1))) == 8
    (builder, *_) = dataset.get_batch(0)
    assert len(_run(builder.make_envs())) == 3
    with pytest.raises(IndexError):
        dataset.get_batch(4)
    with pytest.raises(EnvError, match="fewer than one batch"):
        ProblemDataset(problems, _task(), renderer, batch_size=11, group_size=1)


def test_group_builder_defaults(renderer):
    with pytest.raises(TypeError, match="abstract"):
        EnvGroupBuilder()  # type: ignore[abstract]
    builder = ProblemGroupBuilder(renderer, arithmetic.TASK, Problem("What is 1 + 1?", "2"), 2)
    envs = _run(builder.make_envs())
    rewards = _run(builder.compute_group_rewards([Trajectory([]), Trajectory([])], envs))
    assert rewards == [(0.0, {}), (0.0, {})]


def test_group_builder_pickles(renderer):
    builder = ProblemGroupBuilder(renderer, arithmetic.TASK, Problem("What is 1 + 1?", "2"), 2)
    copy = pickle.loads(pickle.dumps(builder))
    assert copy.problem == builder.problem and copy.logging_tags() == ["arithmetic"]
    envs = _run(copy.make_envs())
    assert _run(envs[0].initial_observation())[0] == _run(envs[1].initial_observation())[0]


# ---------------------------------------------------------------------------------------------
# Built-in envs


def test_arithmetic_problems(renderer):
    assert arithmetic.evaluate([2, 3, 4], ["+", "*"]) == 14
    assert arithmetic.evaluate([10, 2, 3, 4], ["-", "*", "+"]) == 8
    level = arithmetic.LEVELS[4]
    problems = arithmetic.make_problems(50, seed=3, config=level)
    assert problems == arithmetic.make_problems(50, seed=3, config=level)
    assert problems != arithmetic.make_problems(50, seed=4, config=level)
    for problem in problems:
        expression = re.fullmatch(r"What is ([\d +\-*]+)\?", problem.question)
        assert expression is not None
        assert int(problem.answer) == eval(expression.group(1))  # our own generated digits
        assert len(expression.group(1).split()) == 2 * level.num_operands - 1
    train, test = arithmetic.build_datasets(renderer, batch_size=4, group_size=2, num_batches=3)
    assert len(train) == 3 and len(test) == 1 and len(test.get_batch(0)) == 64
    with pytest.raises(EnvError, match="level"):
        arithmetic.build_datasets(renderer, 4, 2, level=9)


def test_math_word_data_is_generated_and_correct():
    rows = [json.loads(line) for line in DATA_PATH.read_text().splitlines()]
    assert rows == generate()  # the shipped file is exactly the generator's output
    assert len({row["question"] for row in rows}) == len(rows) >= 300
    for row in rows:
        equations = re.findall(r"(\d+(?: [-+*/] \d+)+) = (\d+)", row["solution"])
        assert equations, row["id"]
        for lhs, rhs in equations:
            assert eval(lhs) == int(rhs), (row["id"], lhs, rhs)
        assert int(equations[-1][1]) == row["answer"] > 0
        assert row["solution"].endswith(f"The answer is {row['answer']}.")
        assert extract_answer(row["solution"]) == row["answer"]


def test_math_word_datasets(renderer):
    train_rows, test_rows = math_word.load_problems("train"), math_word.load_problems("test")
    assert (len(train_rows), len(test_rows)) == (264, 48)
    assert not {p.question for p, _ in train_rows} & {p.question for p, _ in test_rows}
    train, test = math_word.build_datasets(renderer, batch_size=8, group_size=4, few_shot=1)
    assert len(train) == 263 // 8 and len(test.get_batch(0)) == 48
    builder = train.get_batch(0)[0]
    (env, *_) = _run(builder.make_envs())
    prompt = renderer.tokenizer.decode(_run(env.initial_observation())[0])
    assert train_rows[0][1] in prompt  # the worked example
    seen = {b.problem.question for i in range(len(train)) for b in train.get_batch(i)}  # type: ignore[attr-defined]
    assert train_rows[0][0].question not in seen  # few-shot examples are not trained on
    result = _run(env.step(_reply(renderer, f"So it is #### {env.problem.answer}")))
    assert result.reward == 1.0 and result.metrics == {"correct": 1.0, "format": 1.0}


def _play(renderer, env, replies):
    """Runs an episode with scripted replies; returns the trajectory and the final StepResult."""
    observation, _ = _run(env.initial_observation())
    transitions = []
    for text in replies:
        cut_off = text.endswith("...")  # a reply that hit max_tokens: no end-of-turn token
        action = _reply(renderer, text.removesuffix("..."), ended=not cut_off)
        result = _run(env.step(action))
        transitions.append(
            Transition(
                observation,
                action,
                [-1.0] * len(action),
                result.reward,
                result.episode_done,
                result.metrics,
            )
        )
        if result.episode_done:
            return Trajectory(transitions), result
        assert result.next_observation[: len(observation) + len(action)] == observation + action
        observation = result.next_observation
    raise AssertionError("episode did not end")


def test_guess_number_episode(renderer):
    env = guess_number.GuessNumberEnv(renderer, secret=37, low=1, high=100, max_turns=5)
    trajectory, result = _play(renderer, env, ["50", "I guess 25", "no idea", "37"])
    assert result.reward == 1.0
    assert result.metrics == {"success": 1.0, "turns": 4.0, "invalid": 1.0}
    decoded = renderer.tokenizer.decode(trajectory.transitions[-1].observation)
    assert decoded.count("user\nLower.") == 1 and decoded.count("user\nHigher.") == 1
    assert "Please reply with one whole number" in decoded
    # The whole episode is one datum, with every sampled token trained.
    group = TrajectoryGroup([trajectory], [0.0], [{}])
    (datum,) = groups_to_datums([group])
    actions = sum(len(t.action_tokens) for t in trajectory.transitions)
    assert sum(datum.loss_fn_inputs["weights"].tolist()) == actions


def test_guess_number_runs_out_of_turns(renderer):
    env = guess_number.GuessNumberEnv(renderer, secret=10, low=1, high=20, max_turns=2)
    _, result = _play(renderer, env, ["5...", "7"])
    assert result.reward == 0.0 and result.metrics["success"] == 0.0
    # The cut-off first reply got its end-of-turn token in the next observation.
    assert renderer.tokenizer.decode(env.observation).count("5<|im_end|>") == 1


def test_guess_number_dataset(renderer):
    train, test = guess_number.build_datasets(renderer, batch_size=3, group_size=2, num_batches=4)
    batch = train.get_batch(1)
    assert [b.secret for b in batch] == [b.secret for b in train.get_batch(1)]  # type: ignore[attr-defined]
    assert len(_run(batch[0].make_envs())) == 2 and len(test.get_batch(0)) == 32
    assert pickle.loads(pickle.dumps(batch[0])).secret == batch[0].secret  # type: ignore[attr-defined]


def test_envs_import_no_heavy_dependencies():
    code = (
        "import sys, envs, envs.arithmetic, envs.math_word, envs.guess_number;"
        "heavy = [m for m in ('torch', 'ray', 'vllm', 'rl') if m in sys.modules];"
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
