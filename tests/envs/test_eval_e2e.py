"""End to end, small: `agentprm eval run` does rollout -> train -> serve -> rerank and beam search -> results
table, on two BabyAI levels with a tiny model and one `agentprm serve` on 127.0.0.1."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("minigrid", reason="needs the envs extra (minigrid)")
pytest.importorskip("matplotlib", reason="needs the envs extra (matplotlib)")

from envs.evaluate import read_jsonl  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
LEVELS = ["BabyAI-GoToObj-v0", "BabyAI-OpenRedDoor-v0"]
NS = [1, 2, 4]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval")
    work, out = tmp / "work", tmp / "results"
    cmd = [sys.executable, "-m", "envs.cli", "eval", "run", "--levels", ",".join(LEVELS), "--episodes", "6",
           "--horizon", "12", "--test-episodes", "2", "--ns", ",".join(map(str, NS)), "--beams", "2x2",
           "--methods", "agentprm", "--layers", "1", "--hidden", "32", "--epochs", "1", "--work", str(work),
           "--out", str(out), "--quiet"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return work, out, json.loads((out / "summary.json").read_text())


def test_pipeline_trains_on_its_rollouts_and_writes_a_results_table(run):
    work, out, summary = run
    train = read_jsonl(work / "train.jsonl")
    assert len(train) == 6 * len(LEVELS)
    assert {t["meta"]["level"] for t in train} == set(LEVELS)
    assert all(len(t["steps"]) <= 12 and t["meta"]["horizon"] == 12 for t in train)
    manifest = json.loads((work / "checkpoints" / "agentprm" / "manifest.json").read_text())
    assert manifest["training"]["method"] == "agentprm"
    assert manifest["training"]["data"]["sha256"] == summary["data"]["sha256"]

    readme = (out / "README.md").read_text()
    bon_header = next(line for line in readme.splitlines() if line.startswith("| verifier | labelling"))
    assert [int(n) for n in re.findall(r"N=(\d+)", bon_header)] == NS
    for row in ("| AgentPRM |", "| random choice |", "| oracle (any success) |", "| expert (policy ceiling) |"):
        assert row in readme, row
    assert "2x2" in readme and "agentprm train --data" in readme
    for png in ("bon.png", "beam.png"):
        assert (out / png).read_bytes()[:8] == PNG_MAGIC


def test_held_out_seeds_are_disjoint_from_training_seeds(run):
    work, _, summary = run
    train = {(t["meta"]["level"], t["meta"]["seed"]) for t in read_jsonl(work / "train.jsonl")}
    held = {tuple(pair) for pair in summary["heldout"]["seeds"]}
    assert len(held) == 2 * len(LEVELS)
    assert not held & train


def test_rates_are_counts_over_the_held_out_episodes_with_intervals_around_them(run):
    _, _, summary = run
    n = summary["heldout"]["episodes"]
    rows = [summary["methods"]["agentprm"]["bon"][str(k)] for k in NS]
    rows += [summary["baselines"][b]["bon"][str(k)] for b in ("random", "oracle") for k in NS]
    rows += [summary["methods"]["agentprm"]["beam"]["2x2"], summary["baselines"]["random"]["beam"]["2x2"],
             summary["baselines"]["expert"]]
    for r in rows:
        assert r["n"] == n and 0 <= r["successes"] <= n
        assert r["rate"] == pytest.approx(r["successes"] / n)
        assert r["ci95"][0] <= r["rate"] + 1e-9 and r["rate"] <= r["ci95"][1] + 1e-9
    oracle = [summary["baselines"]["oracle"]["bon"][str(k)]["successes"] for k in NS]
    assert oracle == sorted(oracle)  # more samples can only add a success
    # no verifier can beat "any of the N succeeded"
    for k in NS:
        assert summary["methods"]["agentprm"]["bon"][str(k)]["successes"] <= \
            summary["baselines"]["oracle"]["bon"][str(k)]["successes"]
    assert summary["baselines"]["expert"]["successes"] == n  # the bot solves these levels within 12 steps
    assert summary["methods"]["agentprm"]["labelling_env_steps"] == 0
