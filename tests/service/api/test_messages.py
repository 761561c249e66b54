"""Chat-message input: the mapping (service.api.messages) and the routes that take it, checked against the
equivalent task/steps requests numerically."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.api.messages import MessagesError, assistant_action, map_messages
from service.engine.engine import EngineConfig, PRMEngine

SEARCH = {"id": "c1", "type": "function", "function": {"name": "search", "arguments": '{"q": "paris", "k": 3}'}}
WEATHER = {"id": "c2", "type": "function", "function": {"name": "weather", "arguments": '{"city":"Paris"}'}}
CONVERSATION = [
    {"role": "system", "content": "You are a travel agent."},
    {"role": "user", "content": "Plan a day in Paris."},
    {"role": "assistant", "content": "Let me look.", "tool_calls": [SEARCH, WEATHER]},
    {"role": "tool", "tool_call_id": "c1", "content": "Louvre, Orsay, Eiffel Tower"},
    {"role": "tool", "tool_call_id": "c2", "content": "sunny"},
    {"role": "assistant", "content": [{"type": "text", "text": "Louvre in the morning,"},
                                      {"type": "text", "text": "Eiffel Tower at dusk."}]},
]
EQUIVALENT = {
    "task": "You are a travel agent.\n\nPlan a day in Paris.",
    "steps": [
        {"observation": "",
         "action": 'Let me look.\n{"arguments": {"k": 3, "q": "paris"}, "name": "search"}\n'
                   '{"arguments": {"city": "Paris"}, "name": "weather"}'},
        {"observation": "Louvre, Orsay, Eiffel Tower\n\nsunny",
         "action": "Louvre in the morning,\nEiffel Tower at dusk."},
    ],
}


@pytest.fixture(scope="module")
def client(tiny_checkpoint):
    engine = PRMEngine.from_checkpoint(tiny_checkpoint, EngineConfig(device="cpu"))
    with TestClient(create_app(engine)) as c:
        yield c


def as_steps(mapped) -> list[dict]:
    return [{"observation": s.observation, "action": s.action} for s in mapped.steps]


def test_tool_calls_parallel_results_and_system_prompt_map_as_documented():
    mapped = map_messages(CONVERSATION)
    assert mapped.task == EQUIVALENT["task"]
    assert as_steps(mapped) == EQUIVALENT["steps"]
    assert [s.message_index for s in mapped.steps] == [2, 5]
    assert mapped.pending_observation is None  # a trailing assistant message is the scored candidate


def test_tool_call_arguments_are_canonical_whatever_their_spelling():
    spaced = {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": '{ "b": 1,  "a": [2] }'}}]}
    packed = {"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f",
                                                                                  "arguments": {"a": [2], "b": 1}}}]}
    assert assistant_action(spaced) == assistant_action(packed) == '{"arguments": {"a": [2], "b": 1}, "name": "f"}'
    broken = {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{not json"}}]}
    assert json.loads(assistant_action(broken)) == {"name": "f", "arguments": "{not json"}  # kept, not dropped


def test_empty_contents_first_observation_and_pending_observation():
    messages = [{"role": "user", "content": "open the door"}, {"role": "user", "content": "a door ahead"},
                {"role": "assistant", "content": ""}, {"role": "assistant", "content": None},
                {"role": "tool", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]
    mapped = map_messages(messages)
    assert mapped.task == "open the door"
    assert as_steps(mapped) == [{"observation": "a door ahead", "action": ""}, {"observation": "", "action": ""}]
    assert mapped.pending_observation == "[image_url]"  # a part without text is named, not lost
    no_action = map_messages(messages[:2])
    assert no_action.steps == () and no_action.first_observation == "a door ahead"


@pytest.mark.parametrize("messages, fragment", [
    ([{"role": "assistant", "content": "hi"}], "needs a user message"),
    ([{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}, {"role": "user", "content": "u"}],
     "messages[1]: an assistant message comes before"),
    ([{"role": "tool", "content": "t"}, {"role": "user", "content": "u"}], "messages[0]: only system messages"),
    ([{"role": "user", "content": "u"}, {"role": "robot", "content": "r"}], "messages[1]: role 'robot'"),
])
def test_messages_without_a_trajectory_reading_are_refused_with_the_message_named(messages, fragment):
    with pytest.raises(MessagesError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        map_messages(messages)


def test_score_with_messages_equals_the_equivalent_trajectory(client):
    r = client.post("/v1/score", json={"trajectories": [{"messages": CONVERSATION}, EQUIVALENT]})
    assert r.status_code == 200, r.text
    by_messages, by_steps = r.json()["results"]
    assert [s["message_index"] for s in by_messages["steps"]] == [2, 5]
    assert all("message_index" not in s for s in by_steps["steps"])  # the trajectory form keeps its shape
    assert by_messages["score"] == pytest.approx(by_steps["score"], abs=1e-6)
    assert by_messages["initial_value"] == pytest.approx(by_steps["initial_value"], abs=1e-6)
    for a, b in zip(by_messages["steps"], by_steps["steps"], strict=True):
        assert a["promise"] == pytest.approx(b["promise"], abs=1e-6)
        assert a["progress"] == pytest.approx(b["progress"], abs=1e-6)


def test_rerank_with_message_candidates_equals_rerank_with_steps(client):
    shared, first = CONVERSATION[:2], CONVERSATION[2:]
    second = [{"role": "assistant", "content": "Stay at the hotel."}]
    by_messages = client.post("/v1/rerank", json={"messages": shared, "candidates": [{"messages": first},
                                                                                     {"messages": second}]})
    assert by_messages.status_code == 200, by_messages.text
    by_steps = client.post("/v1/rerank", json={"task": EQUIVALENT["task"], "candidates": [
        {"steps": EQUIVALENT["steps"]}, {"steps": [{"observation": "", "action": "Stay at the hotel."}]}]}).json()
    results = {r["index"]: r for r in by_messages.json()["results"]}
    assert [s["message_index"] for s in results[0]["steps"]] == [2, 5]  # positions in shared + candidate
    assert [s["message_index"] for s in results[1]["steps"]] == [2]
    for ref in by_steps["results"]:
        assert results[ref["index"]]["score"] == pytest.approx(ref["score"], abs=1e-6)


def test_beam_expand_with_messages_and_assistant_candidates_equals_the_trajectory_form(client):
    history = CONVERSATION[:5]  # ends with the tool results the candidates respond to
    candidates = [{"role": "assistant", "content": "Louvre in the morning,\nEiffel Tower at dusk."},
                  {"role": "assistant", "content": None, "tool_calls": [SEARCH]}]
    by_messages = client.post("/v1/beam-expand", json={"beam_width": 2, "beams": [
        {"messages": history, "candidates": candidates}]})
    assert by_messages.status_code == 200, by_messages.text
    by_steps = client.post("/v1/beam-expand", json={"beam_width": 2, "beams": [{
        "trajectory": {"task": EQUIVALENT["task"], "steps": EQUIVALENT["steps"][:1]},
        "observation": EQUIVALENT["steps"][1]["observation"],
        "candidates": [EQUIVALENT["steps"][1]["action"], '{"arguments": {"k": 3, "q": "paris"}, "name": "search"}']
    }]}).json()
    got = by_messages.json()["candidates"][0]
    assert [c["message_index"] for c in got] == [5, 5]  # where the candidate would sit when appended
    for a, b in zip(got, by_steps["candidates"][0], strict=True):
        assert a["promise"] == pytest.approx(b["promise"], abs=1e-6)
    # The candidate scored in context equals the same conversation scored whole.
    whole = client.post("/v1/score", json={"trajectories": [{"messages": CONVERSATION}]}).json()
    assert got[0]["promise"] == pytest.approx(whole["results"][0]["steps"][-1]["promise"], abs=1e-6)


@pytest.mark.parametrize("path, body, fragment", [
    ("/v1/score", {"trajectories": [{"task": "t", "steps": [{"observation": "o", "action": "a"}]},
                                    {"task": "t", "messages": CONVERSATION}]}, "trajectories.1"),
    ("/v1/score", {"trajectories": [{"steps": []}]}, "give task (with steps) or messages"),
    ("/v1/score", {"trajectories": [{"messages": CONVERSATION[:2]}]}, "has no steps"),
    ("/v1/score", {"trajectories": [{"messages": [{"role": "assistant", "content": "a"}]}]}, "needs a user message"),
    ("/v1/rerank", {"task": "t", "messages": CONVERSATION[:2], "candidates": [{"messages": CONVERSATION[2:]}]},
     "either task"),
    ("/v1/rerank", {"messages": CONVERSATION[:2], "candidates": [{"steps": [{"observation": "o", "action": "a"}]}]},
     "candidates.0"),
    ("/v1/rerank", {"task": "t", "candidates": [{"steps": [{"observation": "o", "action": "a"}],
                                                 "messages": CONVERSATION}]}, "candidates.0"),
    ("/v1/beam-expand", {"beam_width": 1, "beams": [{"messages": CONVERSATION, "candidates": ["a"]}]},
     "end with an assistant message"),
    ("/v1/beam-expand", {"beam_width": 1, "beams": [{"messages": CONVERSATION[:2], "observation": "o",
                                                     "candidates": ["a"]}]}, "not both"),
    ("/v1/beam-expand", {"beam_width": 1, "beams": [{"messages": CONVERSATION[:2],
                                                     "candidates": [{"role": "user", "content": "a"}]}]},
     "candidates.0"),
])
def test_ambiguous_or_unreadable_items_get_422_naming_the_item(client, path, body, fragment):
    r = client.post(path, json=body)
    assert r.status_code == 422, r.text
    assert fragment in r.json()["error"]["message"]
