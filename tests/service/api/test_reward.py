"""/v1/reward, OpenRLHF's remote reward-model format: the step parsers, the route against request fixtures
taken from OpenRLHF's source (tests/fixtures/openrlhf, versions named in each file), empty lists, and
1,000 one-sample calls at concurrency 64 against a live server with none lost."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from fastapi.testclient import TestClient

from service.api.app import ApiConfig, create_app
from service.api.text_steps import (TextStepsError, aggregate_reward, decode_escapes, parse_chat, parse_delimited,
                                    parse_markers)
from service.engine.engine import EngineConfig, PRMEngine
from tests.conftest import REPO

FIXTURES = REPO / "tests" / "fixtures" / "openrlhf"


def fixture(name: str) -> dict:
    return json.loads((FIXTURES / name).read_text())


@pytest.fixture(scope="module")
def client(tiny_checkpoint):
    engine = PRMEngine.from_checkpoint(tiny_checkpoint, EngineConfig(device="cpu"))
    with TestClient(create_app(engine)) as c:
        yield c


def score_steps(client, task: str, steps: list[tuple[str, str]]) -> dict:
    body = {"trajectories": [{"task": task, "steps": [{"observation": o, "action": a} for o, a in steps]}]}
    return client.post("/v1/score", json=body).json()["results"][0]


def test_marker_text_parses_into_task_observations_and_actions():
    parsed = parse_markers("<|task|>go<|obs|>wall<|state|><|act|>turn left<|end|><|obs|>ball<|act|>forward")
    assert parsed.task == "go"
    assert parsed.steps == (("wall", "turn left"), ("ball", "forward"))  # an unclosed last action still counts
    with pytest.raises(TextStepsError, match="no <\\|task\\|> marker"):
        parse_markers("plain text")


def test_delimited_text_splits_the_response_and_keeps_the_prompt_as_task():
    parsed = parse_delimited("Q?\n\nstep one\n\n\n\nstep two  ", "Q?", "\n\n")
    assert parsed.task == "Q?" and parsed.steps == (("", "step one"), ("", "step two"))
    with pytest.raises(TextStepsError, match="not the start of the query"):
        parse_delimited("other text", "Q?", "\n\n")
    assert decode_escapes(r"\n\n") == "\n\n" and decode_escapes(r"a\\n|\t") == "a\\n|\t"


def test_the_default_delimiter_is_a_blank_line_and_a_url_may_spell_it_escaped(client):
    body = {"query": ["Q?\n\nfirst\n\nsecond"], "prompts": ["Q?"]}
    default = client.post("/v1/reward?step_format=delimiter", json=body).json()
    escaped = client.post("/v1/reward", params={"step_format": "delimiter", "delimiter": r"\n\n"}, json=body).json()
    assert default["extra_logs"]["prm_num_steps"] == escaped["extra_logs"]["prm_num_steps"] == [2]
    assert default["rewards"] == escaped["rewards"]


def test_chat_transcripts_parse_like_the_equivalent_messages():
    chatml = fixture("openrlhf-0.11.2-chatml.json")
    parsed = parse_chat(chatml["request"]["query"][0], "chatml")
    assert parsed.task == "You are an agent in a grid world.\n\ngo to the red ball"
    assert parsed.steps == (("You see a wall 2 steps ahead.", "turn left"),
                            ("You see a red ball 1 step ahead.", "move forward"))
    llama = ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\ngo<|eot_id|><|start_header_id|>assistant"
             "<|end_header_id|>\n\nleft<|eot_id|><|start_header_id|>ipython<|end_header_id|>\n\nok<|eot_id|>"
             "<|start_header_id|>assistant<|end_header_id|>\n\nright")
    assert parse_chat(llama, "llama3").steps == (("", "left"), ("ok", "right"))


def test_aggregates():
    assert aggregate_reward([0.5, 0.2, 0.7], [0.1, -0.3, 0.5], "last") == 0.7
    assert aggregate_reward([0.5, 0.2, 0.7], [0.1, -0.3, 0.5], "min") == 0.2
    assert aggregate_reward([0.5, 0.2, 0.7], [0.1, -0.3, 0.5], "sum_progress") == pytest.approx(0.3)
    assert aggregate_reward([], [], "last") == 0.0


def test_openrlhf_one_sample_fixture_gets_the_prm_score_in_openrlhf_shape(client):
    request = fixture("openrlhf-0.11.2-one-sample.json")["request"]
    r = client.post("/v1/reward", json=request)
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"rewards", "scores", "extra_logs"}
    reference = score_steps(client, "go to the red ball", [("You see a wall 2 steps ahead.", "turn left"),
                                                           ("You see a red ball 1 step ahead.", "move forward")])
    assert body["rewards"][0] == pytest.approx(reference["score"], abs=1e-6) and body["scores"] == body["rewards"]
    logs = body["extra_logs"]
    assert logs["prm_num_steps"] == [2]
    assert logs["prm_step_promise"][0] == pytest.approx([s["promise"] for s in reference["steps"]], abs=1e-6)
    # OpenRLHF turns the reward and every extra_logs value into torch.tensor([value]): all must be numeric.
    torch = pytest.importorskip("torch")
    torch.tensor([body["rewards"]])
    for value in logs.values():
        torch.tensor([value])


@pytest.mark.parametrize("aggregate", ["last", "min", "sum_progress"])
def test_chatml_fixture_and_aggregates_match_the_messages_route(client, aggregate):
    data = fixture("openrlhf-0.11.2-chatml.json")
    r = client.post(f"/v1/reward?step_format=chatml&aggregate={aggregate}", json=data["request"])
    assert r.status_code == 200, r.text
    steps = client.post("/v1/score", json={"trajectories": [{"messages": data["equivalent_messages"]}]}).json()
    promises = [s["promise"] for s in steps["results"][0]["steps"]]
    progress = [s["progress"] for s in steps["results"][0]["steps"]]
    expected = {"last": promises[-1], "min": min(promises), "sum_progress": sum(progress)}[aggregate]
    assert r.json()["rewards"][0] == pytest.approx(expected, abs=1e-6)


def test_empty_lists_get_empty_lists(client):
    data = fixture("openrlhf-0.8.11-empty-shard.json")
    r = client.post("/v1/reward", json=data["request"])
    assert r.status_code == 200 and r.json() == data["expected_response"]
    assert client.post("/v1/reward", json={"query": []}).json()["rewards"] == []  # prompts and labels optional


def test_server_defaults_come_from_settings_and_a_text_without_steps_scores_zero(tiny_checkpoint):
    engine = PRMEngine.from_checkpoint(tiny_checkpoint, EngineConfig(device="cpu"))
    config = ApiConfig(reward_step_format="delimiter", reward_step_delimiter="||", reward_aggregate="min")
    with TestClient(create_app(engine, config=config)) as c:
        r = c.post("/v1/reward", json={"query": ["Q: a||b", "Q: "], "prompts": ["Q: ", "Q: "]}).json()
        reference = score_steps(c, "Q: ", [("", "a"), ("", "b")])
    assert r["rewards"][0] == pytest.approx(min(s["promise"] for s in reference["steps"]), abs=1e-6)
    assert r["rewards"][1] == 0.0 and r["extra_logs"]["prm_num_steps"] == [2, 0]


@pytest.mark.parametrize("url, body, fragment", [
    ("/v1/reward", {"query": ["no markers here"]}, "query.0: no <|task|> marker"),
    ("/v1/reward", {"query": ["a", "b"], "prompts": ["a"]}, "prompts has 1 items"),
    ("/v1/reward?step_format=delimiter", {"query": ["x"], "prompts": ["y"]}, "query.0: the prompt is not"),
    ("/v1/reward?step_format=xml", {"query": []}, "step_format"),
    ("/v1/reward?aggregate=mean", {"query": []}, "aggregate"),
    ("/v1/reward", {"query": "not a list"}, "query"),
])
def test_bad_reward_requests_get_422_naming_the_problem(client, url, body, fragment):
    r = client.post(url, json=body)
    assert r.status_code == 422, r.text
    assert fragment in r.json()["error"]["message"]


def test_thousand_one_sample_calls_at_concurrency_64_lose_none(live_server):
    """OpenRLHF's rollout sends one sample per call, many at once: every call must come back with its own reward."""
    texts = [f"<|task|>go to the red ball<|obs|>You see a wall {i % 7} steps ahead.<|act|>turn left<|end|>"
             f"<|obs|>ball {i % 5}<|act|>move forward<|end|>" for i in range(1000)]

    async def run():
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
        async with httpx.AsyncClient(base_url=live_server, timeout=60, limits=limits, trust_env=False) as http:
            gate = asyncio.Semaphore(64)

            async def one(text):
                async with gate:
                    r = await http.post("/v1/reward", json={"query": [text], "prompts": [""], "labels": [None]})
                    r.raise_for_status()
                    return r.json()["rewards"]

            return await asyncio.gather(*(one(t) for t in texts))

    answers = asyncio.run(run())
    assert all(len(a) == 1 for a in answers)
    # Each answer is its own text's reward: texts that repeat (i mod 35) get the same reward back.
    by_text: dict[str, float] = {}
    for text, (reward,) in zip(texts, answers):
        assert by_text.setdefault(text, reward) == pytest.approx(reward, abs=1e-6)
    assert len(set(round(v, 6) for v in by_text.values())) > 1
