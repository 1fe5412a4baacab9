"""What the OpenAI and Anthropic doors (rl/server/openai_compat.py, anthropic_compat.py) share:
a conversation rendered by the model's own chat template, a sampled sequence turned into the
text a chat API shows, tool calls parsed out of that text, and server-sent events.

Pure functions of a tokenizer and records; no server state.

- Text is decoded without special tokens (an EOS does not show), and cut before the first stop
  string in it: the sampler keeps the token that completes a stop, a chat API does not show
  the stop. Usage and logprobs still count every sampled token.
- Tool calls are parsed in one format only: JSON objects `{"name": ..., "arguments": {...}}`
  in `<tool_call>...</tool_call>` tags (the Hermes/Qwen templates' format). A completion with
  a block that does not parse is shown as text, with no tool calls.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from rl.errors import InvalidRequestError
from rl.types import SampledSequence, SamplingParams

# Tokens decoded again before the newest, so a multi-byte character split over tokens shows
# whole (vLLM's incremental detokenizer keeps as many).
_WINDOW = 5
_TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # a JSON object, as text


@dataclass(frozen=True)
class Finished:
    """One sampled sequence as a chat API shows it."""

    tokens: list[int]  # every sampled token: what usage and logprobs count
    pieces: list[str]  # per token, the text it adds to `text` ("" past a stop string)
    text: str  # no special tokens, cut before the first stop string
    reason: Literal["stop", "length"]
    stop_sequence: str | None  # the stop string that ended it, if one did
    logprobs: list[float] | None
    top_logprobs: list[list[tuple[int, float]] | None] | None  # per token, best first


def new_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:24]}"


def sampling_params(
    max_tokens: int | None,
    temperature: float | None,
    top_p: float | None,
    top_k: int | None,
    stop: str | list[str] | None,
    seed: int | None,
) -> SamplingParams:
    """The sampler's parameters; None takes the API's default (temperature 1, no top-p/k)."""
    stops = stop_strings(stop)
    return SamplingParams(
        max_tokens=max_tokens,
        seed=seed,
        stop=stops or None,  # None keeps EOS stopping ([] would turn it off)
        temperature=1.0 if temperature is None else temperature,
        top_p=1.0 if top_p is None else top_p,
        top_k=-1 if top_k is None else top_k,
    )


def stop_strings(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(stop)


def supports_tools(tokenizer: Any) -> bool:
    """Whether the tokenizer's chat template renders a `tools` list at all."""
    template = tokenizer.chat_template
    if isinstance(template, dict):
        return "tool_use" in template or any("tools" in t for t in template.values())
    return isinstance(template, str) and "tools" in template


def render_chat(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None = None,
    *,
    continue_final: bool = False,
) -> list[int]:
    """The prompt tokens of `messages` in the model's chat template, ready for the assistant's
    turn (or, with `continue_final`, continuing the last assistant message)."""
    if not tokenizer.chat_template:
        raise InvalidRequestError(
            "this model's tokenizer has no chat template; use the completions endpoint"
        )
    if tools and not supports_tools(tokenizer):
        raise InvalidRequestError(
            "this model's chat template does not render tools; send the request without them"
        )
    try:
        text = tokenizer.apply_chat_template(
            messages,
            tools=tools or None,
            tokenize=False,
            add_generation_prompt=not continue_final,
            continue_final_message=continue_final,
        )
    except Exception as error:  # the template's own checks (roles, alternation, ...)
        raise InvalidRequestError(f"the chat template refused the messages: {error}") from None
    return list(tokenizer.encode(text, add_special_tokens=False))


def finish(tokenizer: Any, sequence: SampledSequence, stops: list[str]) -> Finished:
    """`sequence` as text, cut before the first stop string it contains."""
    tokens = list(sequence.tokens)
    pieces = token_pieces(tokenizer, tokens)
    full = "".join(pieces)
    found = [(full.find(s), s) for s in stops if s in full]
    cut, stop_sequence = min(found) if found else (len(full), None)
    kept: list[str] = []
    at = 0
    for piece in pieces:
        kept.append(piece[: max(0, cut - at)])
        at += len(piece)
    reason: Literal["stop", "length"] = "stop" if stop_sequence else sequence.stop_reason
    return Finished(
        tokens=tokens,
        pieces=kept,
        text=full[:cut],
        reason=reason,
        stop_sequence=stop_sequence,
        logprobs=list(sequence.logprobs) if sequence.logprobs is not None else None,
        top_logprobs=getattr(sequence, "topk_logprobs", None),
    )


