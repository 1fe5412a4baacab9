"""The OpenAI and Anthropic doors of the server (rl/server/routes/openai.py, anthropic.py),
driven by the official `openai` and `anthropic` clients over loopback.

One server for the module, on a thread of this process, with a tiny random model and the
torch sampling engine. Numbers are checked against the in-process client API: the logprobs a
door reports are the sampler's logprobs of the same tokens, the usage counts are the prompt
the chat template makes and the tokens sampled.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import time

import anthropic
import httpx
import openai
import pytest
import tinker
from episode_checks import check_exact_episode, three_turns
from tinker import types as tt
from transformers import AutoTokenizer

from envs.chat import ChatRenderer
from envs.problem import Problem
from rl.client.sampling import SamplingClient
from rl.errors import InvalidRequestError
from rl.loop.agents import server_chat_client
from rl.server import ServerConfig, build_service, start_in_thread
from rl.server.chat import Finished, parse_tool_calls, render_chat
from rl.server.keys import KeyStore
from rl.server.openai_compat import Reply, chat_body
from rl.types import ModelInput, SamplingParams
from samplers.config import SamplerConfig
from trainers.config import TrainerConfig

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")
CHAT = [{"role": "user", "content": "Say something."}]


@pytest.fixture(scope="module")
def door(ray_local, tiny_model, tmp_path_factory):
    config = ServerConfig(
        port=0,
        home=str(tmp_path_factory.mktemp("door")),
        models=tiny_model,
        sampler=SamplerConfig(engine="torch", sync_mode="adapter", num_threads=1),
        trainer=TrainerConfig(dtype="float32", num_threads=1),
        long_poll_s=2.0,
    )
    keys = KeyStore(config.resolved_keys_file())
    env = {"alice": keys.add("alice"), "bob": keys.add("bob")}
    service = build_service(config)
    running = start_in_thread(config, service)
    yield {"url": running.url, "keys": env, "service": service, "state": running.state}
    running.stop()
    service.close()


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return AutoTokenizer.from_pretrained(tiny_model)


def oai(door, who: str = "alice") -> openai.OpenAI:
    key = door["keys"].get(who, who)
    return openai.OpenAI(base_url=door["url"] + "/oai/api/v1", api_key=key, max_retries=0)


def claude(door, who: str = "alice") -> anthropic.Anthropic:
    key = door["keys"].get(who, who)
    return anthropic.Anthropic(base_url=door["url"] + "/anthropic/api", api_key=key, max_retries=0)


def ids(logprobs) -> list[int]:
    """Token ids of logprob entries named `token_id:N`."""
    return [int(entry.token.removeprefix("token_id:")) for entry in logprobs]


def reference(door, model: str) -> SamplingClient:
    return door["service"].create_sampling_client(base_model=model)


def prompt_logprobs(client: SamplingClient, prompt: list[int], completion: list[int]):
    """The sampler's logprobs of `completion` after `prompt`."""
    sequence = ModelInput.from_ints([*prompt, *completion])
    return client.compute_logprobs(sequence).result()[len(prompt) :]


# -- OpenAI: chat completions ----------------------------------------------------------------


def test_chat_usage_and_logprobs_are_the_samplers(door, tiny_model, tokenizer):
    prompt = render_chat(tokenizer, CHAT)
    answer = oai(door).chat.completions.create(
        model=tiny_model,
        messages=CHAT,
        max_tokens=6,
        seed=3,
        logprobs=True,
        extra_body={"return_tokens_as_token_ids": True},
    )
    choice = answer.choices[0]
    assert answer.object == "chat.completion" and answer.model == tiny_model
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    tokens = ids(choice.logprobs.content)
    assert answer.usage.prompt_tokens == len(prompt)
    assert answer.usage.completion_tokens == len(tokens) >= 1
    assert answer.usage.total_tokens == len(prompt) + len(tokens)
    if choice.finish_reason == "length":
        assert len(tokens) == 6
    assert choice.message.content == tokenizer.decode(tokens, skip_special_tokens=True)
    expected = prompt_logprobs(reference(door, tiny_model), prompt, tokens)
    assert [e.logprob for e in choice.logprobs.content] == pytest.approx(expected, abs=1e-3)
    assert all(e.top_logprobs == [] for e in choice.logprobs.content)


