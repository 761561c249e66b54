"""Schemathesis against the live server's /openapi.json (a real `agentprm serve` process, API key set).

Every operation is fuzzed with schema-valid (positive) and schema-invalid (negative) requests: no
response is a 5xx (a 504 is allowed only for a request that set its own timeout_s), every status code is one the schema declares, every body and content type matches
the schema, and invalid input is rejected with a 4xx. The default suite runs AGENTPRM_FUZZ_EXAMPLES
(default 20) cases per operation and mode with a fixed seed; `make fuzz` runs many more, randomly.
"""

from __future__ import annotations

import os

import pytest

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is not installed (pip install schemathesis)")

import requests  # noqa: E402  (installed with schemathesis)
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (content_type_conformance, negative_data_rejection,  # noqa: E402
                                               response_headers_conformance, response_schema_conformance,
                                               status_code_conformance)

from tests.reliability.helpers import AUTH  # noqa: E402

EXAMPLES = int(os.environ.get("AGENTPRM_FUZZ_EXAMPLES", "20"))
RANDOM = os.environ.get("AGENTPRM_FUZZ_RANDOM", "") == "1"


@schemathesis.check
def no_server_error(ctx, response, case):
    """not_a_server_error, except a 504 for a request that chose its own (tiny) deadline with timeout_s."""
    if response.status_code == 504 and isinstance(case.body, dict) and case.body.get("timeout_s") is not None:
        assert response.json()["error"]["type"] == "deadline_exceeded"
        return None
    return not_a_server_error(ctx, response, case)


CHECKS = [no_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance]


def test_fuzz_every_operation_of_the_live_schema(keyed_server):
    schema = schemathesis.openapi.from_url(f"{keyed_server}/openapi.json", headers=AUTH, timeout=30)
    operations = [result.ok() for result in schema.get_all_operations()]
    labels = {op.label for op in operations}
    assert {"POST /v1/score", "POST /v1/rerank", "POST /v1/beam-expand", "POST /v1/reward", "GET /v1/models",
            "GET /health", "GET /ready", "GET /metrics"} <= labels
    counts: dict[str, int] = {}
    with requests.Session() as session:
        for op in operations:
            has_input = bool(op.body) or any(True for _ in op.iter_parameters())
            modes = [schemathesis.GenerationMode.POSITIVE] + ([schemathesis.GenerationMode.NEGATIVE] if has_input
                                                              else [])  # nothing to make invalid in a bare GET
            for mode in modes:
                checks = CHECKS + ([negative_data_rejection] if mode == schemathesis.GenerationMode.NEGATIVE
                                   else [])

                @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=not RANDOM,
                          phases=[Phase.explicit, Phase.generate, Phase.shrink],
                          suppress_health_check=list(HealthCheck))
                @given(case=op.as_strategy(generation_mode=mode))
                def fuzz(case):
                    counts[op.label] = counts.get(op.label, 0) + 1
                    case.call_and_validate(session=session, headers=AUTH, checks=checks, timeout=60)

                fuzz()
    total = sum(counts.values())
    print(f"\nfuzz: {total} cases over {len(counts)} operations: {dict(sorted(counts.items()))}")
    assert total >= len(operations) * 2  # every operation really was exercised
