"""Training checkpoints: save every N optimizer steps, resume exactly where a run stopped.

A training checkpoint is a directory `CHECKPOINT_DIR/step-000120/` holding

    rank-00000.safetensors ...   this process's share of the trainable weights (its FSDP shard, or the full
                                 tensor under DDP / one process), the AdamW state of those weights
                                 ("optim/<name>/exp_avg", ...), and the best weights kept for early stopping
                                 ("best/<name>")
    state.json                   the data position (epoch, batch), the scheduler, the Python/NumPy/torch RNG
                                 states, the step history and evaluations, the early-stopping counters, and a
                                 fingerprint of the run (world size, parallel mode, data hash, config)

and `CHECKPOINT_DIR/latest` names the newest complete one (written last, so a crash mid-save leaves the
previous checkpoint as `latest`). Only the two newest checkpoints are kept.

Why not torch.distributed.checkpoint's file format: its metadata file is a pickle, and this project never
unpickles. Each rank's share is a plain safetensors file instead, so a resume needs the same world size and
parallel mode (checked against the fingerprint, with a clear error). Weights that are not trained (a LoRA
run's frozen base) are not saved: the resumed run rebuilds them from the same --init and seed.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

LATEST = "latest"
KEEP = 2


class ResumeError(ValueError):
    """A training checkpoint cannot be resumed by this run; the message says why."""


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's share of a (possibly sharded) tensor, on the CPU."""
    if hasattr(t, "to_local"):  # DTensor (FSDP2)
        t = t.to_local()
    return t.detach().to("cpu").contiguous().clone()


def _assign_local(target: torch.Tensor, value: torch.Tensor) -> None:
    local = target.to_local() if hasattr(target, "to_local") else target
    if tuple(local.shape) != tuple(value.shape):
        raise ResumeError(f"a saved shard has shape {tuple(value.shape)}, this run's has {tuple(local.shape)} "
                          "(was the checkpoint written with another world size or model?)")
    with torch.no_grad():
        local.copy_(value.to(local.device, local.dtype))


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {"python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
            "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
            "torch": torch.get_rng_state().tolist()}


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))


@dataclass
class Checkpointer:
    directory: Path
    every: int  # optimizer steps between checkpoints; 0 = only when a run stops early (stop_after)
    rank: int = 0
    world: int = 1

    def __post_init__(self):
        self.directory = Path(self.directory)

    # -- saving ------------------------------------------------------------------------------------------
    def save(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict,
             best_state: dict[str, torch.Tensor] | None) -> Path:
        """Write this rank's share and (rank 0) state.json; a collective when world > 1."""
        final = self.directory / f"step-{step:06d}"
        tmp = self.directory / f".step-{step:06d}.partial"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self._barrier()
        names = {id(p): n for n, p in model.named_parameters()}
        tensors = {f"model/{n}": _local(p) for n, p in model.named_parameters() if p.requires_grad}
        for param, slots in optimizer.state.items():
            for slot, value in slots.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"optim/{names[id(param)]}/{slot}"] = _local(value)
        for n, value in (best_state or {}).items():
            tensors[f"best/{n}"] = _local(value)
        save_file(tensors, str(tmp / f"rank-{self.rank:05d}.safetensors"))
        if self.rank == 0:
            (tmp / "state.json").write_text(json.dumps({**state, "rng": rng_state()}) + "\n")
        self._barrier()
        if self.rank == 0:
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            (self.directory / f".{LATEST}.tmp").write_text(final.name + "\n")
            (self.directory / f".{LATEST}.tmp").rename(self.directory / LATEST)
            for old in sorted(self.directory.glob("step-*"))[:-KEEP]:
                shutil.rmtree(old, ignore_errors=True)
        self._barrier()
        return final

    # -- loading -----------------------------------------------------------------------------------------
    def latest(self) -> Path | None:
        pointer = self.directory / LATEST
        if not pointer.is_file():
            return None
        path = self.directory / pointer.read_text().strip()
        return path if (path / "state.json").is_file() else None

    def load(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, fingerprint: dict
             ) -> tuple[dict, dict[str, torch.Tensor] | None]:
        """Restore weights, optimizer state and RNG in place; returns (state.json, best weights or None)."""
        path = self.latest()
        if path is None:
            raise ResumeError(f"{self.directory}: no training checkpoint to resume (no '{LATEST}' file)")
        state = json.loads((path / "state.json").read_text())
        saved = state.get("fingerprint", {})
        different = {k: (saved.get(k), v) for k, v in fingerprint.items() if saved.get(k) != v}
        if different:
            details = "; ".join(f"{k}: checkpoint {a!r}, this run {b!r}" for k, (a, b) in different.items())
            raise ResumeError(f"{path}: written by a different run ({details})")
        shard = path / f"rank-{self.rank:05d}.safetensors"
        if not shard.is_file():
            raise ResumeError(f"{shard}: missing (the checkpoint is incomplete)")
        tensors = load_file(str(shard))
        params = dict(model.named_parameters())
        trainable = {n for n, p in params.items() if p.requires_grad}
        saved_names = {k.removeprefix("model/") for k in tensors if k.startswith("model/")}
        if saved_names != trainable:
            raise ResumeError(f"{path}: the saved weights do not match this model's trainable weights "
                              f"(e.g. {sorted(saved_names ^ trainable)[:3]})")
        for n in trainable:
            _assign_local(params[n], tensors[f"model/{n}"])
        self._load_optimizer(optimizer, params, tensors)
        best = {k.removeprefix("best/"): v for k, v in tensors.items() if k.startswith("best/")}
        set_rng_state(state["rng"])
        return state, (best or None)

    def _load_optimizer(self, optimizer, params: dict, tensors: dict) -> None:
        names = {id(p): n for n, p in params.items()}
        for group in optimizer.param_groups:
            for p in group["params"]:
                name = names[id(p)]
                slots = {k.rsplit("/", 1)[1]: v for k, v in tensors.items()
                         if k.startswith(f"optim/{name}/")}
                if slots:
                    optimizer.state[p] = {slot: (v if slot == "step" else self._like(p, v)) for slot, v in slots.items()}

    @staticmethod
    def _like(param: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
        """A tensor laid out like `param` (a DTensor shard for FSDP) from this rank's saved share."""
        if hasattr(param, "to_local"):
            from torch.distributed.tensor import DTensor

            return DTensor.from_local(local.to(param.to_local().device), param.device_mesh, param.placements,
                                      shape=param.shape, stride=param.stride())
        return local.to(param.device)

    def _barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()
