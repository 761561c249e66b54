"""Typed SDK: requests and responses are the server's protocol models; errors carry the server's message.

Retries: connection errors (refused, reset, timed out), 429 (queue full), 502 (a proxy whose upstream
died mid-request) and 503 (not ready, draining) are retried with exponential backoff and jitter,
honouring Retry-After (seconds or an HTTP date, capped by `backoff_cap_s`), up to `max_retries` times;
every other error is raised at once as `PRMError(message, code, type)`. 504 is not retried: it is the
request's own deadline. Scoring is idempotent, so a retried request can never double-count anything.

Proxies: for a loopback base URL (127.0.0.0/8, ::1, localhost) the client ignores HTTP(S)_PROXY and the other
environment settings (`trust_env=False`), so a cluster-wide proxy variable cannot capture calls to a
co-located server; for other URLs httpx's default (honour them) stands. `trust_env=` overrides both.

Episode affinity: `episode_id` (per client, or per call, which wins) is sent as the `X-Episode-ID` header so
that a proxy hashing on it (docker/compose.yaml, docker/k8s/overlays/affinity) sends every call of one agent
episode to the replica whose prefix cache holds that episode's history; the server writes it to its access
log. `headers` adds further headers per client or per call. Requests without an episode id work the same,
they only lose the affinity.
"""

from __future__ import annotations

import asyncio
import datetime
import email.utils
import ipaddress
import random
import re
import time
from collections.abc import Iterable, Mapping
from typing import Any

import httpx
from pydantic import BaseModel

from service.api.protocol import (BeamExpandRequest, BeamExpandResponse, ModelList, RerankRequest, RerankResponse,
                                  ScoreRequest, ScoreResponse)
from service.engine.types import DEFAULT_AGGREGATE, DEFAULT_MODEL_ALIAS

RETRY_STATUS = (429, 502, 503)
EPISODE_HEADER = "X-Episode-ID"
# What the server logs and a proxy hashes: short, printable, no separators that could split a log line.
_EPISODE_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


def _check_episode_id(episode_id: str | None) -> str | None:
    if episode_id is not None and not _EPISODE_ID.match(str(episode_id)):
        raise ValueError(f"episode_id must be 1-128 characters of A-Z a-z 0-9 . _ : -, got {episode_id!r}")
    return episode_id


class PRMError(Exception):
    def __init__(self, message: str, code: int, type: str = "error"):
        super().__init__(f"{code} {type}: {message}")
        self.message = message
        self.code = code
        self.type = type


def _error_from(response: httpx.Response) -> PRMError:
    try:
        body = response.json()["error"]
        return PRMError(body.get("message", response.text), body.get("code", response.status_code),
                        body.get("type", "error"))
    except (ValueError, KeyError, TypeError):
        return PRMError(response.text or response.reason_phrase, response.status_code, "http_error")


def _retry_after(response: httpx.Response | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date), None when absent or unreadable."""
    value = response.headers.get("retry-after", "").strip() if response is not None else ""
    if not value:
        return None
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.timezone.utc)
    return max(0.0, (when - datetime.datetime.now(datetime.timezone.utc)).total_seconds())


def _backoff(attempt: int, response: httpx.Response | None, base: float, cap: float) -> float:
    told = _retry_after(response)
    if told is not None:
        return min(cap, told)
    return min(cap, base * 2**attempt) * (0.5 + random.random() / 2)


def is_loopback(url: str) -> bool:
    """Whether the URL's host is this machine (a loopback address or `localhost`)."""
    host = httpx.URL(url).host
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class RewardResponse(BaseModel):
    """The answer of /v1/reward (OpenRLHF's remote reward-model format)."""

    rewards: list[float]
    scores: list[float]
    extra_logs: dict[str, list]


def _reward_params(step_format, delimiter, aggregate, model) -> dict:
    params = {"step_format": step_format, "delimiter": delimiter, "aggregate": aggregate, "model": model}
    return {k: v for k, v in params.items() if v is not None}


def _as_dicts(items: Iterable[Any]) -> list:
    return [i.model_dump() if hasattr(i, "model_dump") else i for i in items]


def _score_body(trajectories, aggregate, model) -> dict:
    return ScoreRequest.model_validate({"model": model, "trajectories": _as_dicts(trajectories),
                                        "aggregate": aggregate}).model_dump(exclude_none=True)


def _rerank_body(task, candidates, aggregate, top_n, model, messages=None) -> dict:
    """Candidates given as lists are steps (with `task`) or messages (with `messages`, the shared conversation)."""
    form = "steps" if messages is None else "messages"
    cands = [{form: _as_dicts(c)} if isinstance(c, (list, tuple)) else c for c in _as_dicts(candidates)]
    return RerankRequest.model_validate({"model": model, "task": task, "candidates": cands, "aggregate": aggregate,
                                         "top_n": top_n, "messages": None if messages is None else
                                         _as_dicts(messages)}).model_dump(exclude_none=True)


