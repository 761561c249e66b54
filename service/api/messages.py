"""Chat messages -> trajectory (DESIGN §2, §5): the mapping agent frameworks' OpenAI-style `messages` take.

Pure functions over plain dicts (no FastAPI, no engine): the protocol models call them after validation.

The mapping, in order of the messages:
- **task**: the system (or developer) message(s) before the first user message, then that first user
  message, joined by a blank line;
- **first observation o_0**: the user/tool/system messages after the first user message and before the
  first assistant message, joined by a blank line ("" when there are none);
- **action a_t**: every assistant message, in order: its text, then one line per tool call,
  `{"arguments": ARGS, "name": NAME}`: JSON with sorted keys, ARGS parsed from the call's JSON string (so
  spacing and key order do not change the score; an argument string that is not JSON is kept as a string);
- **observation o_{t+1}**: the user/tool/system messages after assistant message t and before the next
  assistant message, joined in order by a blank line (parallel tool results are joined, not dropped);
- a trailing assistant message is the last step, the candidate being scored; messages after the last
  assistant message are the observation a next action responds to (`pending_observation`).

A message's text is its `content`: a string, null, or a list of parts whose `text` parts are joined by a
newline; a part without text becomes `[TYPE]` (an image becomes `[image_url]`), so nothing is silently lost.
Every step remembers `message_index`, the position of its assistant message in the list.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

SYSTEM_ROLES = frozenset({"system", "developer"})
OBSERVATION_ROLES = frozenset({"user", "tool", "function", "system", "developer"})
ROLES = OBSERVATION_ROLES | {"assistant"}
_JOIN = "\n\n"


class MessagesError(ValueError):
    """A message list that has no trajectory reading; the text says which message and why."""


@dataclass(frozen=True)
class MappedStep:
    observation: str
    action: str
    message_index: int


@dataclass(frozen=True)
class MappedConversation:
    task: str
    steps: tuple[MappedStep, ...]
    first_observation: str
    # The messages after the last assistant message (None when the list ends with an assistant message).
    pending_observation: str | None


def content_text(content) -> str:
    """The text of a message's content: a string, None, or a list of content parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    pieces = []
    for part in content:
        if isinstance(part, str):
            pieces.append(part)
        elif isinstance(part, Mapping):
            text = part.get("text")
            if isinstance(text, str):
                pieces.append(text)
            elif part.get("refusal") is not None:
                pieces.append(str(part["refusal"]))
            else:
                pieces.append(f"[{part.get('type', 'part')}]")
    return "\n".join(pieces)


def canonical_tool_call(call: Mapping) -> str:
    """One tool call as `{"arguments": ..., "name": ...}`, every key sorted."""
    function = call.get("function") if isinstance(call.get("function"), Mapping) else call
    name = function.get("name") or ""
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except (ValueError, RecursionError):
            pass  # not JSON (or nested beyond the parser): kept verbatim, as a JSON string
    return json.dumps({"name": name, "arguments": arguments if arguments is not None else {}},
                      sort_keys=True, ensure_ascii=False, separators=(", ", ": "))


def assistant_action(message: Mapping) -> str:
    """An assistant message as one action: its text, then one canonical line per tool call."""
    lines = [content_text(message.get("content"))] if message.get("content") not in (None, "", []) else []
    lines += [canonical_tool_call(call) for call in message.get("tool_calls") or ()]
    if message.get("function_call"):  # the legacy single-call form
        lines.append(canonical_tool_call(message["function_call"]))
    return "\n".join(lines)


def map_messages(messages: Sequence[Mapping], where: str = "messages") -> MappedConversation:
    """Map OpenAI-style chat messages to a task, steps and the observation still awaiting an action."""
    roles = []
    for i, message in enumerate(messages):
        role = message.get("role")
        if role not in ROLES:
            raise MessagesError(f"{where}[{i}]: role {role!r} is not one of {sorted(ROLES)}")
        roles.append(role)
    if "user" not in roles:
        raise MessagesError(f"{where}: needs a user message (the first one states the task)")
    first_user = roles.index("user")
    if "assistant" in roles[:first_user]:
        raise MessagesError(f"{where}[{roles.index('assistant')}]: an assistant message comes before the first "
                            f"user message (the task)")
    leading = [i for i in range(first_user) if roles[i] not in SYSTEM_ROLES]
    if leading:
        raise MessagesError(f"{where}[{leading[0]}]: only system messages may come before the first user message")
    task = _JOIN.join(content_text(messages[i].get("content")) for i in range(first_user + 1))
    steps: list[MappedStep] = []
    observation: list[str] = []
    first_observation: str | None = None
    for i in range(first_user + 1, len(messages)):
        if roles[i] == "assistant":
            text = _JOIN.join(observation)
            if first_observation is None:
                first_observation = text
            steps.append(MappedStep(text, assistant_action(messages[i]), i))
            observation = []
        else:
            observation.append(content_text(messages[i].get("content")))
    if first_observation is None:  # no assistant message: everything after the task is o_0
        return MappedConversation(task, (), _JOIN.join(observation), None)
    pending = _JOIN.join(observation) if roles[-1] != "assistant" else None
    return MappedConversation(task, tuple(steps), first_observation, pending)


def observation_of(messages: Sequence[Mapping], where: str = "messages") -> str:
    """The joined text of observation messages (a candidate continuation's tool/user results)."""
    for i, message in enumerate(messages):
        if message.get("role") not in OBSERVATION_ROLES:
            raise MessagesError(f"{where}[{i}]: expected a user, tool or system message, got {message.get('role')!r}")
    return _JOIN.join(content_text(m.get("content")) for m in messages)
