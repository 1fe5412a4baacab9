"""Chat messages <-> tokens, through the tokenizer's own chat template.

Rendering is incremental: a conversation's tokens are the tokens of the first k messages
followed by the encoded text that message k+1 adds to the template's output. So a generation
prompt is a token-level prefix of the same conversation with the answer appended, and a
multi-turn env can extend its last observation instead of re-tokenizing the whole chat (which
BPE merges across the boundary could change). This needs a template whose output for
messages[:k] is a text prefix of its output for messages[:k+1]; ChatML (SmolLM2, Qwen) and
Llama 3 are; templates that rewrite earlier turns are refused with an error.

The stop condition comes from the template too: the first token of the text it puts after an
assistant message (ChatML: `<|im_end|>`), plus the tokenizer's EOS if that differs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, Protocol, TypedDict

from envs.base import Tokens

TrainOnWhat = Literal["all_assistant_messages", "last_assistant_message"]
_TRAIN_ON = ("all_assistant_messages", "last_assistant_message")


class Message(TypedDict):
    role: str  # "system" | "user" | "assistant"
    content: str


class ChatTokenizer(Protocol):
    """The slice of a Hugging Face tokenizer that rendering uses."""

    @property
    def eos_token_id(self) -> Any: ...

    def apply_chat_template(self, *args: Any, **kwargs: Any) -> Any: ...

    def encode(self, *args: Any, **kwargs: Any) -> Any: ...

    def decode(self, *args: Any, **kwargs: Any) -> Any: ...


class ChatTemplateError(ValueError):
    """The chat template cannot be rendered incrementally, or a message is malformed."""


class ChatRenderer:
    """Renders chats with `tokenizer`'s template; see the module docstring for the scheme."""

    def __init__(self, tokenizer: ChatTokenizer):
        self.tokenizer = tokenizer
        probe: list[Message] = [
            {"role": "user", "content": "ping"},
            {"role": "assistant", "content": "pong"},
        ]
        prompt = self._text(probe[:1], add_generation_prompt=True)
        end_tokens = self._turn_ending(prompt, self._text(probe), "pong", 1)
        eos = tokenizer.eos_token_id
        if end_tokens:
            self.end_of_turn_token: int = end_tokens[0]
        elif eos is not None:
            self.end_of_turn_token = int(eos)
        else:
            raise ChatTemplateError("the template ends assistant turns with nothing and has no EOS")
        stops = [self.end_of_turn_token]
        if eos is not None and int(eos) != self.end_of_turn_token:
            stops.append(int(eos))
        self._stop_tokens = stops

    @property
    def stop_condition(self) -> list[int]:
        """Token ids that end an assistant turn, for `SamplingParams.stop`."""
        return list(self._stop_tokens)

    def build_prompt(self, messages: list[Message]) -> Tokens:
        """Tokens of `messages` followed by the assistant generation prompt."""
        return self._render(messages, add_generation_prompt=True)[0]

    def build_continuation(self, history: list[Message], new_messages: list[Message]) -> Tokens:
        """Tokens that follow the end-of-turn token of `history`'s last (assistant) message:
        the rest of that turn's ending, `new_messages`, then the generation prompt.

        A multi-turn env appends these to observation + action (+ end-of-turn token if the
        action was cut off), so each observation extends the previous one token for token.
        """
        if not history or history[-1]["role"] != "assistant":
            raise ChatTemplateError(
                "build_continuation: history must end with an assistant message"
            )
        tokens, _, ends = self._render([*history, *new_messages], add_generation_prompt=True)
        return tokens[ends[len(history) - 1] :]

    def parse_response(self, tokens: Tokens) -> tuple[Message, bool]:
        """Sampled tokens -> (assistant message, whether the turn ended with a stop token)."""
        stop_at = next((i for i, t in enumerate(tokens) if t in self._stop_tokens), None)
        content = tokens if stop_at is None else tokens[:stop_at]
        text = str(self.tokenizer.decode(list(content), skip_special_tokens=False))
        return {"role": "assistant", "content": text}, stop_at is not None

    def render_supervised(
        self, messages: list[Message], train_on: TrainOnWhat = "all_assistant_messages"
    ) -> tuple[Tokens, list[float]]:
        """(tokens, weights) for SFT: weight 1 on the content and end-of-turn token of the
        trained assistant messages, 0 on everything else (roles, prompts, separators)."""
        if train_on not in _TRAIN_ON:
            raise ChatTemplateError(f"train_on must be one of {_TRAIN_ON}, got {train_on!r}")
        assistant = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
        if not assistant:
            raise ChatTemplateError("render_supervised: the conversation has no assistant message")
        trained = assistant if train_on == "all_assistant_messages" else assistant[-1:]
        tokens, weights, _ = self._render(messages, add_generation_prompt=False, trained=trained)
        return tokens, weights

    # -----------------------------------------------------------------------------------------

    def _render(
        self, messages: list[Message], add_generation_prompt: bool, trained: Sequence[int] = ()
    ) -> tuple[Tokens, list[float], dict[int, int]]:
        """(tokens, weights, ends): weight 1 on the messages at indices `trained`; `ends[k]` =
        position just after assistant message k's end-of-turn token."""
        _check_messages(messages)
        tokens: Tokens = []
        weights: list[float] = []
        ends: dict[int, int] = {}

        def add(new: Tokens, weight: float) -> None:
            tokens.extend(new)
            weights.extend([weight] * len(new))

        prev = ""
        for k, message in enumerate(messages):
            text = self._text(messages[: k + 1])
            if message["role"] == "assistant":
                prompt = self._text(messages[:k], add_generation_prompt=True)
                add(self._encode(_delta(prev, prompt, k)), 0.0)
                weight = 1.0 if k in trained else 0.0
                add(self._encode(message["content"]), weight)
                end = self._turn_ending(prompt, text, message["content"], k)
                # Train on the end-of-turn token (the model must learn to stop), not on what
                # the template puts after it: the sampler never produces that.
                n_stop = 1 if end and end[0] == self.end_of_turn_token else 0
                add(end[:n_stop], weight)
                ends[k] = len(tokens)
                add(end[n_stop:], 0.0)
            else:
                add(self._encode(_delta(prev, text, k)), 0.0)
            prev = text
        if add_generation_prompt:
            add(self._encode(_delta(prev, self._text(messages, True), len(messages))), 0.0)
        return tokens, weights, ends

    def _turn_ending(self, prompt: str, text: str, content: str, k: int) -> Tokens:
        """Tokens of what the template puts after assistant message k's content."""
        turn = _delta(prompt, text, k)
        if not turn.startswith(content):
            raise ChatTemplateError(
                f"message {k}: the chat template alters assistant content, cannot render it "
                "incrementally"
            )
        return self._encode(turn[len(content) :])

    def _text(self, messages: list[Message], add_generation_prompt: bool = False) -> str:
        if not messages and not add_generation_prompt:
            return ""
        text = self.tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
        )
        if not isinstance(text, str):
            raise ChatTemplateError(f"apply_chat_template returned {type(text).__name__}, not str")
        return text

    def _encode(self, text: str) -> Tokens:
        return list(self.tokenizer.encode(text, add_special_tokens=False)) if text else []


def _delta(before: str, after: str, k: int) -> str:
    """The text `after` adds to `before`; the template must only append."""
    if not after.startswith(before):
        raise ChatTemplateError(
            f"message {k}: the chat template's output for the first {k} messages is not a "
            "prefix of its output with one more; it cannot be rendered incrementally"
        )
    return after[len(before) :]


def _check_messages(messages: list[Message]) -> None:
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise ChatTemplateError(f"message {i} must be a dict with str 'content': {message!r}")
        if message.get("role") not in ("system", "user", "assistant"):
            raise ChatTemplateError(f"message {i}: unknown role {message.get('role')!r}")
