"""Pure ASGI middleware: request ids, the body size limit, and per-route request metrics.

Plain ASGI (not BaseHTTPMiddleware) so the body limit is enforced while the body streams in and a
request with a lying or missing Content-Length still cannot exceed it.
"""

from __future__ import annotations

import json
import re
import time
import uuid

from service.metrics import Metrics

_SAFE_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


def error_body(code: int, type_: str, message: str) -> bytes:
    return json.dumps({"error": {"message": message, "type": type_, "code": code}}).encode()


class _BodyTooLarge(Exception):
    pass


class ServiceMiddleware:
    def __init__(self, app, metrics: Metrics, max_body_bytes: int):
        self.app = app
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        incoming = headers.get(b"x-request-id", b"").decode("latin-1")
        request_id = incoming if _SAFE_ID.match(incoming) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        start = time.perf_counter()
        status_holder = {"status": 500, "started": False}

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                status_holder["status"] = message["status"]
                status_holder["started"] = True
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + [(b"x-request-id", request_id.encode())]
            await send(message)

        limit = self.max_body_bytes
        declared = headers.get(b"content-length")
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise _BodyTooLarge()
            return message

        try:
            if declared is not None and declared.isdigit() and int(declared) > limit:
                raise _BodyTooLarge()
            await self.app(scope, limited_receive, send_with_id)
        except _BodyTooLarge:
            if not status_holder["started"]:
                await send_with_id({"type": "http.response.start", "status": 413,
                                    "headers": [(b"content-type", b"application/json")]})
                await send({"type": "http.response.body",
                            "body": error_body(413, "payload_too_large",
                                               f"request body exceeds the limit of {limit} bytes")})
        finally:
            route = scope.get("route")
            label = getattr(route, "path", None) or "unmatched"
            status = status_holder["status"]
            self.metrics.requests.labels(route=label, status=str(status)).inc()
            self.metrics.request_duration.labels(route=label).observe(time.perf_counter() - start)
            if status >= 400:
                self.metrics.errors.labels(code=str(status)).inc()