def test_chat_n_stream_and_stop(door, tiny_model):
    client = oai(door)
    # Seeded, so the same each time (greedy, the tiny random model repeats one token).
    seeded = {"model": tiny_model, "messages": CHAT, "max_tokens": 8, "seed": 11}
    full = client.chat.completions.create(**seeded).choices[0].message.content
    assert full

    chunks = list(
        client.chat.completions.create(
            **seeded, stream=True, stream_options={"include_usage": True}
        )
    )
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == full
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1

    # A stop string from the middle of the text cuts the answer just before it.
    stop = next(full[i : i + 2] for i in range(1, len(full) - 1) if full[i : i + 2].strip())
    cut = client.chat.completions.create(**seeded, stop=[stop]).choices[0]
    assert cut.message.content == full[: full.index(stop)] and cut.finish_reason == "stop"

    many = client.chat.completions.create(
        model=tiny_model, messages=CHAT, max_tokens=5, n=3, seed=7, logprobs=True
    )
    assert [c.index for c in many.choices] == [0, 1, 2]
    assert many.usage.completion_tokens == sum(len(c.logprobs.content) for c in many.choices)


def test_top_logprobs_are_the_samplers_best(door, tiny_model, tokenizer):
    if "topk_sample_logprobs" not in inspect.signature(SamplingClient.sample).parameters:
        pytest.skip("SamplingClient.sample has no topk_sample_logprobs yet")
    prompt = render_chat(tokenizer, CHAT)
    answer = oai(door).chat.completions.create(
        model=tiny_model,
        messages=CHAT,
        max_tokens=4,
        seed=5,
        logprobs=True,
        top_logprobs=3,
        extra_body={"return_tokens_as_token_ids": True},
    )
    content = answer.choices[0].logprobs.content
    tokens = ids(content)
    sequence = ModelInput.from_ints([*prompt, *tokens])
    scored = (
        reference(door, tiny_model)
        .sample(sequence, 1, None, include_prompt_logprobs=True, topk_prompt_logprobs=3)
        .result()
        .topk_prompt_logprobs
    )
    for i, entry in enumerate(content):
        best = scored[len(prompt) + i]
        assert [int(t.token.removeprefix("token_id:")) for t in entry.top_logprobs] == [
            t for t, _ in best
        ]
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(
            [lp for _, lp in best], abs=1e-3
        )
    legacy = oai(door).completions.create(
        model=tiny_model, prompt=[1, 2, 3], max_tokens=3, logprobs=2, seed=5
    )
    logprobs = legacy.choices[0].logprobs
    assert len(logprobs.top_logprobs) == len(logprobs.tokens) == 3
    for token, logprob, top in zip(
        logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs, strict=True
    ):
        assert 1 <= len(top) <= 2 and max(top.values()) >= logprob
        assert token not in top or top[token] == pytest.approx(logprob, abs=1e-6)


# -- OpenAI: completions and models ----------------------------------------------------------


