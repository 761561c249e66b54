"""Collectives of GPU training, checked by their gloo analogue on the CPU: tensors for a reduction live where
the group's backend reduces them (NCCL: CUDA only), and rank 0's long labelling does not time out the ranks
waiting for its result (the object broadcast runs on a gloo group with its own long timeout)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
import torch.distributed as dist

from tests.conftest import REPO
from training import trainer


def test_reduction_tensors_follow_the_groups_backend(monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    for backend, device in [("nccl", torch.device("cuda", 1)), ("gloo", torch.device("cpu")),
                            ("cpu:gloo,cuda:nccl", torch.device("cpu"))]:
        monkeypatch.setattr(dist, "get_backend", lambda group=None, b=backend: b)
        assert trainer.collective_device() == device, backend


WORKER = """
import datetime, json, os, sys, time
from pathlib import Path
import torch, torch.distributed as dist
from training.trainer import broadcast_object, collective_device, init_distributed

rank, meet = int(os.environ["RANK"]), Path(sys.argv[1])
(meet / f"ready{rank}").touch()  # imports done: start the clock together
while not all((meet / f"ready{r}").exists() for r in (0, 1)):
    time.sleep(0.02)
# The default group times out after 3 s, as NCCL's does after 10 minutes.
info = init_distributed("cpu", f"file://{meet / 'store'}", timeout=datetime.timedelta(seconds=3))
if info.main:
    time.sleep(8)  # rank 0 labels (MC rollouts) far past the default group's timeout
labels = broadcast_object([0.25, 1.0] if info.main else None, info)
total = torch.tensor([rank + 1.0], device=collective_device())
dist.all_reduce(total)
print(json.dumps({"labels": labels, "total": float(total), "device": str(total.device)}))
dist.destroy_process_group()
"""


def test_ranks_wait_out_rank_zeros_labelling_past_the_default_timeout(tmp_path):
    env = {**os.environ, "WORLD_SIZE": "2", "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(tmp_path)], cwd=REPO,
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    try:
        outputs = [p.communicate(timeout=240) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outputs]
    for out, _ in outputs:
        result = json.loads(out.strip().splitlines()[-1])
        assert result == {"labels": [0.25, 1.0], "total": 3.0, "device": "cpu"}
