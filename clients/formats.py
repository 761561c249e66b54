"""Trajectory formats of agent frameworks -> OpenAI-style chat messages (what /v1/score, /v1/rerank and
/v1/beam-expand take as `messages`), and back. Pure functions over plain dicts: no dependencies.

- **OpenAI Responses items** (`responses.create(input=...)`, the Agents SDK's `to_input_list()`):
  `{"type": "message", "role", "content"}` (content a string or `input_text` / `output_text` parts),
  `{"type": "function_call", "call_id", "name", "arguments"}` and
  `{"type": "function_call_output", "call_id", "output"}`. Function calls that follow an assistant message
  (or each other) become that assistant message's `tool_calls`; `reasoning` items are dropped (they are the
  model's private notes, not actions).
- **AgentGym conversations**: `[{"from": "human" | "gpt" | "system", "value": str}, ...]` (the `loss` flag
  is a training detail and is not kept).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

_AGENTGYM_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
_AGENTGYM_FROM = {v: k for k, v in _AGENTGYM_ROLES.items()}


def _parts_text(content) -> str | None:
    """A Responses content (string or list of parts) as text; None for null."""
    if content is None or isinstance(content, str):
        return content
    texts = [part.get("text", "") if isinstance(part, Mapping) else str(part) for part in content]
    return "".join(texts)


def responses_items_to_messages(items: Iterable[Mapping]) -> list[dict]:
    """OpenAI Responses input/output items -> chat messages (tool calls merged into assistant messages)."""
    messages: list[dict] = []
    for i, item in enumerate(items):
        kind = item.get("type", "message")  # EasyInputMessage has no type
        if kind == "message":
            role = item.get("role")
            if role not in ("system", "developer", "user", "assistant"):
                raise ValueError(f"items[{i}]: message role {role!r} is not system, developer, user or assistant")
            messages.append({"role": role, "content": _parts_text(item.get("content"))})
        elif kind == "function_call":
            call = {"id": item.get("call_id") or item.get("id") or f"call_{i}", "type": "function",
                    "function": {"name": item["name"], "arguments": item.get("arguments", "{}")}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            messages.append({"role": "tool", "tool_call_id": item.get("call_id"),
                             "content": output if isinstance(output, str) else _parts_text(output)})
        elif kind == "reasoning":
            continue
        else:
            raise ValueError(f"items[{i}]: item type {kind!r} is not message, function_call, function_call_output "
                             f"or reasoning")
    return messages


def messages_to_responses_items(messages: Iterable[Mapping]) -> list[dict]:
    """Chat messages -> Responses items (the inverse of responses_items_to_messages)."""
    items: list[dict] = []
    for i, message in enumerate(messages):
        role = message.get("role")
        if role == "tool":
            items.append({"type": "function_call_output", "call_id": message.get("tool_call_id"),
                          "output": message.get("content") or ""})
            continue
        if role not in ("system", "developer", "user", "assistant"):
            raise ValueError(f"messages[{i}]: role {role!r} has no Responses item")
        if message.get("content") is not None or not message.get("tool_calls"):
            items.append({"type": "message", "role": role, "content": message.get("content")})
        for call in message.get("tool_calls") or ():
            function = call["function"]
            items.append({"type": "function_call", "call_id": call.get("id"), "name": function["name"],
                          "arguments": function.get("arguments", "{}")})
    return items


def agentgym_to_messages(conversation: Iterable[Mapping]) -> list[dict]:
    """AgentGym `{from, value}` turns -> chat messages (human -> user, gpt -> assistant)."""
    messages = []
    for i, turn in enumerate(conversation):
        role = _AGENTGYM_ROLES.get(turn.get("from"))
        if role is None:
            raise ValueError(f"conversation[{i}]: 'from' is {turn.get('from')!r}, not one of "
                             f"{sorted(_AGENTGYM_ROLES)}")
        messages.append({"role": role, "content": turn.get("value", "")})
    return messages


def messages_to_agentgym(messages: Iterable[Mapping]) -> list[dict]:
    """Chat messages -> AgentGym turns. Tool results become human turns (AgentGym has no tool role)."""
    turns = []
    for i, message in enumerate(messages):
        role = message.get("role")
        if role == "tool":
            role = "user"
        if role not in _AGENTGYM_FROM:
            raise ValueError(f"messages[{i}]: role {role!r} has no AgentGym turn")
        if message.get("tool_calls"):
            raise ValueError(f"messages[{i}]: AgentGym turns carry text only; serialise the tool calls first")
        turns.append({"from": _AGENTGYM_FROM[role], "value": message.get("content") or ""})
    return turns
