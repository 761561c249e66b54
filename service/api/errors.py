"""Error handlers: every error is `{"error": {"message", "type", "code"}}`; a 500 never leaks a traceback.

Unexpected exceptions are turned into the 500 shape by the middleware (service.api.middleware), so that
the response still carries the request id.

429 (overloaded) and 503 (not ready, draining) carry `Retry-After` (service.engine.admission). A 5xx is
logged with the request id.
A request whose client went away gets 499 (nginx's convention); nobody reads it, the metrics count it.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.api.admission import ClientClosed
from service.engine.admission import retry_after_header
from service.engine.errors import EngineError

log = logging.getLogger("agentprm.api")

_HTTP_TYPES = {401: "unauthorized", 404: "not_found", 405: "method_not_allowed", 413: "payload_too_large",
               429: "overloaded", 503: "not_ready"}
CLIENT_CLOSED = 499


def error_response(code: int, type_: str, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "code": code}}, status_code=code,
                        headers=headers)


def _describe_validation(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
        parts.append(f"{loc}: {err.get('msg', 'invalid')}")
    more = len(exc.errors()) - len(parts)
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        return error_response(422, "invalid_request", _describe_validation(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 400:  # FastAPI's "error parsing the body" (not UTF-8 JSON): the API answers 422
            return error_response(422, "invalid_request", f"body: {exc.detail} (send UTF-8 JSON)")
        return error_response(exc.status_code, _HTTP_TYPES.get(exc.status_code, "http_error"), str(exc.detail),
                              headers=getattr(exc, "headers", None))

    @app.exception_handler(EngineError)
    async def _engine(request: Request, exc: EngineError):
        headers = retry_after_header(exc)
        if exc.code >= 500:  # 500: something broke (error); 503/504: load or lifecycle (warning)
            request_id = getattr(request.state, "request_id", "-")
            log.log(logging.ERROR if exc.code == 500 else logging.WARNING, "request %s failed: %s", request_id,
                    exc.message, extra={"request_id": request_id, "status": exc.code})
        return error_response(exc.code, exc.type, exc.message, headers)

    @app.exception_handler(ClientClosed)
    async def _client_closed(request: Request, exc: ClientClosed):
        return error_response(CLIENT_CLOSED, "client_closed_request", "the client closed the connection")
