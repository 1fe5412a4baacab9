"""Chat rendering on SmolLM2's real tokenizer and template, and the SFT chat data files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from envs.chat import ChatRenderer, ChatTemplateError, Message
from rl.loop.datums import supervised_datum
from rl.models import resolve_model

DATA = Path(__file__).parent.parent / "examples" / "data"


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(resolve_model("SmolLM2-135M-Instruct"))


@pytest.fixture(scope="module")
def renderer(tokenizer) -> ChatRenderer:
    return ChatRenderer(tokenizer)


def _load(name: str) -> list[list[Message]]:
    return [json.loads(line)["messages"] for line in (DATA / name).read_text().splitlines()]


def _hf_tokens(tokenizer, messages, add_generation_prompt=False) -> list[int]:
    return list(
        tokenizer.apply_chat_template(
            messages, tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=False
        )
    )


def test_stop_condition_is_im_end(renderer, tokenizer):
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert renderer.stop_condition == [im_end]
    assert renderer.end_of_turn_token == im_end


def test_prompt_matches_hf_template(renderer, tokenizer):
    messages: list[Message] = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2 + 2?"},
    ]
    prompt = renderer.build_prompt(messages)
    assert prompt == _hf_tokens(tokenizer, messages, add_generation_prompt=True)
    assert tokenizer.decode(prompt).endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("name", ["chat_sft.jsonl", "chat_sft_eval.jsonl"])
def test_prefix_property_on_dataset(renderer, tokenizer, name):
    """Each assistant turn's prompt is a token prefix of the rendered conversation, and the
    incremental rendering equals tokenizing the whole template output at once."""
    for messages in _load(name):
        tokens, weights = renderer.render_supervised(messages)
        assert tokens == _hf_tokens(tokenizer, messages)
        assert len(weights) == len(tokens)
        for k, message in enumerate(messages):
            if message["role"] == "assistant":
                prompt = renderer.build_prompt(messages[:k])
                assert tokens[: len(prompt)] == prompt
                assert weights[len(prompt) - 1] == 0.0 and weights[len(prompt)] == 1.0


def test_prefix_property_with_awkward_content(renderer):
    """Content starting with whitespace or ending in digits must not merge across turns."""
    for content in ["  leading spaces", "\n\nnewlines first", "42", "ends with newline\n", ""]:
        messages: list[Message] = [{"role": "user", "content": "hi"}]
        prompt = renderer.build_prompt(messages)
        full, _ = renderer.render_supervised([*messages, {"role": "assistant", "content": content}])
        assert full[: len(prompt)] == prompt


def test_supervised_weights_cover_assistant_content_and_end_token(renderer, tokenizer):
    messages: list[Message] = [
        {"role": "user", "content": "Name a color."},
        {"role": "assistant", "content": "Red."},
        {"role": "user", "content": "Another?"},
        {"role": "assistant", "content": "Blue."},
    ]
    tokens, weights = renderer.render_supervised(messages)
    trained = [t for t, w in zip(tokens, weights, strict=True) if w == 1.0]
    assert tokenizer.decode(trained) == "Red.<|im_end|>Blue.<|im_end|>"
    assert set(weights) == {0.0, 1.0}

    tokens_last, weights_last = renderer.render_supervised(messages, "last_assistant_message")
    assert tokens_last == tokens
    trained = [t for t, w in zip(tokens, weights_last, strict=True) if w == 1.0]
    assert tokenizer.decode(trained) == "Blue.<|im_end|>"


def test_supervised_datum_shifts_by_one(renderer):
    messages: list[Message] = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
    ]
    tokens, weights = renderer.render_supervised(messages)
    datum = supervised_datum(tokens, weights)
    assert datum.model_input.to_ints() == tokens[:-1]
    assert datum.loss_fn_inputs["target_tokens"].tolist() == tokens[1:]
    assert datum.loss_fn_inputs["weights"].tolist() == weights[1:]


def test_parse_response(renderer, tokenizer):
    tokens = tokenizer.encode("The answer is 4.", add_special_tokens=False)
    message, ended = renderer.parse_response([*tokens, renderer.end_of_turn_token])
    assert message == {"role": "assistant", "content": "The answer is 4."}
    assert ended
    message, ended = renderer.parse_response(tokens[:3])
    assert not ended and message["content"] == tokenizer.decode(tokens[:3])


def test_continuation_extends_observation(renderer, tokenizer):
    history: list[Message] = [
        {"role": "user", "content": "Guess my number."},
        {"role": "assistant", "content": "50"},
    ]
    reply: Message = {"role": "user", "content": "Higher."}
    prompt = renderer.build_prompt(history[:1])
    action = [*tokenizer.encode("50", add_special_tokens=False), renderer.end_of_turn_token]
    observation = prompt + action + renderer.build_continuation(history, [reply])
    assert observation == renderer.build_prompt([*history, reply])
    assert observation == _hf_tokens(tokenizer, [*history, reply], add_generation_prompt=True)


def test_bad_input_is_refused(renderer, tokenizer):
    with pytest.raises(ChatTemplateError, match="no assistant message"):
        renderer.render_supervised([{"role": "user", "content": "hi"}])
    with pytest.raises(ChatTemplateError, match="unknown role"):
        renderer.build_prompt([{"role": "robot", "content": "hi"}])
    with pytest.raises(ChatTemplateError, match="train_on"):
        renderer.render_supervised(
            [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
            "everything",  # type: ignore[arg-type]
        )
    with pytest.raises(ChatTemplateError, match="must end with an assistant"):
        renderer.build_continuation([{"role": "user", "content": "a"}], [])


def test_non_incremental_template_is_refused(tokenizer):
    """A template that rewrites earlier output (here: a message count up front) cannot be
    rendered incrementally; the renderer says so instead of producing wrong tokens."""
    rewriting = AutoTokenizer.from_pretrained(resolve_model("SmolLM2-135M-Instruct"))
    rewriting.chat_template = (
        "{{ messages|length }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    with pytest.raises(ChatTemplateError, match="not a prefix"):
        ChatRenderer(rewriting)


@pytest.mark.parametrize(
    ("name", "low", "high"), [("chat_sft.jsonl", 100, 150), ("chat_sft_eval.jsonl", 15, 30)]
)
def test_sft_data_files(renderer, name, low, high):
    conversations = _load(name)
    assert low <= len(conversations) <= high
    for i, messages in enumerate(conversations):
        roles = [m["role"] for m in messages]
        body = roles[1:] if roles[0] == "system" else roles
        assert body == ["user", "assistant"] * (len(body) // 2), f"{name}:{i} roles {roles}"
        assert all(m["content"].strip() == m["content"] and m["content"] for m in messages)
        tokens, _ = renderer.render_supervised(messages)
        assert len(tokens) <= 384, f"{name}:{i} has {len(tokens)} tokens"
    assert sum(len(m) > 3 for m in conversations) >= 2  # some multi-turn


def test_sft_eval_is_held_out():
    train = {m[-1]["content"] for m in _load("chat_sft.jsonl")}
    train_questions = {
        msg["content"] for m in _load("chat_sft.jsonl") for msg in m if msg["role"] == "user"
    }
    for messages in _load("chat_sft_eval.jsonl"):
        assert messages[-1]["content"] not in train
        assert (
            messages[1 if messages[0]["role"] == "system" else 0]["content"] not in train_questions
        )
