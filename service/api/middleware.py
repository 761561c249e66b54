"""Pure ASGI middleware: request ids, API-key auth, the body size limit, request metrics, the access log,
and the last-resort 500.

Plain ASGI (not BaseHTTPMiddleware) so the body limit is enforced while the body streams in and a
request with a lying or missing Content-Length still cannot exceed it.

Auth is default-deny: when keys are configured, every path needs `Authorization: Bearer KEY` except the
explicit `public_paths` (/health and /ready, plus /metrics when metrics auth is off), so a route added
later is protected without anyone remembering to. Keys are compared with `hmac.compare_digest` against
every configured key (no early exit), and the check runs before any of the body is read.

Scoring requests that must be refused anyway (draining, engine dead, too many in progress, queue at its
bound) are answered before their body is read, so overload costs no parsing, validation or tokenization.

The access log (logger "agentprm.access") writes the request id, method, route template, status,
latency and token usage; never the body or headers.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import re
import time
import uuid

from service.metrics import Metrics

_SAFE_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
access_log = logging.getLogger("agentprm.access")
log = logging.getLogger("agentprm.api")
QUIET_ROUTES = ("/health", "/ready", "/metrics")
SCORING_PATHS = frozenset({"/v1/score", "/v1/rerank", "/v1/beam-expand"})  # probes and scrapes: access-logged at debug level only


def error_body(code: int, type_: str, message: str) -> bytes:
    return json.dumps({"error": {"message": message, "type": type_, "code": code}}).encode()


class _BodyTooLarge(Exception):
    pass


def _route_template(scope) -> str | None:
    """The route template a request would reach (for the metrics label of a request refused before routing)."""
    from starlette.routing import Match

    app = scope.get("app")
    for route in getattr(getattr(app, "router", None), "routes", ()):
        if route.matches(scope)[0] == Match.FULL:
            return getattr(route, "path", None)
    return None


class ServiceMiddleware:
    def __init__(self, app, metrics: Metrics, max_body_bytes: int, api_keys: tuple[str, ...] = (),
                 public_paths: frozenset[str] = frozenset({"/health", "/ready"}), log_access: bool = True,
                 state=None):
        self.app = app
        self.state = state  # service.api.admission.ServerState: early refusal of scoring requests
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes
        self.keys = tuple(k.encode() for k in api_keys)
        self.public_paths = public_paths
        self.log_access = log_access

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
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        incoming = headers.get(b"x-request-id", b"").decode("latin-1")
        request_id = incoming if _SAFE_ID.match(incoming) else uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        start = time.perf_counter()
        status_holder = {"status": 500, "started": False}

        early_route = None  # the scoring route of a request refused before routing
        rejected = False  # a 413 went out while the body streamed in: the app's own answer goes nowhere

        async def send_with_id(message):
            if rejected:
                return
            if message["type"] == "http.response.start":
                status_holder["status"] = message["status"]
                status_holder["started"] = True
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + [(b"x-request-id", request_id.encode())]
            await send(message)

        async def respond(code: int, type_: str, message: str, extra_headers=()):
            await send_with_id({"type": "http.response.start", "status": code,
                                "headers": [(b"content-type", b"application/json"), *extra_headers]})
            await send({"type": "http.response.body", "body": error_body(code, type_, message)})

        limit = self.max_body_bytes
        declared = headers.get(b"content-length")
        received = 0
        too_large = f"request body exceeds the limit of {limit} bytes"

        async def limited_receive():
            nonlocal received, rejected
            if rejected:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:  # chunked or lying Content-Length: answer 413 now, stop reading
                    if not status_holder["started"]:
                        await respond(413, "payload_too_large", too_large)
                    rejected = True
                    return {"type": "http.disconnect"}
            return message

        try:
            path, root = scope["path"], scope.get("root_path", "")
            if root and path.startswith(root):  # mounted under a prefix: the probes keep their own paths
                path = path[len(root):]
            if self.keys and path not in self.public_paths:
                ok, why = self._authorized(headers)
                if not ok:
                    early_route = _route_template(scope)
                    await respond(401, "unauthorized", why, [(b"www-authenticate", b'Bearer realm="agentprm"')])
                    return
            if self.state is not None and scope.get("method") == "POST" and path in SCORING_PATHS:
                refused = self.state.refusal()
                if refused is not None:  # before the body is read: a refusal costs (almost) nothing
                    early_route = path
                    retry = max(1, math.ceil(getattr(refused, "retry_after_s", 1.0)))
                    await respond(refused.code, refused.type, refused.message,
                                  [(b"retry-after", str(retry).encode())])
                    return
            if declared is not None and declared.isdigit() and int(declared) > limit:
                raise _BodyTooLarge()
            await self.app(scope, limited_receive, send_with_id)
        except _BodyTooLarge:
            await respond(413, "payload_too_large", too_large)
        except asyncio.CancelledError:
            # A forced stop (drain timeout, second signal, engine death) cancels the requests still running.
            # They get the JSON error shape, not uvicorn's text/plain 500 and a logged traceback; the task ends
            # here instead of re-raising because the server is going away and nothing waits on it.
            if not status_holder["started"] and not rejected:
                await respond(503, "shutting_down", "the server is shutting down and cancelled this request; "
                              "retry it (on another replica)", [(b"retry-after", b"1")])
        except Exception:
            if rejected:
                return
            log.exception("unhandled error in request %s", request_id, extra={"request_id": request_id})
            if not status_holder["started"]:
                await respond(500, "internal_error", f"internal server error (request id {request_id})")
        finally:
            route = scope.get("route")
            label = getattr(route, "path", None) or early_route or "unmatched"
            status = status_holder["status"]
            seconds = time.perf_counter() - start
            self.metrics.requests.labels(route=label, status=str(status)).inc()
            self.metrics.request_duration.labels(route=label).observe(seconds)
            if status >= 400:
                self.metrics.errors.labels(code=str(status)).inc()
            if self.log_access:
                self._log(scope, state, label, status, seconds, request_id)

    def _log(self, scope, state: dict, route: str, status: int, seconds: float, request_id: str) -> None:
        level = logging.DEBUG if route in QUIET_ROUTES and status < 400 else logging.INFO
        if not access_log.isEnabledFor(level):
            return
        fields = {"request_id": request_id, "method": scope.get("method"), "route": route, "status": status,
                  "duration_ms": round(seconds * 1000, 2)}
        if route == "unmatched":
            fields["path"] = scope.get("path", "")[:200]
        usage = state.get("usage")
        if usage is not None:
            fields.update(prompt_tokens=usage.prompt_tokens, computed_tokens=usage.computed_tokens,
                          cached_tokens=usage.cached_tokens)
        access_log.log(level, "%s %s %d %.1fms", fields["method"], fields.get("path", route), status,
                       fields["duration_ms"], extra=fields)
