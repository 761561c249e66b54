"""The SDK against a real `agentprm serve` process on 127.0.0.1 (started by the fixture, stopped after)."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from clients import AsyncPRMClient, PRMClient, PRMError
from clients.sdk import is_loopback
from service.api.protocol import StepIn, TrajectoryIn
from tests.conftest import free_port, trajectory_json


def test_sync_client_scores_reranks_and_expands(live_server):
    with PRMClient(live_server) as client:
        assert client.ready()
        assert client.models().data[0].id == "tiny-prm:1"
        traj = trajectory_json("go to the red ball", 3)
        scored = client.score([traj])
        assert len(scored.results[0].steps) == 3
        # Typed inputs work the same as dicts.
        typed = TrajectoryIn(task=traj["task"], steps=[StepIn(**s) for s in traj["steps"]])
        assert client.score([typed]).results[0].score == pytest.approx(scored.results[0].score, abs=1e-6)
        ranked = client.rerank("go to the red ball", [traj["steps"], traj["steps"][:1]], top_n=2)
        assert {r.index for r in ranked.results} == {0, 1}
        beams = [{"trajectory": traj, "observation": "a ball", "candidates": ["move forward", "turn left"]}]
        expanded = client.beam_expand(beams, beam_width=1)
        assert len(expanded.selected) == 1 and len(expanded.candidates[0]) == 2


def test_errors_carry_the_servers_message_and_code(live_server):
    with PRMClient(live_server) as client:
        with pytest.raises(PRMError) as info:
            client.score([trajectory_json("t", 1)], model="missing-model")
        assert info.value.code == 404 and "missing-model" in info.value.message
        with pytest.raises(PRMError) as info:
            client.score([trajectory_json("t", 80)])  # longer than max_seq_len 512
        assert info.value.code == 422 and "at most 512" in info.value.message


def test_async_client_matches_sync(live_server):
    traj = trajectory_json("pick up the key", 4, seed=5)

    async def go():
        async with AsyncPRMClient(live_server) as client:
            assert await client.ready()
            results = await asyncio.gather(*(client.score([traj]) for _ in range(4)))
            ranked = await client.rerank("pick up the key", [traj["steps"]])
            return results, ranked

    results, ranked = asyncio.run(go())
    with PRMClient(live_server) as client:
        reference = client.score([traj]).results[0]
    for r in results:
        assert r.results[0].score == pytest.approx(reference.score, abs=1e-6)
    assert ranked.results[0].score == pytest.approx(reference.score, abs=1e-6)


def test_concurrent_calls_keep_their_connections_for_the_next_round(live_server):
    """30 calls at once open 30 connections; the next 30 reuse all of them instead of reconnecting (httpx's
    default keep-alive limit of 20 closed the rest as they went idle)."""
    traj = trajectory_json("go to the red ball", 2)

    async def go():
        async with AsyncPRMClient(live_server) as client:
            pool = client._http._transport._pool  # httpcore's connection pool
            rounds = []
            for _ in range(2):
                await asyncio.gather(*(client.score([traj]) for _ in range(30)))
                rounds.append({id(c) for c in pool.connections})
            return rounds

    first, second = asyncio.run(go())
    assert len(first) == 30 and second == first


def test_retries_honour_retry_after_then_succeed():
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        if len(calls) < 3:
            return httpx.Response(429, headers={"Retry-After": "0"},
                                  json={"error": {"message": "queue full", "type": "overloaded", "code": 429}})
        return httpx.Response(200, json={"object": "list", "data": []})

    with PRMClient("http://127.0.0.1:1", transport=httpx.MockTransport(handler), backoff_base_s=0.0) as client:
        assert client.models().data == []
    assert len(calls) == 3
    with PRMClient("http://127.0.0.1:1", transport=httpx.MockTransport(handler), max_retries=0) as client:
        calls.clear()
        with pytest.raises(PRMError) as info:
            client.models()
        assert info.value.code == 429 and info.value.message == "queue full"


def test_connection_refused_is_raised_after_retries():
    with PRMClient(f"http://127.0.0.1:{free_port()}", max_retries=1, backoff_base_s=0.01) as client:
        assert not client.ready()
        with pytest.raises(httpx.ConnectError):
            client.models()


def test_loopback_urls_ignore_proxy_variables(live_server, monkeypatch):
    """A cluster-wide HTTP_PROXY must not capture calls to a co-located server; trust_env=True restores it."""
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    dead_proxy = f"http://127.0.0.1:{free_port()}"
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(name, dead_proxy)
    with PRMClient(live_server) as client:
        assert client.trust_env is False and client.ready()
        assert client.models().data[0].id == "tiny-prm:1"
    with PRMClient(live_server, trust_env=True, max_retries=0) as client:
        assert not client.ready()  # through the dead proxy
    assert is_loopback("http://localhost:8000") and is_loopback("http://[::1]:8000")
    assert is_loopback("http://127.0.0.2:8000") and not is_loopback("http://10.0.0.1:8000")
    with PRMClient("http://prm.internal:8000") as remote:
        assert remote.trust_env is True  # httpx's default for everything else


def test_reward_method_sync_and_async(live_server):
    text = "<|task|>t<|obs|>o<|act|>a<|end|>"
    with PRMClient(live_server) as client:
        sync = client.reward([text, text], ["", ""], aggregate="sum_progress")
        scored = client.score([{"task": "t", "steps": [{"observation": "o", "action": "a"}]}])

    async def go():
        async with AsyncPRMClient(live_server) as client:
            return await client.reward([text])

    assert sync.rewards[0] == pytest.approx(scored.results[0].steps[0].progress, abs=1e-6)
    assert asyncio.run(go()).rewards[0] == pytest.approx(scored.results[0].score, abs=1e-6)


class RecordingTransport(httpx.HTTPTransport):
    """Passes requests to the live server and keeps the headers each one carried."""

    def __init__(self):
        super().__init__()
        self.sent: list[httpx.Headers] = []

    def handle_request(self, request):
        self.sent.append(request.headers)
        return super().handle_request(request)


def test_episode_id_and_extra_headers_per_client_and_per_call(live_server):
    traj = trajectory_json("go to the red ball", 2)
    wire = RecordingTransport()
    with PRMClient(live_server, transport=wire, episode_id="ep-client", headers={"X-Tenant": "a"}) as client:
        plain = client.score([traj]).results[0].score
        client.score([traj], episode_id="ep-call", headers={"X-Trace": "t1"})
        client.episode_id = None
        anonymous = client.score([traj]).results[0].score  # no episode id: still served, same answer
    first, second, third = wire.sent
    assert first["x-episode-id"] == "ep-client" and first["x-tenant"] == "a" and "x-trace" not in first
    assert second["x-episode-id"] == "ep-call" and second["x-trace"] == "t1" and second["x-tenant"] == "a"
    assert "x-episode-id" not in third
    assert abs(plain - anonymous) < 1e-6


def test_a_malformed_episode_id_is_refused_before_sending():
    def handler(request):
        raise AssertionError("nothing should be sent")

    with pytest.raises(ValueError, match="episode_id"):
        PRMClient("http://127.0.0.1:1", episode_id="has space")
    with PRMClient("http://127.0.0.1:1", transport=httpx.MockTransport(handler)) as client:
        with pytest.raises(ValueError, match="episode_id"):
            client.score([trajectory_json("t", 1)], episode_id="line\nbreak")
        with pytest.raises(ValueError, match="episode_id"):
            client.episode_id = "x" * 129


def test_async_client_sends_the_episode_id(live_server):
    seen = []

    class Recording(httpx.AsyncHTTPTransport):
        async def handle_async_request(self, request):
            seen.append(request.headers.get("x-episode-id"))
            return await super().handle_async_request(request)

    traj = trajectory_json("go to the red ball", 2)
    beams = [{"trajectory": traj, "observation": "a ball", "candidates": ["move forward", "turn left"]}]

    async def main():
        async with AsyncPRMClient(live_server, transport=Recording(), episode_id="ep-a") as client:
            await client.score([traj])
            await client.beam_expand(beams, beam_width=1, episode_id="ep-b")
            await client.rerank("t", [traj["steps"]], headers={"X-Episode-ID": "ignored"}, episode_id="ep-c")

    asyncio.run(main())
    assert seen == ["ep-a", "ep-b", "ep-c"]
