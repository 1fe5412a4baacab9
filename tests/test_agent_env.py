"""Agents on an OpenAI-style chat client (envs/agent.py, rl/loop/agents.py): the exact
sampled tokens of a multi-turn episode become its datum, in and out of the RL loop."""

from __future__ import annotations

import asyncio
import json

import pytest
from episode_checks import check_exact_episode, three_turns
from transformers import AutoTokenizer

from envs.agent import AgentDataset, AgentEnv, ChatClient, Turn
from envs.agent_arithmetic import build_datasets, calculator_with_retry
from envs.base import EnvError
from envs.chat import ChatRenderer
from envs.problem import Problem
from rl.loop.agents import episode_datums, sampling_chat_client
from rl.loop.train import main
from rl.types import SamplingParams

PROBLEM = Problem(question="What is 2 + 3?", answer="5")


@pytest.fixture(scope="module")
def renderer(tiny_model) -> ChatRenderer:
    return ChatRenderer(AutoTokenizer.from_pretrained(tiny_model))


def test_a_recorded_episode_trains_on_exactly_the_sampled_tokens(
    torch_service, tiny_model, renderer
):
    sampler = torch_service.create_sampling_client(base_model=tiny_model)
    params = SamplingParams(max_tokens=12, temperature=1.0, seed=4)
    client = sampling_chat_client(sampler, renderer, params)
    assert asyncio.run(three_turns(client, PROBLEM)) == 1.0
    assert len(client.turns) == 3
    check_exact_episode(client.turns, renderer.end_of_turn_token)


def test_text_round_trips_drift_and_the_client_keeps_the_sampled_tokens(renderer):
    """Tokens a model can sample ("He" then "llo") that its own text re-encodes otherwise
    ("Hello"): the next prompt keeps the sampled ones, a re-rendered history would not."""
    encode = renderer.tokenizer.encode
    split = [*encode("He", add_special_tokens=False), *encode("llo", add_special_tokens=False)]
    assert encode("Hello", add_special_tokens=False) != split

    async def sampled(prompt, stop):
        return Turn(prompt, [*split, renderer.end_of_turn_token], [-1.0] * 3, "stop")

    client = ChatClient(renderer, sampled)
    messages = [{"role": "user", "content": "Say hello."}]
    reply = asyncio.run(client.create(messages))
    assert reply.choices[0].message.content == "Hello"
    history = [
        *messages,
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Again."},
    ]
    asyncio.run(client.create(history))
    first, second = client.turns
    assert second.prompt[: len(first.prompt) + 3] == [
        *first.prompt,
        *split,
        renderer.end_of_turn_token,
    ]
    assert renderer.build_prompt(history) != second.prompt  # what re-tokenizing would train on
    (datum,) = episode_datums(client.turns, 1.0)
    assert datum.model_input.to_ints()[len(first.prompt) : len(first.prompt) + 2] == split


def test_a_rewritten_history_starts_a_new_segment(renderer):
    async def fixed(prompt, stop):
        return Turn(prompt, [300, 301, renderer.end_of_turn_token], [-1.0, -1.0, -0.5], "stop")

    client = ChatClient(renderer, fixed)
    first = asyncio.run(client.create([{"role": "user", "content": "hi"}]))
    rewritten = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "x"},
                 {"role": "user", "content": "and?"}]  # fmt: skip
    asyncio.run(client.create(rewritten))
    assert client.turns[1].prompt == renderer.build_prompt(rewritten)
    assert len(episode_datums(client.turns, 1.0)) == 2  # two segments, two datums
    assert first.choices[0].message.content and first.usage.total_tokens > 0
    with pytest.raises(EnvError, match="n=2"):
        asyncio.run(client.create([{"role": "user", "content": "hi"}], n=2))
    with pytest.raises(EnvError, match="messages\\[0\\]"):
        asyncio.run(client.create([{"role": "tool", "content": "hi"}]))


def test_the_env_bridge_hands_each_call_to_the_loop(renderer):
    """AgentEnv as the loop drives it: the agent's calls are observations, the loop's actions
    its replies; the second observation extends the first, the reward comes at the end."""
    end = renderer.end_of_turn_token
    wrong = renderer.tokenizer.encode("2 + 3 = 6", add_special_tokens=False)
    right = renderer.tokenizer.encode("2 + 3 = 5", add_special_tokens=False)

    async def episode():
        env = AgentEnv(renderer, calculator_with_retry, PROBLEM)
        observation, stop = await env.initial_observation()
        assert stop == renderer.stop_condition
        first = await env.step([*wrong, end])
        assert not first.episode_done
        assert first.next_observation[: len(observation) + len(wrong) + 1] == [
            *observation,
            *wrong,
            end,
        ]
        last = await env.step([*right, end])
        return last

    last = asyncio.run(episode())
    assert last.episode_done and last.reward == 0.0  # a retry that succeeds
    assert last.metrics == {"correct": 0.0, "format": 1.0, "retry_correct": 1.0, "turns": 2.0}

    async def broken(client, problem):
        raise RuntimeError("the tool is down")

    async def run_broken():
        env = AgentEnv(renderer, broken, PROBLEM)
        await env.initial_observation()

    with pytest.raises(EnvError, match="the tool is down"):
        asyncio.run(run_broken())


def test_agent_env_trains_in_the_loop(torch_service, tiny_model, tmp_path):
    args = {
        "base_model": tiny_model, "env": "envs.agent_arithmetic:build_datasets",
        "env_args": "level=1,num_test=4", "num_steps": 2, "groups_per_batch": 2,
        "group_size": 4, "max_tokens": 6, "rank": 8, "remove_constant_groups": False,
        "eval_every": 0, "save_every": 0, "sampler.engine": "torch",
        "sampler.sync_mode": "adapter", "trainer.num_threads": 1, "log_dir": str(tmp_path),
    }  # fmt: skip
    run = main([f"{k}={v}" for k, v in args.items()], service=torch_service)
    assert len(run.history) == 2
    for step in run.history:
        # A random model never answers right: every episode takes the retry, two turns each,
        # and trains as one datum (the second observation extends the first).
        assert step["env/turns"] == 2.0
        assert step["optim/num_datums"] == 8
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert "eval/accuracy" in rows[-1]


def test_agent_dataset_batches_like_problem_datasets(renderer):
    train, test = build_datasets(renderer, batch_size=3, group_size=2, num_batches=2, num_test=5)
    assert len(train) == 2 and len(test) == 1
    builders = train.get_batch(0)
    assert len(builders) == 3 and builders[0].logging_tags() == ["agent_arithmetic"]
    envs = asyncio.run(builders[0].make_envs())
    assert len(envs) == 2 and isinstance(envs[0], AgentEnv)
    assert isinstance(train, AgentDataset)
