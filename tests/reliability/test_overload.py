"""Overload: a burst well over what the server admits at once (its queue holds 32 sequences, 48 requests).

Every request of the burst gets an answer; every answer is 200 or 429 (with Retry-After and the error
shape); every 200 equals the same request scored alone afterwards; the server is healthy afterwards.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest

from tests.conftest import trajectory_json
from tests.reliability.helpers import AUTH

BURST = 240


def request_body(i: int) -> dict:
    return {"trajectories": [trajectory_json(f"burst task {i % 7}", 2 + i % 5, seed=i),
                             trajectory_json(f"burst task {i % 3}", 1 + i % 4, seed=1000 + i)]}


async def burst(url: str) -> list:
    limits = httpx.Limits(max_connections=BURST, max_keepalive_connections=BURST)
    async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=120, limits=limits) as client:
        return await asyncio.gather(*(client.post("/v1/score", json=request_body(i)) for i in range(BURST)),
                                    return_exceptions=True)


def test_a_burst_over_capacity_gets_only_correct_200s_and_429s(keyed_server):
    responses = asyncio.run(burst(keyed_server))
    errors = [r for r in responses if not isinstance(r, httpx.Response)]
    assert not errors, errors[:3]  # none lost: every request got an HTTP answer
    codes = [r.status_code for r in responses]
    accepted = [i for i, c in enumerate(codes) if c == 200]
    refused = [i for i, c in enumerate(codes) if c == 429]
    assert len(accepted) + len(refused) == BURST, sorted(set(codes))
    assert accepted and refused, (len(accepted), len(refused))  # it really was over capacity
    for i in refused:
        r = responses[i]
        assert int(r.headers["retry-after"]) >= 1
        assert r.json()["error"]["type"] == "overloaded" and r.json()["error"]["code"] == 429
    with httpx.Client(base_url=keyed_server, headers=AUTH, timeout=60) as client:
        for i in accepted:
            alone = client.post("/v1/score", json=request_body(i))
            assert alone.status_code == 200
            got, want = responses[i].json()["results"], alone.json()["results"]
            assert len(got) == len(want) == 2
            for g, w in zip(got, want):
                assert g["initial_value"] == pytest.approx(w["initial_value"], abs=1e-5)
                assert [s["promise"] for s in g["steps"]] == pytest.approx([s["promise"] for s in w["steps"]],
                                                                           abs=1e-5)
        assert client.get("/ready").status_code == 200
    print(f"\noverload: burst {BURST} -> {len(accepted)} x 200 (all equal to the request alone), "
          f"{len(refused)} x 429, 0 lost")
