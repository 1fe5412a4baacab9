"""The curriculum: stages of env_args, the stage rule, and a run that moves up and resumes there."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_rl_loop import ROOT, tiny_args

from rl.errors import InvalidRequestError
from rl.loop.config import Config
from rl.loop.curriculum import next_stage
from rl.loop.pipeline import batch_builders, builder_id
from rl.loop.run_dir import load_checkpoints
from rl.loop.train import main


@pytest.fixture(autouse=True)
def repo_root_importable(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))  # examples.custom_env


def test_stages_are_env_args_overrides():
    config = Config(env_args="level=1,num_test=100", curriculum="level=2; level=3,num_test=8")
    assert config.curriculum_stages() == [
        {"level": 2, "num_test": 100},
        {"level": 3, "num_test": 8},
    ]
    assert Config().curriculum_stages() == []


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"curriculum": "level=2;"}, "curriculum stage 2 of 'level=2;' is empty"),
        ({"curriculum": "level"}, "env_args item 'level' is not key=value"),
        ({"curriculum_advance_at": 1.5}, r"curriculum_advance_at=1.5 must be in \[0, 1\]"),
        ({"curriculum_advance_at": float("nan")}, "curriculum_advance_at=nan"),
    ],
)
def test_bad_curriculum_is_a_clear_error(overrides, message):
    with pytest.raises(InvalidRequestError, match=message):
        Config(**overrides)


def test_a_stage_moves_up_at_the_threshold_and_never_past_the_last():
    assert next_stage(0, 3, 0.89, 0.9) == 0
    assert next_stage(0, 3, 0.9, 0.9) == 1
    assert next_stage(2, 3, 1.0, 0.9) == 2  # the last stage stays
    assert next_stage(1, 3, None, 0.0) == 1  # no samples (every rollout failed): stays
    assert next_stage(0, 1, 1.0, 0.9) == 0  # no curriculum


def staged_datasets(renderer, batch_size: int, group_size: int, seed: int = 0, stage: int = 0):
    """The custom env's task, with problems of their own per stage (a run's `env=`)."""
    from envs.problem import ProblemDataset
    from examples.custom_env import TASK, make_problems

    problems = make_problems(50 * batch_size, seed + 1000 * stage)
    train = ProblemDataset(problems, TASK, renderer, batch_size, group_size, seed)
    test = ProblemDataset(make_problems(2, seed + 1), TASK, renderer, 2, 1, shuffle=False)
    return train, test


def stage_ids(renderer_model: str, stage: int, step: int) -> list[int]:
    from envs.chat import ChatRenderer
    from rl.models import load_tokenizer

    train, _ = staged_datasets(ChatRenderer(load_tokenizer(renderer_model)), 3, 4, stage=stage)
    return [builder_id(b) for b in batch_builders(train, step)]


def test_a_run_moves_to_the_next_stage_and_resumes_there(torch_service, tiny_model, tmp_path):
    def args(log_dir: Path, steps: int) -> list[str]:
        return tiny_args(
            tiny_model,
            log_dir,
            env="test_curriculum:staged_datasets",
            env_args="stage=0",
            curriculum="stage=1",
            curriculum_advance_at=0.0,  # every step's accuracy reaches it: move up after step 1
            num_steps=steps,
            save_every=1,
        )

    history = main(args(tmp_path, 2), service=torch_service).history
    assert [s["curriculum/stage"] for s in history] == [0, 1]
    assert history[0]["data/problem_ids"] == stage_ids(tiny_model, 0, 0)
    assert history[1]["data/problem_ids"] == stage_ids(tiny_model, 1, 1)
    assert [r.loop_state["curriculum_stage"] for r in load_checkpoints(tmp_path)] == [1, 1]
    # A resumed run goes on in the stage it had reached, not from the first.
    resumed = main(args(tmp_path, 3), service=torch_service).history
    assert [s["step"] for s in resumed] == [2]
    assert resumed[0]["curriculum/stage"] == 1
    assert resumed[0]["data/problem_ids"] == stage_ids(tiny_model, 1, 2)