def _expand_body(beams, beam_width, model) -> dict:
    return BeamExpandRequest.model_validate({"model": model, "beam_width": beam_width,
                                             "beams": _as_dicts(beams)}).model_dump(exclude_none=True)


class _Retries:
    """The retry policy of one request, shared by the sync and async clients (module docstring)."""

    def __init__(self, max_retries: int, base_s: float, cap_s: float):
        self.max_retries, self.base_s, self.cap_s = max_retries, base_s, cap_s
        self.attempt = 0
        self.response: httpx.Response | None = None

    def after(self, outcome: httpx.Response | httpx.TransportError) -> float | None:
        """Seconds to wait before the next attempt, or None when `self.response` is the answer; raises the
        transport error or the PRMError when no retry is left or the status is not retryable."""
        attempt, self.attempt = self.attempt, self.attempt + 1
        last = attempt == self.max_retries
        response = None
        if isinstance(outcome, httpx.TransportError):
            if last:
                raise outcome
        else:
            response = outcome
            if response.status_code < 400:
                self.response = response
                return None
            if response.status_code not in RETRY_STATUS or last:
                raise _error_from(response)
        return _backoff(attempt, response, self.base_s, self.cap_s)


class _Base:
    def __init__(self, base_url: str = "http://127.0.0.1:8000", api_key: str | None = None, timeout: float = 60.0,
                 max_retries: int = 3, backoff_base_s: float = 0.2, backoff_cap_s: float = 10.0,
                 model: str = DEFAULT_MODEL_ALIAS, max_connections: int = 100, trust_env: bool | None = None,
                 episode_id: str | None = None, headers: Mapping[str, str] | None = None):
        self.base_url = base_url.rstrip("/")
        self.trust_env = (not is_loopback(self.base_url)) if trust_env is None else trust_env
        # As many kept-alive connections as open ones: httpcore 1.0 closes every idle connection while the pool
        # holds more than max_keepalive_connections in all (busy ones counted), so with its default of 20 a
        # client running more concurrent calls than that reconnected for most of them.
        self.limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        self.headers = dict(headers or {})
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self._episode_id = _check_episode_id(episode_id)
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff_base_s = backoff_base_s
        self.backoff_cap_s = backoff_cap_s
        self.model = model

    @property
    def episode_id(self) -> str | None:
        """The X-Episode-ID sent on calls that name none; set it to None to send none."""
        return self._episode_id

    @episode_id.setter
    def episode_id(self, value: str | None) -> None:
        self._episode_id = _check_episode_id(value)

    def _call_headers(self, episode_id: str | None, headers: Mapping[str, str] | None) -> dict:
        """The headers one call adds to the client's: its own, then the episode id (the call's, else the client's)."""
        extra = dict(headers or {})
        episode = _check_episode_id(episode_id) or self._episode_id
        if episode is not None:
            extra[EPISODE_HEADER] = episode
        return extra

    def _retries(self) -> _Retries:
        return _Retries(self.max_retries, self.backoff_base_s, self.backoff_cap_s)


