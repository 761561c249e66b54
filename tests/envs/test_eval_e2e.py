"""End to end, small: `agentprm eval run` does rollouts -> training (two methods, two seeds) -> test set on
levels it never trained on -> serve -> rerank, beam search and the step-level check -> report, with tiny
models and one `agentprm serve` at a time on 127.0.0.1."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("minigrid", reason="needs the envs extra (minigrid)")
pytest.importorskip("matplotlib", reason="needs the envs extra (matplotlib)")

from envs.evaluate import read_jsonl  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
LEVELS = ["BabyAI-GoToObj-v0", "BabyAI-OpenRedDoor-v0"]
TEST_LEVELS = ["BabyAI-GoToObjS6-v1", "BabyAI-GoToRedBallNoDists-v0"]
NS = [1, 2, 4]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def eval_command(work: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "envs.cli", "eval", "run", "--levels", ",".join(LEVELS), "--episodes", "6",
            "--horizon", "12", "--test-levels", ",".join(TEST_LEVELS), "--test-episodes", "2",
            "--ns", ",".join(map(str, NS)), "--beams", "2x3", "--methods", "agentprm,pvm", "--train-seeds", "0,1",
            "--layers", "1", "--hidden", "32", "--epochs", "1", "--work", str(work), "--out", str(out), "--quiet",
            *extra]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval")
    work, out = tmp / "work", tmp / "results"
    proc = subprocess.run(eval_command(work, out), cwd=REPO, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return work, out, json.loads((out / "summary.json").read_text())


def test_pipeline_trains_every_method_and_seed_on_its_rollouts_and_writes_the_report(run):
    work, out, summary = run
    train = read_jsonl(work / "train.jsonl")
    assert len(train) == 6 * len(LEVELS) and {t["meta"]["level"] for t in train} == set(LEVELS)
    assert [(r["method"], r["seed"]) for r in summary["runs"]] == [("agentprm", 0), ("agentprm", 1), ("pvm", 0),
                                                                   ("pvm", 1)]
    for r in summary["runs"]:
        manifest = json.loads((Path(r["checkpoint"]) / "manifest.json").read_text())
        assert manifest["training"]["method"] == r["method"]
        assert manifest["training"]["data"]["sha256"] == summary["data"]["sha256"]
        assert manifest["training"]["gamma"] == 0.9 and f"--seed {r['seed']}" in manifest["training"]["command"]
    readme = (out / "README.md").read_text()
    for text in ("| AgentPRM |", "| PVM |", "| random scores |", "| \"move forward\" first |", "| uniform pick |",
                 "| shortest trajectory |", "| sampling policy alone |", "2x3", "agentprm train --data",
                 "## AgentPRM per level", "top action is optimal"):
        assert text in readme, text
    for png in ("bon.png", "beam.png"):
        assert (out / png).read_bytes()[:8] == PNG_MAGIC


def test_test_levels_are_not_training_levels_and_a_mixed_split_is_refused(run, tmp_path):
    work, _, summary = run
    assert {level for level, _ in summary["test"]["episodes"]} == set(TEST_LEVELS)
    assert len(summary["test"]["episodes"]) == 2 * len(TEST_LEVELS)
    bad = eval_command(tmp_path / "w", tmp_path / "o")
    bad[bad.index("--test-levels") + 1] = LEVELS[0]
    proc = subprocess.run(bad, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "also training levels" in proc.stderr and "Traceback" not in proc.stderr


def test_every_figure_is_a_rate_over_the_same_episodes_with_seed_spread_and_paired_tests(run):
    _, _, summary = run
    n_episodes, n_states = len(summary["test"]["episodes"]), summary["test"]["states"]
    assert n_states > 0
    for method in ("agentprm", "pvm"):
        entry = summary["methods"][method]
        for figure in ("beam 2x3", *(f"bon@{k}" for k in NS), *(f"bon_hard@{k}" for k in NS), "top_optimal"):
            cell = entry[figure]
            assert cell["seeds"]["n"] == 2 and cell["seeds"]["min"] <= cell["seeds"]["mean"] <= cell["seeds"]["max"]
            assert cell["pooled"]["n"] == (n_states if figure == "top_optimal" else n_episodes)
            assert 0.0 <= min(t["p"] for t in cell["paired"].values()) <= 1.0
        assert {"random", "forward", "sampler"} <= set(entry["beam 2x3"]["paired"])
        assert {"forward", "uniform"} <= set(entry["top_optimal"]["paired"])
    oracle = [summary["baseline_rates"]["oracle"][f"bon@{k}"]["rate"] for k in NS]
    assert oracle == sorted(oracle)  # more samples can only add a success
    for run_ in summary["runs"]:  # no verifier beats "any of the N succeeded"
        for k in NS:
            assert run_["rates"][f"bon@{k}"]["rate"] <= summary["baseline_rates"]["oracle"][f"bon@{k}"]["rate"]
    assert summary["baseline_rates"]["expert"]["success"]["rate"] == 1.0  # the bot solves these within 12 steps


def test_a_checkpoint_is_reused_only_for_the_same_command_on_the_same_data(run, tmp_path):
    """An interrupted or extended `eval run` picks up the checkpoints already trained in --work."""
    from envs.pipeline import TrainConfig, trained_before

    work, _, summary = run
    data = work / "train.jsonl"
    config = TrainConfig(layers=1, hidden=32, epochs=1, seeds=(0, 1))
    for r in summary["runs"]:
        ckpt = Path(r["checkpoint"])
        assert trained_before(ckpt, data, config.command(r["method"], data, ckpt, r["seed"]))
        other_seed = config.command(r["method"], data, ckpt, r["seed"] + 7)
        assert not trained_before(ckpt, data, other_seed)
    other_data = tmp_path / "train.jsonl"  # the same command, but the file's content is not what it trained on
    other_data.write_text(data.read_text().splitlines()[0] + "\n")
    ckpt = Path(summary["runs"][0]["checkpoint"])
    assert not trained_before(ckpt, other_data, config.command("agentprm", data, ckpt, 0))
    assert not trained_before(tmp_path / "missing", data, config.command("agentprm", data, tmp_path / "missing", 0))


def test_eval_steps_reproduces_the_runs_step_level_check_for_one_checkpoint(run, tmp_path):
    """`agentprm eval steps` (the step-level check alone) on the run's test episodes gives the same figures
    as the whole evaluation gave that checkpoint, and says in one line when the folder is not a checkpoint."""
    _, _, summary = run
    first = summary["runs"][0]
    out = tmp_path / "steps.json"
    proc = subprocess.run([sys.executable, "-m", "envs.cli", "eval", "steps", "--checkpoint", first["checkpoint"],
                           "--test-levels", ",".join(TEST_LEVELS), "--test-episodes", "2", "--horizon", "12",
                           "--threads", "1", "--json", str(out)], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    steps = json.loads(out.read_text())
    assert steps["states"] == summary["test"]["states"]
    assert steps["turn_states"] == len(summary["test"]["turn_levels"])
    assert steps["cued_states"] == len(summary["test"]["cued_levels"]) == len(summary["test"]["cue_rule"])
    for figure in ("top_optimal", "top_expert", "turn_direction", "turn_cued"):
        # a figure with no states (no turn state among these few) is left out of the run's rates
        assert steps["rates"][figure]["successes"] == first["rates"].get(figure, {"successes": 0})["successes"]
        assert steps["rates"][figure]["n"] == first["rates"].get(figure, {"n": 0})["n"], figure
    assert "top action is optimal" in proc.stdout and "\"move forward\" first" in proc.stdout
    bad = subprocess.run([sys.executable, "-m", "envs.cli", "eval", "steps", "--checkpoint", str(tmp_path)], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "not a checkpoint" in bad.stderr and "Traceback" not in bad.stderr
