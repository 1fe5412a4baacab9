"""Checks shared by the agent tests (tests/test_agent_env.py in-process, test_openai_door.py
through the server): a multi-turn episode, and that its datum trains exactly the sampled
tokens."""

from __future__ import annotations

import itertools

import pytest

from envs.agent import ChatClient, Turn
from envs.problem import Problem
from rl.loop.agents import episode_datums


async def three_turns(client: ChatClient, problem: Problem) -> float:
    """Asks, then asks twice more, passing back the replies as text (as agents do)."""
    messages = [{"role": "user", "content": problem.question}]
    for follow_up in ("Are you sure?", "Once more."):
        reply = await client.chat.completions.create(messages=messages, temperature=1.0)
        messages += [
            {"role": "assistant", "content": reply.choices[0].message.content},
            {"role": "user", "content": follow_up},
        ]
    reply = await client.chat.completions.create(messages=messages)
    return float(reply.usage.completion_tokens > 0)


def check_exact_episode(turns: list[Turn], end_of_turn_token: int) -> None:
    """Each turn's prompt extends the last turn's prompt and sampled tokens, and the episode's
    one datum holds exactly them: weight 1 on every sampled token and nowhere else, with the
    sampler's logprobs."""
    for before, after in itertools.pairwise(turns):
        closed = (
            before.tokens if before.stop_reason == "stop" else [*before.tokens, end_of_turn_token]
        )
        assert after.prompt[: len(before.prompt) + len(closed)] == [*before.prompt, *closed]
    (datum,) = episode_datums(turns, advantage=0.5)
    tokens = [*datum.model_input.to_ints(), datum.loss_fn_inputs["target_tokens"].tolist()[-1]]
    last = turns[-1]
    assert tokens == [*last.prompt, *last.tokens]
    weights = datum.loss_fn_inputs["weights"].tolist()
    logprobs = datum.loss_fn_inputs["logprobs"].tolist()
    trained = [i + 1 for i, w in enumerate(weights) if w == 1.0]  # positions in `tokens`
    sampled, sampled_logprobs = [], []
    for turn in turns:
        start = len(turn.prompt)
        sampled += list(range(start, start + len(turn.tokens)))
        sampled_logprobs += turn.logprobs
    assert trained == sampled  # only the model's own tokens, every one of them
    assert [logprobs[i - 1] for i in trained] == pytest.approx(sampled_logprobs)
