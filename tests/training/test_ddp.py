"""DDP on the CPU: 2 gloo processes follow the loss curve of 1 process on the same global batches.

The two ranks are real `python -m training.cli train` processes started the way torchrun starts them
(RANK, WORLD_SIZE, LOCAL_RANK in the environment). They meet through a file store (no rendezvous port) and
gloo talks over the loopback interface only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
from safetensors.torch import load_file

from tests.conftest import REPO
from tests.training.synthetic import make_dataset
from training.cli import main
from training.data import write_jsonl


def read_log(path):
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [r for r in rows if "loss" in r], [r["eval"] for r in rows if "eval" in r]


def test_two_processes_follow_the_single_process_loss_curve(tmp_path):
    data = write_jsonl(make_dataset(12, 4), tmp_path / "fork.jsonl")
    # 2 epochs x 5 global batches of 8 (the 48 trajectories less a 20% validation split); a 180-token
    # micro-batch budget splits each process's share, so gradient accumulation (no_sync) is exercised too.
    common = ["train", "--data", str(data), "--method", "agentprm", "--layers", "1", "--hidden", "32",
              "--vocab", "600", "--epochs", "2", "--batch-size", "8", "--max-batch-tokens", "180", "--lr", "3e-3",
              "--val-fraction", "0.2", "--no-progress", "--max-seq-len", "512", "--precision", "fp32"]
    assert main([*common, "--out", str(tmp_path / "one"), "--log", str(tmp_path / "one.jsonl")]) == 0

    env = {**os.environ, "WORLD_SIZE": "2", "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "training.cli", *common, "--out", str(tmp_path / "two"), "--log",
           str(tmp_path / "two.jsonl"), "--dist-init", f"file://{tmp_path / 'rendezvous'}"]
    procs = [subprocess.Popen(cmd, cwd=REPO, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    try:
        outputs = [p.communicate(timeout=150)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], outputs

    one_steps, one_evals = read_log(tmp_path / "one.jsonl")
    two_steps, two_evals = read_log(tmp_path / "two.jsonl")
    assert len(one_steps) == len(two_steps) == 10
    assert [s["tokens"] for s in one_steps] == [s["tokens"] for s in two_steps]  # the same global batches
    for a, b in zip(one_steps, two_steps):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * max(1.0, abs(a["loss"])), (a, b)
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-4 * max(1.0, a["grad_norm"]), (a, b)
    for a, b in zip(one_evals, two_evals):
        assert abs(a["val_loss"] - b["val_loss"]) <= 1e-5
    one = load_file(str(tmp_path / "one" / "backbone" / "model.safetensors"))
    two = load_file(str(tmp_path / "two" / "backbone" / "model.safetensors"))
    for name in one:
        torch.testing.assert_close(one[name], two[name], rtol=1e-4, atol=1e-5)
    assert json.loads((tmp_path / "two" / "manifest.json").read_text())["training"]["world_size"] == 2