def test_completions(door, tiny_model, tokenizer):
    client = oai(door)
    text = "The capital of France is"
    answer = client.completions.create(
        model=tiny_model,
        prompt=text,
        max_tokens=5,
        seed=1,
        logprobs=0,
        extra_body={"return_tokens_as_token_ids": True},
    )
    prompt = tokenizer.encode(text)
    choice = answer.choices[0]
    tokens = [int(t.removeprefix("token_id:")) for t in choice.logprobs.tokens]
    assert answer.object == "text_completion" and answer.usage.prompt_tokens == len(prompt)
    assert answer.usage.completion_tokens == len(tokens)
    assert choice.text == tokenizer.decode(tokens, skip_special_tokens=True)
    expected = prompt_logprobs(reference(door, tiny_model), prompt, tokens)
    assert choice.logprobs.token_logprobs == pytest.approx(expected, abs=1e-3)

    # Two token-id prompts, two samples each: choice i * n + j.
    two = client.completions.create(
        model=tiny_model, prompt=[[1, 2, 3], [4, 5]], max_tokens=3, n=2, seed=2
    )
    assert [c.index for c in two.choices] == [0, 1, 2, 3] and two.usage.prompt_tokens == 5

    seeded = {"model": tiny_model, "prompt": text, "max_tokens": 6, "seed": 12}
    full = client.completions.create(**seeded).choices[0].text
    streamed = list(client.completions.create(**seeded, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == full
    assert streamed[-1].choices[0].finish_reason in ("stop", "length")


def test_token_ids_are_what_was_sampled(door, tiny_model, tokenizer):
    """`return_token_ids` (vLLM's extension): the prompt as rendered and every sampled token,
    in the answer and, chunk by chunk, in its stream; `stop_token_ids` ends at a token."""
    client = oai(door)
    seeded = {"model": tiny_model, "messages": CHAT, "max_tokens": 6, "seed": 5}
    ids_on = {"return_token_ids": True, "return_tokens_as_token_ids": True}
    answer = client.chat.completions.create(**seeded, logprobs=True, extra_body=ids_on)
    extra, choice = answer.model_extra or {}, answer.choices[0]
    tokens = (choice.model_extra or {})["token_ids"]
    assert extra["prompt_token_ids"] == render_chat(tokenizer, CHAT)
    assert tokens == ids(choice.logprobs.content) and len(tokens) == answer.usage.completion_tokens
    chunks = list(client.chat.completions.create(**seeded, stream=True, extra_body=ids_on))
    assert (chunks[0].model_extra or {})["prompt_token_ids"] == extra["prompt_token_ids"]
    streamed = [t for c in chunks for ch in c.choices for t in (ch.model_extra or {})["token_ids"]]
    assert streamed == tokens
    plain = client.chat.completions.create(**seeded)
    assert "prompt_token_ids" not in (plain.model_extra or {})

    two = client.completions.create(
        model=tiny_model, prompt=[[1, 2, 3], [4, 5]], max_tokens=3, n=2, seed=2, extra_body=ids_on
    )
    prompts = [(c.model_extra or {})["prompt_token_ids"] for c in two.choices]
    assert prompts == [[1, 2, 3], [1, 2, 3], [4, 5], [4, 5]]
    assert sum(len((c.model_extra or {})["token_ids"]) for c in two.choices) == (
        two.usage.completion_tokens
    )

    # The seeded answer again, stopped at its third token: the same tokens up to that one.
    stop = tokens[2]
    cut = client.chat.completions.create(
        **seeded, extra_body={**ids_on, "stop_token_ids": [stop]}
    ).choices[0]
    assert (cut.model_extra or {})["token_ids"] == tokens[: tokens.index(stop) + 1]
    assert cut.finish_reason == "stop"
    with pytest.raises(openai.BadRequestError, match="stop_token_ids"):
        client.chat.completions.create(**seeded, stop=["x"], extra_body={"stop_token_ids": [3]})


def test_an_agent_through_the_door_trains_on_exactly_the_sampled_tokens(door, tiny_model):
    renderer = ChatRenderer(AutoTokenizer.from_pretrained(tiny_model))
    key = door["keys"]["alice"]
    http = openai.AsyncOpenAI(base_url=door["url"] + "/oai/api/v1", api_key=key, max_retries=0)
    params = SamplingParams(max_tokens=8, temperature=1.0, seed=4)
    client = server_chat_client(http, tiny_model, renderer, params)
    assert asyncio.run(three_turns(client, Problem(question="What is 2 + 3?", answer="5"))) == 1.0
    assert len(client.turns) == 3
    check_exact_episode(client.turns, renderer.end_of_turn_token)
    sampler = reference(door, tiny_model)
    for turn in client.turns:  # the logprobs are the sampler's, for the same tokens
        expected = prompt_logprobs(sampler, turn.prompt, turn.tokens)
        assert turn.logprobs == pytest.approx(expected, abs=1e-3)


def test_models_and_sampler_paths_are_per_tenant(door, tiny_model):
    alice = tinker.ServiceClient(base_url=door["url"], api_key=door["keys"]["alice"])
    training = alice.create_lora_training_client(tiny_model, rank=4, seed=1).result()
    datum = tt.Datum(
        model_input=tt.ModelInput.from_ints([1, 2, 3, 4, 5]),
        loss_fn_inputs={"target_tokens": [2, 3, 4, 5, 6], "weights": [1.0] * 5},
    )
    for _ in range(2):
        training.forward_backward([datum], "cross_entropy")
        training.optim_step(tt.AdamParams(learning_rate=5e-2)).result()
    path = training.save_weights_for_sampler("door").result().path

    assert path in [m.id for m in oai(door).models.list()]
    assert path not in [m.id for m in oai(door, "bob").models.list()]
    assert tiny_model in [m.id for m in oai(door, "bob").models.list()]

    # The checkpoint's logprobs, as Tinker's own sampling client of that path scores them,
    # and not the base model's.
    answer = oai(door).chat.completions.create(
        model=path,
        messages=CHAT,
        max_tokens=5,
        seed=4,
        logprobs=True,
        extra_body={"return_tokens_as_token_ids": True},
    )
    content = answer.choices[0].logprobs.content
    prompt = render_chat(AutoTokenizer.from_pretrained(tiny_model), CHAT)
    sequence = tt.ModelInput.from_ints([*prompt, *ids(content)])
    scored = alice.create_sampling_client(model_path=path).result()
    expected = scored.compute_logprobs(sequence).result()[len(prompt) :]
    assert [e.logprob for e in content] == pytest.approx(expected, abs=1e-3)
    base = prompt_logprobs(reference(door, tiny_model), prompt, ids(content))
    assert max(abs(a - b) for a, b in zip(base, expected, strict=True)) > 1e-3

    with pytest.raises(openai.NotFoundError):
        oai(door, "bob").chat.completions.create(model=path, messages=CHAT, max_tokens=2)
    with pytest.raises(anthropic.NotFoundError):
        claude(door, "bob").messages.create(model=path, messages=CHAT, max_tokens=2)
    with pytest.raises(openai.NotFoundError):
        oai(door).chat.completions.create(model="no-such-model", messages=CHAT, max_tokens=2)
    assert claude(door).messages.create(model=path, messages=CHAT, max_tokens=2).content


def test_a_checkpoint_only_the_door_samples_leaves_the_samplers_when_idle(door, tiny_model):
    alice = tinker.ServiceClient(base_url=door["url"], api_key=door["keys"]["alice"])
    training = alice.create_lora_training_client(tiny_model, rank=4, seed=2).result()
    path = training.save_weights_for_sampler("idle").result().path
    state = door["state"]
    local = str(state.runs.resolve("alice", path).local)

    def loaded() -> bool:
        return any(local in p.path_versions for p in door["service"].pools.started().values())

    def ask() -> list[int]:
        answer = oai(door).chat.completions.create(
            model=path, messages=CHAT, max_tokens=4, seed=9, extra_body={"return_token_ids": True}
        )
        return (answer.choices[0].model_extra or {})["token_ids"]

    first = ask()
    assert loaded()
    idle_s = state.config.door_idle_s
    assert state.door_samplers.release_idle(time.time() + idle_s / 2) == 0 and loaded()
    assert state.door_samplers.release_idle(time.time() + 2 * idle_s) >= 1
    assert not loaded()
    assert ask() == first and loaded()  # loaded again, the same weights

    # A Tinker sampling session of the same checkpoint keeps it when the door lets go.
    alice.create_sampling_client(model_path=path).result()
    assert state.door_samplers.release_idle(time.time() + 2 * idle_s) >= 1
    assert loaded()
    with pytest.raises(InvalidRequestError, match="door_idle_s"):
        ServerConfig(door_idle_s=0)


def test_keys_and_refusals(door, tiny_model):
    with pytest.raises(openai.AuthenticationError):
        oai(door, "tml-wrong").models.list()
    with pytest.raises(anthropic.AuthenticationError):
        claude(door, "tml-wrong").messages.create(model=tiny_model, messages=CHAT, max_tokens=2)
    with httpx.Client(base_url=door["url"], timeout=30) as http:
        assert http.get("/oai/api/v1/models").status_code == 401
        body = {"model": tiny_model, "messages": CHAT, "max_tokens": 2}
        missing = http.post("/oai/api/v1/chat/completions", json=body)
        assert missing.status_code == 401 and missing.json()["error"]["code"] == "invalid_api_key"
        assert http.post("/anthropic/api/v1/messages", json=body).status_code == 401
        # Either header names the tenant, on either door.
        key = door["keys"]["alice"]
        as_x_api_key = http.post(
            "/oai/api/v1/chat/completions", json=body, headers={"x-api-key": key}
        )
        assert as_x_api_key.status_code == 200
        as_bearer = http.post(
            "/anthropic/api/v1/messages", json=body, headers={"authorization": f"Bearer {key}"}
        )
        assert as_bearer.status_code == 200 and as_bearer.json()["type"] == "message"
    client = oai(door)
    with pytest.raises(openai.BadRequestError, match="logit_bias"):
        client.chat.completions.create(
            model=tiny_model, messages=CHAT, max_tokens=2, logit_bias={"5": 1.0}
        )
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    with pytest.raises(openai.BadRequestError, match="does not render tools"):
        client.chat.completions.create(model=tiny_model, messages=CHAT, max_tokens=2, tools=[tool])
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(model=tiny_model, messages=CHAT, max_tokens=10**6)


# -- Anthropic: messages ---------------------------------------------------------------------


def test_anthropic_messages(door, tiny_model, tokenizer):
    client = claude(door)
    system = "You are terse."
    prompt = render_chat(tokenizer, [{"role": "system", "content": system}, *CHAT])
    seeded = {"model": tiny_model, "system": system, "messages": CHAT, "max_tokens": 6}
    # The anthropic SDK has no temperature argument (any more): it goes as an extra field.
    greedy = {**seeded, "extra_body": {"temperature": 0}}
    message = client.messages.create(**greedy)
    assert message.type == "message" and message.role == "assistant"
    assert message.usage.input_tokens == len(prompt) and 1 <= message.usage.output_tokens <= 6
    assert message.stop_reason in ("end_turn", "max_tokens")
    text = message.content[0].text
    assert text

    with client.messages.stream(**greedy) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert "content_block_start" in kinds and "message_delta" in kinds
    assert (
        final.content[0].text == text and final.usage.output_tokens == message.usage.output_tokens
    )

    stop = text[1:3]  # Anthropic has no seed: greedy, and the text may be one token repeated
    cut = client.messages.create(**greedy, stop_sequences=[stop])
    assert cut.stop_reason == "stop_sequence" and cut.stop_sequence == stop
    assert cut.content[0].text == text[: text.index(stop)]

    counted = client.messages.count_tokens(model=tiny_model, system=system, messages=CHAT)
    assert counted.input_tokens == len(prompt)


# -- tool calls (pure: the tiny model writes no tool calls) ----------------------------------


HERMES_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n<tools>{% for t in tools %}{{ t | tojson }}{% endfor %}"
    "</tools><|im_end|>\n{% endif %}{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{{ m.content }}{% for c in m.tool_calls or [] %}<tool_call>{{ c.function | tojson }}"
    "</tool_call>{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_tool_calls_render_and_parse(tokenizer):
    tool = {"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}
    messages = [
        {"role": "user", "content": "1+2?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"type": "function", "function": {"name": "add", "arguments": {"a": 1, "b": 2}}}
            ],
        },
        {"role": "tool", "content": "3"},
    ]
    with_tools = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    with_tools.chat_template = HERMES_TEMPLATE
    rendered = with_tools.decode(render_chat(with_tools, messages, [tool]))
    assert '"name": "add"' in rendered.split("</tools>")[0]
    assert '<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>' in rendered

    text = 'Let me add. <tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'
    content, calls = parse_tool_calls(text)
    assert content == "Let me add." and [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("add", {"a": 1, "b": 2})
    ]
    assert parse_tool_calls("<tool_call>not json</tool_call>") == (
        "<tool_call>not json</tool_call>",
        [],
    )
    finished = Finished([1, 2], ["", text], text, "stop", None, [-0.5, -0.5], None)
    body = chat_body(Reply("x", "m", 0, 3, None), tokenizer, [finished], tools=True)
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["tool_calls"][0]["function"]["name"] == "add"
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
