"""SDK retries (mock transport, no server): 502 from a proxy and 503 from a draining server are retried;
Retry-After is honoured in seconds and as an HTTP date, capped; 504 (the request's own deadline) and
4xx other than 429 are raised at once; retries stop after max_retries.
"""

from __future__ import annotations

import asyncio
import email.utils
import time

import httpx
import pytest

from clients import AsyncPRMClient, PRMClient, PRMError
from clients import sdk

MODELS = {"object": "list", "data": []}


def scripted(*responses):
    calls: list[float] = []
    script = list(responses)

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(time.monotonic())
        status, headers = script.pop(0) if script else (200, {})
        if status == 200:
            return httpx.Response(200, json=MODELS)
        if status == 502:
            return httpx.Response(502, text="<html>502 Bad Gateway</html>", headers=headers)
        return httpx.Response(status, headers=headers,
                              json={"error": {"message": f"status {status}", "type": "x", "code": status}})

    return handler, calls


def test_502_and_503_are_retried_until_success():
    handler, calls = scripted((502, {}), (503, {"Retry-After": "0"}), (200, {}))
    with PRMClient("http://test", transport=httpx.MockTransport(handler), backoff_base_s=0.0) as client:
        assert client.models().data == []
    assert len(calls) == 3


def test_async_client_retries_the_same_way():
    handler, calls = scripted((502, {}), (429, {"Retry-After": "0"}), (200, {}))

    async def go():
        async with AsyncPRMClient("http://test", transport=httpx.MockTransport(handler), backoff_base_s=0.0) as c:
            return await c.models()

    assert asyncio.run(go()).data == [] and len(calls) == 3


@pytest.mark.parametrize("status", [504, 500, 422, 404, 401])
def test_deadline_and_client_errors_are_not_retried(status):
    handler, calls = scripted((status, {}), (200, {}))
    with PRMClient("http://test", transport=httpx.MockTransport(handler), backoff_base_s=0.0) as client:
        with pytest.raises(PRMError) as info:
            client.models()
    assert info.value.code == status and len(calls) == 1


def test_retries_stop_after_max_retries():
    handler, calls = scripted(*[(503, {"Retry-After": "0"})] * 10)
    with PRMClient("http://test", transport=httpx.MockTransport(handler), max_retries=2) as client:
        with pytest.raises(PRMError) as info:
            client.models()
    assert info.value.code == 503 and len(calls) == 3


def test_retry_after_seconds_and_http_dates_are_read_and_capped():
    def response(value: str) -> httpx.Response:
        return httpx.Response(429, headers={"Retry-After": value})

    assert sdk._backoff(0, response("3"), base=0.1, cap=10) == 3.0
    assert sdk._backoff(0, response("120"), base=0.1, cap=10) == 10.0
    in_five = email.utils.formatdate(time.time() + 5, usegmt=True)
    assert 3.5 <= sdk._backoff(0, response(in_five), base=0.1, cap=10) <= 5.0
    past = email.utils.formatdate(time.time() - 60, usegmt=True)
    assert sdk._backoff(0, response(past), base=0.1, cap=10) == 0.0
    jittered = sdk._backoff(3, response("soon"), base=0.1, cap=10)  # unreadable: exponential backoff
    assert 0.4 <= jittered <= 0.8