def token_pieces(tokenizer: Any, tokens: list[int]) -> list[str]:
    """Per token, the text it adds; joined, they are the decoded text (special tokens
    skipped). A token that ends inside a character adds "" and the next one the character."""
    pieces: list[str] = []
    prefix, read = 0, 0  # decode tokens[prefix:] and keep what tokens[read:] add
    for i in range(len(tokens)):
        before = _decode(tokenizer, tokens[prefix:read])
        after = _decode(tokenizer, tokens[prefix : i + 1])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            pieces.append(after[len(before) :])
            prefix, read = max(0, i + 1 - _WINDOW), i + 1
        else:
            pieces.append("")
    full = _decode(tokenizer, tokens)
    if "".join(pieces) != full:  # a tokenizer whose text is not local to a window
        return _pieces_by_prefix(tokenizer, tokens, full)
    return pieces


def _pieces_by_prefix(tokenizer: Any, tokens: list[int], full: str) -> list[str]:
    """The same by decoding every prefix: quadratic, and exact."""
    pieces, shown = [], ""
    for i in range(len(tokens)):
        text = full if i == len(tokens) - 1 else _decode(tokenizer, tokens[: i + 1])
        if text.startswith(shown) and not (text.endswith("\ufffd") and i < len(tokens) - 1):
            pieces.append(text[len(shown) :])
            shown = text
        else:
            pieces.append("")
    if shown != full:  # the prefixes never lined up: all of it at the end
        pieces = [""] * (len(tokens) - 1) + [full]
    return pieces


def _decode(tokenizer: Any, tokens: list[int]) -> str:
    return str(tokenizer.decode(tokens, skip_special_tokens=True)) if tokens else ""


def token_text(tokenizer: Any, token: int, as_id: bool = False) -> str:
    """How a logprob entry names a token: its text (special tokens shown), or `token_id:N`."""
    return f"token_id:{token}" if as_id else str(tokenizer.decode([token]))


def parse_tool_calls(text: str, id_prefix: str = "call_") -> tuple[str, list[ToolCall]]:
    """(the text outside the tool-call blocks, the calls); (text, []) when a block does not
    parse as a call."""
    calls = []
    for match in _TOOL_CALL.finditer(text):
        try:
            call = json.loads(match.group(1))
        except ValueError:
            return text, []
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            return text, []
        arguments = call.get("arguments", call.get("parameters", {}))
        if not isinstance(arguments, str):
            arguments = json.dumps(arguments)
        calls.append(ToolCall(new_id(id_prefix), call["name"], arguments))
    if not calls:
        return text, []
    return _TOOL_CALL.sub("", text).strip(), calls


def template_tool_call(name: str, arguments: Any, call_id: str | None) -> dict[str, Any]:
    """A tool call in an assistant message as chat templates read it: arguments as a dict
    where they are a JSON object (templates render them with `tojson`)."""
    if isinstance(arguments, str):
        try:
            parsed = json.loads(arguments)
        except ValueError:
            parsed = None
        arguments = parsed if isinstance(parsed, dict) else arguments
    call: dict[str, Any] = {"type": "function", "function": {"name": name, "arguments": arguments}}
    if call_id:
        call["id"] = call_id
    return call


def sse(data: dict[str, Any] | str, event: str | None = None) -> bytes:
    """One server-sent event: `data: ...` (and `event: ...`), then a blank line."""
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {payload}\n\n".encode()


__all__ = [
    "Finished",
    "ToolCall",
    "finish",
    "new_id",
    "parse_tool_calls",
    "render_chat",
    "sampling_params",
    "sse",
    "stop_strings",
    "supports_tools",
    "template_tool_call",
    "token_pieces",
    "token_text",
]
