"""`agentprm rollout`: the JSONL it writes, determinism across worker counts, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("minigrid", reason="needs the envs extra (minigrid)")

from envs.babyai import ACTIONS  # noqa: E402
from envs.cli import main as envs_main  # noqa: E402
from envs.rollout import episode_seed  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
LEVELS = "BabyAI-GoToObj-v0,BabyAI-PickupLoc-v0"


def read_jsonl(path: Path) -> list[dict]:
    with open(path) as handle:
        return [json.loads(line) for line in handle]


def check_trajectory(obj: dict, line_no: int, policy: str) -> None:
    where = f"line {line_no}"
    assert isinstance(obj["task"], str) and obj["task"], where
    assert isinstance(obj["steps"], list) and obj["steps"], where
    for step in obj["steps"]:
        assert isinstance(step["observation"], str) and step["observation"], where
        assert isinstance(step["action"], str) and step["action"], where
    assert isinstance(obj["reward"], float) and 0.0 <= obj["reward"] <= 1.0, where
    meta = obj["meta"]
    assert meta["env"] == "babyai" and meta["level"] in LEVELS.split(","), where
    assert isinstance(meta["seed"], int) and meta["policy"] == policy, where


def test_cli_writes_valid_trajectories_identically_for_any_worker_count(tmp_path, capsys):
    one = tmp_path / "one.jsonl"
    args = ["rollout", "--levels", LEVELS, "--episodes", "6", "--policy", "noisy", "--epsilon", "0.3",
            "--seed", "5", "--quiet"]
    assert envs_main([*args, "--workers", "1", "--out", str(one)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["episodes"] == 12 and set(summary["levels"]) == set(LEVELS.split(","))

    trajectories = read_jsonl(one)
    assert len(trajectories) == 12
    for line_no, obj in enumerate(trajectories, 1):
        check_trajectory(obj, line_no, "noisy")
        assert obj["meta"]["epsilon"] == 0.3
        assert all(s["action"] in ACTIONS for s in obj["steps"])
    # episode i of each level uses the seed derived from (base seed, i), recorded in meta.seed
    for level in LEVELS.split(","):
        seeds = [t["meta"]["seed"] for t in trajectories if t["meta"]["level"] == level]
        assert seeds == [episode_seed(5, i) for i in range(6)]
    rates = {level: stats["success_rate"] for level, stats in summary["levels"].items()}
    for level, rate in rates.items():
        rewards = [t["reward"] for t in trajectories if t["meta"]["level"] == level]
        assert rate == pytest.approx(sum(rewards) / len(rewards), abs=1e-4)

    # the same run over two spawned worker processes, through `python -m envs.cli`, writes the same bytes
    two = tmp_path / "two.jsonl"
    result = subprocess.run([sys.executable, "-m", "envs.cli", *args, "--workers", "2", "--out", str(two)],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert two.read_bytes() == one.read_bytes()
    assert not list(tmp_path.glob("*.partial"))


def test_agentprm_rollout_is_registered_and_expert_data_is_all_successes(tmp_path):
    from service.cli import main as agentprm_main

    out = tmp_path / "expert.jsonl"
    assert agentprm_main(["rollout", "--levels", LEVELS, "--episodes", "3", "--policy", "expert",
                          "--quiet", "--out", str(out)]) == 0
    trajectories = read_jsonl(out)
    assert len(trajectories) == 6
    for line_no, obj in enumerate(trajectories, 1):
        check_trajectory(obj, line_no, "expert")
        assert obj["reward"] == 1.0


def test_bad_input_exits_2_with_a_message_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "bad.jsonl"
    assert envs_main(["rollout", "--levels", "BabyAI-NoSuchLevel-v0", "--out", str(out), "--quiet"]) == 2
    assert "unknown BabyAI level 'BabyAI-NoSuchLevel-v0'" in capsys.readouterr().err
    assert envs_main(["rollout", "--policy", "noisy", "--epsilon", "2", "--out", str(out), "--quiet"]) == 2
    assert "epsilon" in capsys.readouterr().err
    assert not out.exists()
