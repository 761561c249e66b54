"""Pure ASGI middleware, one concern per class, composed by `install_middleware` (outermost first):

1. `ObservedRequests`: the request id (X-Request-ID in, echoed out), request metrics, the access log and the
   last-resort 500 (so even that response carries the request id);
2. `ApiKeyAuth`: default-deny API keys. When keys are configured every path needs `Authorization: Bearer KEY`
   except the explicit `public_paths` (/health and /ready, plus /metrics when metrics auth is off), so a
   route added later is protected without anyone remembering to. Keys are compared with
   `hmac.compare_digest` against every configured key (no early exit), before any of the body is read;
3. `EarlyRefusal`: scoring requests that must be refused anyway (draining, engine dead, too many in
   progress, queue at its bound: service.engine.admission decides) are answered before their body is read,
   so overload costs no parsing, validation or tokenization;
4. `BodyLimit`: the body size limit, enforced while the body streams in, so a request with a lying or
   missing Content-Length still cannot exceed it.

Plain ASGI (not BaseHTTPMiddleware) for the streaming body limit. The access log (logger "agentprm.access")
writes the request id, the episode id (X-Episode-ID, when well-formed), method, route template, status, latency
and token usage; never the body or other headers.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import time
import uuid

from service.api.config import ALWAYS_PUBLIC
from service.engine.admission import retry_after_header
from service.metrics import Metrics

_SAFE_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
access_log = logging.getLogger("agentprm.access")
log = logging.getLogger("agentprm.api")
QUIET_ROUTES = ("/health", "/ready", "/metrics")  # probes and scrapes: access-logged at debug level only
SCORING_PATHS = frozenset({"/v1/score", "/v1/rerank", "/v1/beam-expand"})


def error_body(code: int, type_: str, message: str) -> bytes:
    return json.dumps({"error": {"message": message, "type": type_, "code": code}}).encode()


async def send_error(send, code: int, type_: str, message: str, extra_headers=()) -> None:
    """An error response in the API's one shape, straight on the ASGI channel."""
    await send({"type": "http.response.start", "status": code,
                "headers": [(b"content-type", b"application/json"), *extra_headers]})
    await send({"type": "http.response.body", "body": error_body(code, type_, message)})


def app_path(scope) -> str:
    """The request path below the app's mount point: the probes keep their own paths under a prefix."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path


class ObservedRequests:
    def __init__(self, app, metrics: Metrics, log_access: bool = True):
        self.app = app
        self.metrics = metrics
        self.log_access = log_access

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        incoming = headers.get(b"x-request-id", b"").decode("latin-1")
        request_id = incoming if _SAFE_ID.match(incoming) else uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        episode = headers.get(b"x-episode-id", b"").decode("latin-1")  # the SDK's affinity key; logged when safe
        state["episode_id"] = episode if _SAFE_ID.match(episode) else None
        start = time.perf_counter()
        response = {"status": 500, "started": False}

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                response["status"] = message["status"]
                response["started"] = True
                message["headers"] = list(message.get("headers", [])) + [(b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("unhandled error in request %s", request_id, extra={"request_id": request_id})
            if not response["started"]:
                await send_error(send_with_id, 500, "internal_error",
                                 f"internal server error (request id {request_id})")
        finally:
            route = scope.get("route")
            label = getattr(route, "path", None) or state.get("refused_route") or "unmatched"
            status, seconds = response["status"], time.perf_counter() - start
            self.metrics.requests.labels(route=label, status=str(status)).inc()
            self.metrics.request_duration.labels(route=label).observe(seconds)
            if status >= 400:
                self.metrics.errors.labels(code=str(status)).inc()
            if self.log_access:
                self._log(scope, state, label, status, seconds, request_id)

    @staticmethod
    def _log(scope, state: dict, route: str, status: int, seconds: float, request_id: str) -> None:
        level = logging.DEBUG if route in QUIET_ROUTES and status < 400 else logging.INFO
        if not access_log.isEnabledFor(level):
            return
        fields = {"request_id": request_id, "method": scope.get("method"), "route": route, "status": status,
                  "duration_ms": round(seconds * 1000, 2)}
        if state.get("episode_id"):
            fields["episode_id"] = state["episode_id"]
        if route == "unmatched":
            fields["path"] = scope.get("path", "")[:200]
        usage = state.get("usage")
        if usage is not None:
            fields.update(prompt_tokens=usage.prompt_tokens, computed_tokens=usage.computed_tokens,
                          cached_tokens=usage.cached_tokens)
        access_log.log(level, "%s %s %d %.1fms", fields["method"], fields.get("path", route), status,
                       fields["duration_ms"], extra=fields)


class ApiKeyAuth:
    def __init__(self, app, api_keys: tuple[str, ...], public_paths: frozenset[str]):
        self.app = app
        self.keys = tuple(k.encode() for k in api_keys)
        self.public_paths = public_paths

    def _authorized(self, headers: dict) -> tuple[bool, str]:
        value = headers.get(b"authorization", b"")
        scheme, _, token = value.strip().partition(b" ")
        token = token.strip()
        if scheme.lower() != b"bearer" or not token:
            return False, "missing API key: send 'Authorization: Bearer <key>'"
        ok = False
        for key in self.keys:  # compare with every key: the time taken does not depend on which matched
            ok |= hmac.compare_digest(token, key)
        return ok, "" if ok else "invalid API key"

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and self.keys and app_path(scope) not in self.public_paths:
            ok, why = self._authorized(dict(scope.get("headers") or []))
            if not ok:
                return await send_error(send, 401, "unauthorized", why,
                                        [(b"www-authenticate", b'Bearer realm="agentprm"')])
        await self.app(scope, receive, send)


class EarlyRefusal:
    def __init__(self, app, state):
        self.app = app
        self.state = state  # service.api.admission.ServerState

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope.get("method") == "POST" and app_path(scope) in SCORING_PATHS:
            refused = self.state.refusal()
            if refused is not None:  # before the body is read: a refusal costs (almost) nothing
                scope.setdefault("state", {})["refused_route"] = app_path(scope)
                header = retry_after_header(refused) or {}
                return await send_error(send, refused.code, refused.type, refused.message,
                                        [(k.lower().encode(), v.encode()) for k, v in header.items()])
        await self.app(scope, receive, send)


class BodyLimit:
    def __init__(self, app, max_body_bytes: int):
        self.app = app
        self.limit = max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = f"request body exceeds the limit of {self.limit} bytes"
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await send_error(send, 413, "payload_too_large", too_large)
        received, rejected, started = 0, False, False  # rejected: a 413 went out; the app's answer goes nowhere

        async def guarded_send(message):
            nonlocal started
            if rejected:
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        async def limited_receive():
            nonlocal received, rejected
            if rejected:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:  # chunked or lying Content-Length: answer 413 now, stop reading
                    if not started:
                        await send_error(send, 413, "payload_too_large", too_large)
                    rejected = True
                    return {"type": "http.disconnect"}
            return message

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not rejected:
                raise


def install_middleware(app, metrics: Metrics, max_body_bytes: int, api_keys: tuple[str, ...] = (),
                       public_paths: frozenset[str] = ALWAYS_PUBLIC, log_access: bool = True,
                       state=None) -> None:
    """Add the middleware in order; Starlette runs the last added outermost."""
    app.add_middleware(BodyLimit, max_body_bytes=max_body_bytes)
    if state is not None:
        app.add_middleware(EarlyRefusal, state=state)
    app.add_middleware(ApiKeyAuth, api_keys=api_keys, public_paths=public_paths)
    app.add_middleware(ObservedRequests, metrics=metrics, log_access=log_access)