class PRMClient(_Base):
    """Synchronous client. Use as a context manager, or call close()."""

    def __init__(self, *args, transport: httpx.BaseTransport | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._http = httpx.Client(base_url=self.base_url, headers=self.headers, timeout=self.timeout,
                                  limits=self.limits, transport=transport, trust_env=self.trust_env)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        self._http.close()

    def _request(self, method: str, path: str, json: Mapping | None = None, params: Mapping | None = None,
                 headers: Mapping[str, str] | None = None) -> httpx.Response:
        retry = self._retries()
        while (wait := retry.after(self._attempt(method, path, json, params, headers))) is not None:
            time.sleep(wait)
        return retry.response

    def _attempt(self, method: str, path: str, json: Mapping | None, params: Mapping | None = None,
                 headers: Mapping[str, str] | None = None) -> httpx.Response | httpx.TransportError:
        try:
            return self._http.request(method, path, json=json, params=params, headers=headers)
        except httpx.TransportError as exc:
            return exc

    def score(self, trajectories, aggregate: str = DEFAULT_AGGREGATE, model: str | None = None, *,
              episode_id: str | None = None, headers: Mapping[str, str] | None = None) -> ScoreResponse:
        body = _score_body(trajectories, aggregate, model or self.model)
        response = self._request("POST", "/v1/score", body, headers=self._call_headers(episode_id, headers))
        return ScoreResponse.model_validate(response.json())

    def rerank(self, task: str | None, candidates, aggregate: str = DEFAULT_AGGREGATE, top_n: int | None = None,
               model: str | None = None, messages: list | None = None, *, episode_id: str | None = None,
               headers: Mapping[str, str] | None = None) -> RerankResponse:
        """Best-of-N: `task` and candidates as step lists, or (task=None) `messages` and candidates as message lists."""
        body = _rerank_body(task, candidates, aggregate, top_n, model or self.model, messages)
        response = self._request("POST", "/v1/rerank", body, headers=self._call_headers(episode_id, headers))
        return RerankResponse.model_validate(response.json())

    def beam_expand(self, beams, beam_width: int, model: str | None = None, *,
                    episode_id: str | None = None, headers: Mapping[str, str] | None = None) -> BeamExpandResponse:
        body = _expand_body(beams, beam_width, model or self.model)
        response = self._request("POST", "/v1/beam-expand", body, headers=self._call_headers(episode_id, headers))
        return BeamExpandResponse.model_validate(response.json())

    def reward(self, query: list[str], prompts: list[str] | None = None, labels: list | None = None,
               step_format: str | None = None, delimiter: str | None = None, aggregate: str | None = None,
               model: str | None = None) -> RewardResponse:
        """One reward per text (POST /v1/reward, OpenRLHF's format); None settings take the server's defaults."""
        body = {"query": list(query), "prompts": None if prompts is None else list(prompts), "labels": labels}
        params = _reward_params(step_format, delimiter, aggregate, model or self.model)
        response = self._request("POST", "/v1/reward", body, params, self._call_headers(None, None))
        return RewardResponse.model_validate(response.json())

    def models(self) -> ModelList:
        return ModelList.model_validate(self._request("GET", "/v1/models").json())

    def ready(self) -> bool:
        try:
            return self._http.get("/ready").status_code == 200
        except httpx.TransportError:
            return False


class AsyncPRMClient(_Base):
    """Asynchronous client. Use as an async context manager, or await aclose()."""

    def __init__(self, *args, transport: httpx.AsyncBaseTransport | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._http = httpx.AsyncClient(base_url=self.base_url, headers=self.headers, timeout=self.timeout,
                                       limits=self.limits, transport=transport, trust_env=self.trust_env)

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _request(self, method: str, path: str, json: Mapping | None = None, params: Mapping | None = None,
                       headers: Mapping[str, str] | None = None) -> httpx.Response:
        retry = self._retries()
        while (wait := retry.after(await self._attempt(method, path, json, params, headers))) is not None:
            await asyncio.sleep(wait)
        return retry.response

    async def _attempt(self, method: str, path: str, json: Mapping | None, params: Mapping | None = None,
                       headers: Mapping[str, str] | None = None) -> httpx.Response | httpx.TransportError:
        try:
            return await self._http.request(method, path, json=json, params=params, headers=headers)
        except httpx.TransportError as exc:
            return exc

    async def score(self, trajectories, aggregate: str = DEFAULT_AGGREGATE, model: str | None = None, *,
                    episode_id: str | None = None, headers: Mapping[str, str] | None = None) -> ScoreResponse:
        body = _score_body(trajectories, aggregate, model or self.model)
        response = await self._request("POST", "/v1/score", body, headers=self._call_headers(episode_id, headers))
        return ScoreResponse.model_validate(response.json())

    async def rerank(self, task: str | None, candidates, aggregate: str = DEFAULT_AGGREGATE,
                     top_n: int | None = None, model: str | None = None, messages: list | None = None, *,
                     episode_id: str | None = None, headers: Mapping[str, str] | None = None) -> RerankResponse:
        """Best-of-N: `task` and candidates as step lists, or (task=None) `messages` and candidates as message lists."""
        body = _rerank_body(task, candidates, aggregate, top_n, model or self.model, messages)
        response = await self._request("POST", "/v1/rerank", body, headers=self._call_headers(episode_id, headers))
        return RerankResponse.model_validate(response.json())

    async def beam_expand(self, beams, beam_width: int, model: str | None = None, *, episode_id: str | None = None,
                          headers: Mapping[str, str] | None = None) -> BeamExpandResponse:
        body = _expand_body(beams, beam_width, model or self.model)
        response = await self._request("POST", "/v1/beam-expand", body,
                                       headers=self._call_headers(episode_id, headers))
        return BeamExpandResponse.model_validate(response.json())

    async def reward(self, query: list[str], prompts: list[str] | None = None, labels: list | None = None,
                     step_format: str | None = None, delimiter: str | None = None, aggregate: str | None = None,
                     model: str | None = None) -> RewardResponse:
        """One reward per text (POST /v1/reward, OpenRLHF's format); None settings take the server's defaults."""
        body = {"query": list(query), "prompts": None if prompts is None else list(prompts), "labels": labels}
        params = _reward_params(step_format, delimiter, aggregate, model or self.model)
        response = await self._request("POST", "/v1/reward", body, params, self._call_headers(None, None))
        return RewardResponse.model_validate(response.json())

    async def models(self) -> ModelList:
        return ModelList.model_validate((await self._request("GET", "/v1/models")).json())

    async def ready(self) -> bool:
        try:
            return (await self._http.get("/ready")).status_code == 200
        except httpx.TransportError:
            return False
