"""The benchmark harness end to end in --quick mode: ours, the OpenRLHF-style server and naive scoring.

One run on a tiny random checkpoint (servers on 127.0.0.1): the report holds a row for every system,
workload and concurrency; the OpenRLHF-style server (HF Qwen2Model, left padding, micro-batches) serves the
same promises as ours on the same sequences; naive per-step scoring agrees too but computes more tokens
than ours on the agent loop. No timing assertions: speed lives in bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import re

import pytest

from bench.cli import add_arguments, run_bench
from model_store.export import init_random

SYSTEMS = ("ours", "openrlhf", "naive")
WORKLOADS = ("W1", "W2", "W3")
CONCURRENCY = (1, 8)
TOL = 1e-5

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    ckpt = root / "tiny"
    init_random(ckpt, name="bench-tiny", version="1", layers=2, hidden=64, heads=2, kv_heads=1, intermediate=128,
                seed=3, max_seq_len=2048)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--quick", "--systems", ",".join(SYSTEMS), "--models", str(ckpt),
                              "--out", str(root / "RESULTS.md"), "--json", str(root / "results.json"),
                              "--work-dir", str(root / "work"), "--concurrency", ",".join(map(str, CONCURRENCY)),
                              "--budget", "2", "--wait-quiet", "0", "--no-profile"])
    run_bench(args, log=lambda *_: None)
    return (root / "RESULTS.md").read_text(), json.loads((root / "results.json").read_text())


def _cells(data):
    (model,) = data["models"]
    return {(c["system"], c["workload"], c["concurrency"]): c for c in model["cells"]}


def test_report_has_every_system_workload_and_concurrency(run):
    text, _ = run
    for workload in WORKLOADS:
        section = text.split(f"### {workload}:", 1)[1].split("\n### ", 1)[0]
        for system in SYSTEMS:
            for c in CONCURRENCY:
                row = re.search(rf"^\| {system} \| {c} \| (\d+)/(\d+) \((\d+)\) \| ([\d.,]+) \|", section, re.M)
                assert row, f"no {system} c={c} row in the {workload} table"
                assert int(row.group(1)) >= 1 and float(row.group(4).replace(",", "")) > 0
    assert "### Targets" in text and "W3 throughput >= 10x OpenRLHF-style" in text
    assert "fp32 matmul peak" in text and "GFLOP/s" in text


def test_every_cell_ran_and_sent_the_same_requests(run):
    _, data = run
    cells = _cells(data)
    for system in SYSTEMS:
        for workload in WORKLOADS:
            for c in CONCURRENCY:
                cell = cells[(system, workload, c)]
                assert cell["error"] is None, cell["error"]
                assert cell["sent"] == len(cell["outputs"]) >= 1


@pytest.mark.parametrize("peer", ["openrlhf", "naive"])
def test_served_promises_equal_ours(run, peer):
    _, data = run
    cells = _cells(data)
    compared = 0
    for workload in WORKLOADS:
        for c in CONCURRENCY:
            ours, other = cells[("ours", workload, c)]["outputs"], cells[(peer, workload, c)]["outputs"]
            for key in set(ours) & set(other):
                for a, b in zip(ours[key], other[key], strict=True):
                    assert len(a) == len(b) >= 1
                    assert max(abs(x - y) for x, y in zip(a, b)) <= TOL, (workload, c, key)
                compared += 1
    assert compared >= 2 * len(WORKLOADS)


def test_incremental_scoring_reuses_the_history_and_reports_the_new_step(run):
    _, data = run
    cells = _cells(data)
    for c in CONCURRENCY:
        w4 = cells[("ours", "W4", c)]
        assert w4["error"] is None and w4["sent"] >= 1
        assert all(len(rows) == 1 and len(rows[0]) == 1 for rows in w4["outputs"].values())  # the new step's promise
        assert w4["computed_tokens"] < w4["workload_tokens"]  # the cross-request cache served the history


def test_ours_computes_fewer_tokens_than_naive_on_the_agent_loop(run):
    _, data = run
    cells = _cells(data)
    for c in CONCURRENCY:
        ours, naive = cells[("ours", "W3", c)], cells[("naive", "W3", c)]
        assert ours["computed_tokens"] / ours["sent"] < naive["computed_tokens"] / naive["sent"]
        # ...and every peer ran every token it was sent: computed == the workload's tokens for OpenRLHF-style.
        rl = cells[("openrlhf", "W3", c)]
        assert rl["computed_tokens"] == rl["workload_tokens"]
