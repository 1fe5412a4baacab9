"""Anthropic's Messages API, as a request record and answer builders.

Pure: a request becomes chat-template messages and `SamplingParams`; a sampled sequence
(rl/server/chat.py `Finished`) becomes a `message` object or its event stream (message_start,
content_block_start / _delta / _stop per block, message_delta, message_stop). The routes are
rl/server/routes/anthropic.py.

Where it departs from Anthropic:
- A conversation that ends with an assistant message is continued (Anthropic's prefill) with
  the chat template's `continue_final_message`.
- Text content only: image and document blocks are refused with 400; `thinking` is ignored
  (the model writes no thinking blocks), as are `metadata` and cache controls.
- `tool_choice` may be `auto` or `none`: the sampler cannot force a tool call; a structured
  output format (`output_config.format`) is refused too, and `output_config.effort` ignored.
- `temperature`, `top_p` and `top_k` are read (as Anthropic's API had them; the current
  `anthropic` SDK sends them only as `extra_body`); the default is temperature 1.
- A stream is the finished answer sent as events, a text delta per token: the sampler gives
  no tokens before the sequence is done.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict

from rl.errors import InvalidRequestError
from rl.server.chat import Finished, ToolCall, parse_tool_calls, sampling_params, sse
from rl.server.chat import template_tool_call as _template_call
from rl.server.openai_compat import message_text
from rl.types import SamplingParams


class CountTokensRequest(BaseModel):
    """What `messages/count_tokens` reads; unknown fields are ignored."""

    model_config = ConfigDict(extra="allow")

    model: str
    messages: list[dict[str, Any]]
    system: str | list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | None = None


class MessagesRequest(CountTokensRequest):
    max_tokens: int
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    stop_sequences: list[str] | None = None
    stream: bool | None = False
    output_config: dict[str, Any] | None = None


@dataclass(frozen=True)
class Reply:
    id: str
    model: str
    input_tokens: int


def check(request: CountTokensRequest) -> None:
    """Raises InvalidRequestError for what this server does not do (rather than ignore it)."""
    kind = (request.tool_choice or {}).get("type", "auto")
    if kind not in ("auto", "none"):
        raise InvalidRequestError(
            f"tool_choice {kind!r} is not supported: the sampler cannot force a tool call"
        )
    if isinstance(request, MessagesRequest) and (request.output_config or {}).get("format"):
        raise InvalidRequestError("output_config.format (structured output) is not supported")


def chat_messages(request: CountTokensRequest) -> list[dict[str, Any]]:
    """The system prompt and messages as chat templates read them."""
    out = []
    if request.system:
        out.append({"role": "system", "content": message_text(request.system, "system")})
    for i, message in enumerate(request.messages):
        out.extend(_template_messages(i, message))
    return out


def continues(request: CountTokensRequest) -> bool:
    """Whether the last message is the assistant's, to be continued (a prefill)."""
    return bool(request.messages) and request.messages[-1].get("role") == "assistant"


def _template_messages(i: int, message: dict[str, Any]) -> list[dict[str, Any]]:
    """One Anthropic message as template messages: its tool results first (role `tool`),
    then its text with its tool calls."""
    role, content = message.get("role"), message.get("content")
    if role not in ("user", "assistant"):
        raise InvalidRequestError(f"messages[{i}].role {role!r} must be 'user' or 'assistant'")
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    if not isinstance(content, list):
        raise InvalidRequestError(f"messages[{i}].content must be a string or a list of blocks")
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []
    for j, block in enumerate(content):
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            texts.append(str(block.get("text", "")))
        elif kind == "tool_use" and role == "assistant":
            calls.append(
                _template_call(block.get("name", ""), block.get("input", {}), block.get("id"))
            )
        elif kind == "tool_result" and role == "user":
            text = message_text(block.get("content"), f"messages[{i}].content[{j}].content")
            results.append(
                {"role": "tool", "tool_call_id": block.get("tool_use_id"), "content": text}
            )
        else:
            raise InvalidRequestError(
                f"messages[{i}].content[{j}] is a {kind!r} block; this server takes text, "
                "tool_use (assistant) and tool_result (user) blocks"
            )
    out = list(results)
    if texts or calls or not results:
        out.append(
            {"role": role, "content": "".join(texts), **({"tool_calls": calls} if calls else {})}
        )
    return out


