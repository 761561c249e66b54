"""FSDP2 on the CPU: 2 gloo processes (tests/training/fsdp_worker.py) against 1 process on the same global batches.

- fp32 FSDP with activation checkpointing follows the 1-process loss curve and ends with its weights;
- a sharded training checkpoint written after step 3 and resumed by fresh trainers ends with the
  uninterrupted FSDP run's weights, bit for bit;
- bf16 decoder layers (fp32 master weights and value head) on a Llama backbone follow the fp32 curve within
  bf16 rounding.
The ranks meet through a file store (no rendezvous port); gloo talks over the loopback interface only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
from safetensors.torch import load_file

from tests.conftest import REPO
from tests.training.scale_setup import fork_file, setup, trainer
from training.sharding import ScaleConfig


def test_fsdp_follows_one_process_resumes_exactly_and_trains_in_bf16(tmp_path):
    fork_file(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "WORLD_SIZE": "2", "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "tests.training.fsdp_worker", str(tmp_path), str(out)]
    procs = [subprocess.Popen(cmd, cwd=REPO, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    # the 1-process references, while the workers run
    init, train_ex, val_ex = setup("qwen2", tmp_path)
    one = trainer(init, scale=ScaleConfig(activation_checkpointing=True))
    one_result = one.fit(train_ex, val_ex)
    init, train_ex_llama, val_ex_llama = setup("llama", tmp_path)
    llama = trainer(init).fit(train_ex_llama, val_ex_llama)
    try:
        outputs = [p.communicate(timeout=600)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], outputs
    report = json.loads((out / "report.json").read_text())

    one_losses = [h["loss"] for h in one_result.history]
    assert len(report["full"]) == len(one_losses) == 10
    for a, b in zip(one_losses, report["full"]):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(a)), (a, b)
    for a, b in zip([e["val_loss"] for e in one_result.evals], report["full_evals"]):
        assert abs(a - b) <= 1e-5
    full = load_file(str(out / "full.safetensors"))
    reference = one.export_model().state_dict()
    assert full.keys() == reference.keys()  # plain names: no FSDP or checkpoint-wrapper prefixes
    for name in full:
        torch.testing.assert_close(full[name], reference[name], rtol=1e-4, atol=1e-5)

    assert report["first_interrupted"] and report["shards"] == ["rank-00000.safetensors", "rank-00001.safetensors",
                                                                "state.json"]
    assert report["resumed"] == report["full"]
    resumed = load_file(str(out / "resumed.safetensors"))
    for name in full:
        assert torch.equal(full[name], resumed[name]), name

    fp32 = [h["loss"] for h in llama.history]
    assert len(report["bf16"]) == len(fp32) == 10
    for a, b in zip(fp32, report["bf16"]):  # bf16 keeps ~3 significant digits of each layer's output
        assert abs(a - b) <= 0.05 * abs(a) + 1e-3, (fp32, report["bf16"])
    assert report["bf16"] != fp32  # the layers really computed in bf16
