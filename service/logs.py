"""Logging setup for the server: plain text or JSON lines, one record per line.

`configure(level, fmt)` installs one stderr handler on the root logger (uvicorn's loggers propagate to
it). With fmt="json" every record is one JSON object: ts (ISO 8601, UTC), level, logger, message, and
the structured fields a caller passes through `extra=` (see FIELDS: request_id, episode_id, method, route,
status, duration_ms, tokens ...). The access log (logger "agentprm.access", written by the API middleware)
carries only those fields: request bodies are never logged.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone

# Structured fields copied from a record's `extra` into the JSON object (and appended to text lines).
FIELDS = ("request_id", "episode_id", "method", "route", "path", "status", "duration_ms", "prompt_tokens",
          "computed_tokens", "cached_tokens", "client", "event", "inflight", "exit_code")


def _fields(record: logging.LogRecord) -> dict:
    return {name: getattr(record, name) for name in FIELDS if getattr(record, name, None) is not None}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
               "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage()}
        out.update(_fields(record))
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    def __init__(self):
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extra = _fields(record)
        if extra and record.name == "agentprm.access":
            return line + " " + " ".join(f"{k}={v}" for k, v in extra.items())
        return line


def configure(level: str = "info", fmt: str = "text", stream=None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):  # let uvicorn's records reach our handler
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