def chat_tools(request: CountTokensRequest) -> list[dict[str, Any]] | None:
    """Anthropic's tools in the function format chat templates take."""
    if not request.tools or (request.tool_choice or {}).get("type") == "none":
        return None
    return [
        {
            "type": "function",
            "function": {
                "name": tool.get("name", ""),
                "description": tool.get("description", ""),
                "parameters": tool.get("input_schema", {}),
            },
        }
        for tool in request.tools
    ]


def params(request: MessagesRequest) -> SamplingParams:
    return sampling_params(
        request.max_tokens,
        request.temperature,
        request.top_p,
        request.top_k,
        request.stop_sequences,
        None,
    )


# -- answers ---------------------------------------------------------------------------------


def _blocks(finished: Finished, tools: bool) -> tuple[str, list[ToolCall]]:
    return parse_tool_calls(finished.text, "toolu_") if tools else (finished.text, [])


def _stop_reason(finished: Finished, calls: list[ToolCall]) -> str:
    if calls:
        return "tool_use"
    if finished.stop_sequence is not None:
        return "stop_sequence"
    return "max_tokens" if finished.reason == "length" else "end_turn"


def _tool_use(call: ToolCall) -> dict[str, Any]:
    try:
        arguments = json.loads(call.arguments)
    except ValueError:
        arguments = None
    value = arguments if isinstance(arguments, dict) else {"arguments": call.arguments}
    return {"type": "tool_use", "id": call.id, "name": call.name, "input": value}


def _message(
    reply: Reply, content: list[dict[str, Any]], stop: str | None, seq: str | None, output: int
) -> dict[str, Any]:
    return {
        "id": reply.id,
        "type": "message",
        "role": "assistant",
        "model": reply.model,
        "content": content,
        "stop_reason": stop,
        "stop_sequence": seq,
        "usage": {"input_tokens": reply.input_tokens, "output_tokens": output},
    }


def message_body(reply: Reply, finished: Finished, tools: bool) -> dict[str, Any]:
    """A `message` object."""
    text, calls = _blocks(finished, tools)
    content = [{"type": "text", "text": text}] if text or not calls else []
    content += [_tool_use(c) for c in calls]
    stop = _stop_reason(finished, calls)
    return _message(reply, content, stop, finished.stop_sequence, len(finished.tokens))


def message_events(reply: Reply, finished: Finished, tools: bool) -> list[bytes]:
    """The message's event stream: a text block (a delta per token, or its text in one when
    there are tool calls), then a block per tool call with its input as one JSON delta."""
    text, calls = _blocks(finished, tools)
    events = [_event({"type": "message_start", "message": _message(reply, [], None, None, 0)})]
    index = 0
    if text or not calls:
        pieces = [text] if calls else finished.pieces
        deltas = [{"type": "text_delta", "text": p} for p in pieces if p]
        events += _block(index, {"type": "text", "text": ""}, deltas)
        index += 1
    for call in calls:
        block = {**_tool_use(call), "input": {}}
        delta = {"type": "input_json_delta", "partial_json": json.dumps(_tool_use(call)["input"])}
        events += _block(index, block, [delta])
        index += 1
    stop = {"stop_reason": _stop_reason(finished, calls), "stop_sequence": finished.stop_sequence}
    usage = {"output_tokens": len(finished.tokens)}
    events.append(_event({"type": "message_delta", "delta": stop, "usage": usage}))
    return [*events, _event({"type": "message_stop"})]


def _block(index: int, start: dict[str, Any], deltas: list[dict[str, Any]]) -> list[bytes]:
    return [
        _event({"type": "content_block_start", "index": index, "content_block": start}),
        *(_event({"type": "content_block_delta", "index": index, "delta": d}) for d in deltas),
        _event({"type": "content_block_stop", "index": index}),
    ]


def _event(data: dict[str, Any]) -> bytes:
    return sse(data, event=data["type"])


def error_body(status: int, message: str) -> dict[str, Any]:
    """Anthropic's error object."""
    kind = {
        400: "invalid_request_error",
        401: "authentication_error",
        404: "not_found_error",
        413: "request_too_large",
        429: "rate_limit_error",
    }.get(status, "api_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


__all__ = [
    "CountTokensRequest",
    "MessagesRequest",
    "Reply",
    "chat_messages",
    "chat_tools",
    "check",
    "continues",
    "error_body",
    "message_body",
    "message_events",
    "params",
]
