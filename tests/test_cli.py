"""The `agentprm` command line: offline scoring equals the engine, model tools, one-line user errors."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from service.cli import build_parser, main
from service.engine.engine import EngineConfig, PRMEngine
from tests.conftest import REPO, free_port, make_trajectory, stop_server, trajectory_json, wait_ready


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
    assert again.returncode == 2 and "already exists (pass --overwrite" in again.stderr


def test_serve_flags_fall_back_to_environment(monkeypatch):
    from service.cli import _settings_from_args, build_parser

    monkeypatch.setenv("AGENTPRM_MAX_WAIT_MS", "7.5")
    monkeypatch.setenv("AGENTPRM_PORT", "9001")
    args = build_parser().parse_args(["serve", "--port", "9100"])
    settings = _settings_from_args(args)
    assert settings.max_wait_ms == 7.5 and settings.port == 9100  # flag beats env, env beats default


def agentprm(*args: str, cwd, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """The installed `agentprm` script (what a user runs), from `cwd`."""
    script = Path(sys.executable).with_name("agentprm")
    cmd = [str(script)] if script.is_file() else [sys.executable, "-m", "service.cli"]
    return subprocess.run([*cmd, *args], cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True,
                          text=True, timeout=timeout)


def test_a_port_in_use_is_one_line_exit_1_and_no_banner(tiny_checkpoint, tmp_path):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = agentprm("serve", "--model", str(tiny_checkpoint), "--port", str(port), "--device", "cpu",
                          cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    assert "serving" not in result.stdout  # nothing is announced that is not true
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert f"cannot bind 127.0.0.1:{port}" in lines[0] and "--port" in lines[0]


def test_names_and_paths_behave_the_same_outside_the_repository(tmp_path):
    """From a directory outside the checkout: a checkpoint written into a relative store without a matching
    manifest name is verified, served and requested by the reference the user typed."""
    work = tmp_path / "elsewhere"
    work.mkdir()
    made = agentprm("model", "init-random", "my-store/noname/1", "--name", "pvm-prm", "--layers", "1", "--hidden",
                    "32", "--heads", "2", "--kv-heads", "1", cwd=work)
    assert made.returncode == 0, made.stderr
    verified = agentprm("model", "verify", "noname:1", "--store", "my-store", cwd=work)
    assert verified.returncode == 0 and "ok: pvm-prm:1" in verified.stdout, verified.stderr

    port = free_port()
    proc = subprocess.Popen([str(Path(sys.executable).with_name("agentprm")), "serve", "--store", "my-store",
                             "--model", "noname:1", "--port", str(port), "--device", "cpu", "--log-level", "warning"],
                            cwd=work, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc, timeout=180)  # a busy shared machine can take a minute to import and load
        body = {"trajectories": [trajectory_json("go to the red ball", 2)]}
        codes = {name: httpx.post(f"{url}/v1/score", json={**body, "model": name}, timeout=30).status_code
                 for name in ("noname:1", "noname", "pvm-prm:1", "pvm-prm", "default", "other:1")}
        aliases = httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["aliases"]
    finally:
        stop_server(proc)
    assert codes == {"noname:1": 200, "noname": 200, "pvm-prm:1": 200, "pvm-prm": 200, "default": 200,
                     "other:1": 404}
    assert {"default", "noname:1", "noname"} <= set(aliases)


def test_score_takes_model_default_like_the_http_api(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps(trajectory_json("go to the red ball", 2)) + "\n")
    result = agentprm("score", str(src), "--model", "default", "--device", "cpu", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert len(json.loads(result.stdout)["steps"]) == 2


def test_a_malformed_jsonl_line_is_reported_once_clearly(tiny_checkpoint, tmp_path, capsys):
    src = tmp_path / "bad.jsonl"
    src.write_text(json.dumps(trajectory_json("t", 1)) + "\n" + '{"task": "t", "steps": [\n')
    assert main(["score", str(src), "--model", str(tiny_checkpoint)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"agentprm: error: {src}:2: not valid JSON (Expecting value at column 25)"


def test_model_init_random_help_describes_every_option():
    def subparser(parser, name):
        choices = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
        return choices[name]

    init_random = subparser(subparser(build_parser(), "model"), "init-random")
    undocumented = [a.dest for a in init_random._actions if a.dest != "help" and not a.help]
    assert not undocumented, undocumented
    assert "longest sequence served" in init_random.format_help()
