"""Environments for RL: the env contracts (`envs.base`), chat rendering (`envs.chat`), a helper
for single-turn question/answer tasks (`envs.problem`) and built-in envs (`arithmetic`,
`math_word`, `guess_number`). Imports no torch, ray or vllm.
"""

from envs.base import (
    Env,
    EnvError,
    EnvGroupBuilder,
    RLDataset,
    StepResult,
    StopCondition,
    Trajectory,
    TrajectoryGroup,
    Transition,
    check_reward,
)
from envs.chat import ChatRenderer, Message
from envs.problem import Problem, ProblemDataset, ProblemEnv, ProblemGroupBuilder, ProblemTask

__all__ = [
    "ChatRenderer",
    "Env",
    "EnvError",
    "EnvGroupBuilder",
    "Message",
    "Problem",
    "ProblemDataset",
    "ProblemEnv",
    "ProblemGroupBuilder",
    "ProblemTask",
    "RLDataset",
    "StepResult",
    "StopCondition",
    "Trajectory",
    "TrajectoryGroup",
    "Transition",
    "check_reward",
]
