"""The `agentprm` command line: offline scoring equals the engine, model tools, one-line user errors."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest

from service.cli import main
from service.engine.engine import EngineConfig, PRMEngine
from tests.conftest import REPO, make_trajectory, trajectory_json


def test_score_file_offline_matches_the_engine(tiny_checkpoint, tmp_path):
    src = tmp_path / "in.jsonl"
    trajs = [trajectory_json("go to the red ball", n, seed=n) for n in (1, 3, 5)]
    src.write_text("".join(json.dumps(t) + "\n" for t in trajs))
    out = tmp_path / "out.jsonl"
    assert main(["score", str(src), "--model", str(tiny_checkpoint), "--out", str(out), "--device", "cpu"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [len(r["steps"]) for r in rows] == [1, 3, 5]

    engine = PRMEngine.from_checkpoint(tiny_checkpoint, EngineConfig(device="cpu"))

    async def direct():
        await engine.start()
        try:
            return await engine.score("default", [make_trajectory("go to the red ball", 5, seed=5)])
        finally:
            await engine.shutdown()

    expected = asyncio.run(direct()).results[0]
    assert rows[2]["score"] == pytest.approx(expected.score, abs=1e-6)


def test_score_reports_the_bad_line(tiny_checkpoint, tmp_path, capsys):
    src = tmp_path / "bad.jsonl"
    src.write_text(json.dumps(trajectory_json("t", 1)) + "\n" + '{"task": "t", "steps": [{"action": 1}]}\n')
    assert main(["score", str(src), "--model", str(tiny_checkpoint)]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:2" in err and "observation" in err and "Traceback" not in err


def test_model_init_random_verify_and_list(tmp_path):
    store = tmp_path / "store"
    out = store / "mini" / "3"
    cmd = [sys.executable, "-m", "service.cli"]
    run = lambda *a: subprocess.run([*cmd, *a], cwd=REPO, capture_output=True, text=True, timeout=120)
    made = run("model", "init-random", str(out), "--name", "mini", "--version", "3", "--layers", "1",
               "--hidden", "32", "--heads", "2", "--kv-heads", "1")
    assert made.returncode == 0, made.stderr
    verified = run("model", "verify", "mini:3", "--store", str(store))
    assert verified.returncode == 0 and "ok: mini:3" in verified.stdout
    listed = run("model", "list", "--store", str(store))
    assert "mini:3" in listed.stdout
    (out / "value_head.safetensors").write_bytes(b"garbage")
    broken = run("model", "verify", str(out))
    assert broken.returncode == 2
    assert "value_head.safetensors: sha256 mismatch" in broken.stderr and "Traceback" not in broken.stderr
    again = run("model", "init-random", str(out))
    assert again.returncode == 2 and "already exists" in again.stderr


def test_serve_flags_fall_back_to_environment(monkeypatch):
    from service.cli import _settings_from_args, build_parser

    monkeypatch.setenv("AGENTPRM_MAX_WAIT_MS", "7.5")
    monkeypatch.setenv("AGENTPRM_PORT", "9001")
    args = build_parser().parse_args(["serve", "--port", "9100"])
    settings = _settings_from_args(args)
    assert settings.max_wait_ms == 7.5 and settings.port == 9100  # flag beats env, env beats default
