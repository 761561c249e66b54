"""Fixtures of the reliability tests: one real `agentprm serve` process with API keys and small limits."""

from __future__ import annotations

import pytest

from tests.conftest import start_server, stop_server
from tests.reliability.helpers import API_KEY

# Small bounds so a modest burst overloads the server, and small request limits so fuzzing stays cheap.
KEYED_FLAGS = ("--api-key", API_KEY, "--max-queue-jobs", "32", "--max-inflight-requests", "48",
               "--max-trajectories", "8", "--max-candidates", "16", "--max-batch-tokens", "1024",
               "--max-wait-ms", "2")


@pytest.fixture(scope="session")
def keyed_server(tiny_checkpoint):
    """A real server process on 127.0.0.1 that requires API_KEY (started once per session)."""
    proc, url = start_server(tiny_checkpoint, *KEYED_FLAGS)
    yield url
    stop_server(proc)
