"""Responses items and AgentGym conversations <-> chat messages: round trips, and what the server makes of them."""

from __future__ import annotations

import pytest

from clients.formats import (agentgym_to_messages, messages_to_agentgym, messages_to_responses_items,
                             responses_items_to_messages)
from service.api.messages import map_messages

RESPONSES_ITEMS = [
    {"type": "message", "role": "developer", "content": "You book trips."},
    {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Paris, "},
                                                    {"type": "input_text", "text": "one day"}]},
    {"type": "reasoning", "id": "rs_1", "summary": []},
    {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Searching."}]},
    {"type": "function_call", "call_id": "c1", "name": "search", "arguments": '{"q": "paris"}'},
    {"type": "function_call", "call_id": "c2", "name": "weather", "arguments": '{"city": "Paris"}'},
    {"type": "function_call_output", "call_id": "c1", "output": "Louvre"},
    {"type": "function_call_output", "call_id": "c2", "output": "sunny"},
    {"type": "function_call", "call_id": "c3", "name": "book", "arguments": '{"what": "Louvre"}'},
]


def test_responses_items_become_messages_with_tool_calls_merged():
    messages = responses_items_to_messages(RESPONSES_ITEMS)
    assert [m["role"] for m in messages] == ["developer", "user", "assistant", "tool", "tool", "assistant"]
    assert messages[1]["content"] == "Paris, one day"
    assert [c["function"]["name"] for c in messages[2]["tool_calls"]] == ["search", "weather"]
    assert messages[5] == {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c3", "type": "function", "function": {"name": "book", "arguments": '{"what": "Louvre"}'}}]}
    mapped = map_messages(messages)  # the server reads them as a trajectory
    assert mapped.task == "You book trips.\n\nParis, one day"
    assert [s.message_index for s in mapped.steps] == [2, 5]
    assert mapped.steps[1].observation == "Louvre\n\nsunny"


def test_responses_round_trip():
    messages = responses_items_to_messages(RESPONSES_ITEMS)
    assert responses_items_to_messages(messages_to_responses_items(messages)) == messages
    plain = [i for i in RESPONSES_ITEMS if i["type"] != "reasoning"]
    items = messages_to_responses_items(messages)
    assert [i["type"] for i in items] == [i["type"] for i in plain]
    assert [i.get("call_id") for i in items] == [i.get("call_id") for i in plain]


def test_agentgym_round_trip():
    conversation = [{"from": "human", "value": "You are in a house. Your task: find the key."},
                    {"from": "gpt", "value": "Thought: look around.\nAction: look"},
                    {"from": "human", "value": "You see a table."},
                    {"from": "gpt", "value": "Action: search table"}]
    messages = agentgym_to_messages(conversation)
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    assert messages_to_agentgym(messages) == conversation
    assert agentgym_to_messages(messages_to_agentgym(messages)) == messages
    assert [s.action for s in map_messages(messages).steps] == ["Thought: look around.\nAction: look",
                                                                "Action: search table"]


@pytest.mark.parametrize("call, fragment", [
    (lambda: responses_items_to_messages([{"type": "web_search_call"}]), "items[0]: item type"),
    (lambda: responses_items_to_messages([{"type": "message", "role": "tool", "content": "x"}]), "items[0]"),
    (lambda: agentgym_to_messages([{"from": "robot", "value": "x"}]), "conversation[0]"),
    (lambda: messages_to_agentgym([{"role": "assistant", "content": None, "tool_calls": [{}]}]), "messages[0]"),
])
def test_unconvertible_input_is_refused_with_its_position(call, fragment):
    with pytest.raises(ValueError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        call()
