"""One rank of the 2-process FSDP tests (started by tests/training/test_scale_distributed.py).

In one process group (gloo, file rendezvous) it runs, on the fork data:
  full    FSDP fp32 with activation checkpointing, Qwen2, 2 epochs: per-step losses and the exported weights;
  resumed the same run stopped after 3 steps (sharded checkpoint) and resumed by a fresh trainer;
  bf16    FSDP with bf16 decoder layers, Llama: per-step losses.
Rank 0 writes the results to OUT (losses as JSON, weights as safetensors).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from tests.training.scale_setup import setup, trainer
from training.sharding import ScaleConfig
from training.trainer import init_distributed


def run(arch: str, folder: Path, scale: ScaleConfig, info, **config):
    init, train_ex, val_ex = setup(arch, folder)
    t = trainer(init, info, scale, **config)
    result = t.fit(train_ex, val_ex)
    return t, result


def main(folder: str, out: str) -> None:
    folder, out = Path(folder), Path(out)
    info = init_distributed("cpu", f"file://{folder.resolve() / 'rendezvous'}")
    report = {}
    t, result = run("qwen2", folder, ScaleConfig(parallel="fsdp", activation_checkpointing=True), info)
    report["full"] = [h["loss"] for h in result.history]
    report["full_evals"] = [e["val_loss"] for e in result.evals]
    full = t.export_model()

    checkpoints = str(folder / "checkpoints")
    _, first = run("qwen2", folder, ScaleConfig(parallel="fsdp", activation_checkpointing=True,
                                                checkpoint_dir=checkpoints, stop_after=3), info)
    report["first_interrupted"] = first.interrupted
    t, result = run("qwen2", folder, ScaleConfig(parallel="fsdp", activation_checkpointing=True,
                                                 checkpoint_dir=checkpoints, resume=True), info)
    report["resumed"] = [h["loss"] for h in result.history]
    resumed = t.export_model()
    report["shards"] = sorted(p.name for p in (Path(checkpoints) / "step-000003").iterdir())

    _, result = run("llama", folder, ScaleConfig(parallel="fsdp"), info, precision="bf16")
    report["bf16"] = [h["loss"] for h in result.history]
    if info.main:
        save_file({k: v.contiguous() for k, v in full.state_dict().items()}, str(out / "full.safetensors"))
        save_file({k: v.contiguous() for k, v in resumed.state_dict().items()}, str(out / "resumed.safetensors"))
        (out / "report.json").write_text(json.dumps(report))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
