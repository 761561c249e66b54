"""bench/soak.py end to end for a few seconds on a tiny checkpoint: the report accounts for every request.

No timing or memory assertions (those figures live in bench/SOAK.md); this checks that the harness counts
what it sent, that the server's access log yields a latency for every 200 the client saw, and that the
drain after SIGTERM is recorded.
"""

from __future__ import annotations

import json

import pytest

from bench import soak

pytestmark = pytest.mark.timeout(180)


def test_a_short_soak_reports_every_request_and_the_drain(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "SOAK.md"
    assert soak.main(["--model", str(tiny_checkpoint), "--duration-s", "4", "--capacity-s", "2", "--warmup-s", "1",
                      "--concurrency", "4", "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert sum(summary["codes"].values()) == summary["sent"] > 0
    assert set(summary["codes"]) <= {"200", "429"}
    served = summary["codes"]["200"]
    assert served > 0 and summary["latency_s"]["n"] == summary["server_latency_s"]["n"] == served
    assert summary["server_latency_s"]["p50"] <= summary["latency_s"]["p50"] + 1.0
    assert summary["drain_exit_code"] == 0
    assert summary["rss_mib"]["end"] > 0 and summary["rss_by_minute_mib"]
    text = out.read_text()
    assert "the same 200s in the server's access log" in text and "RSS growth after warm-up" in text


def test_by_minute_takes_the_first_sample_of_each_minute_then_the_last():
    mib = 2**20
    samples = [(t * 2.0, (1000 + t) * mib) for t in range(70)]  # 0..138 s
    assert soak.by_minute(samples) == [1030, 1060, 1069]
    assert soak.by_minute([]) == []
