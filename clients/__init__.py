"""Python SDK for AgentPRM Serve: `PRMClient` (sync) and `AsyncPRMClient` (async), over httpx."""

from clients.sdk import AsyncPRMClient, PRMClient, PRMConnectionError, PRMError

__all__ = ["PRMClient", "AsyncPRMClient", "PRMError", "PRMConnectionError"]
