"""How the PRM is spread over processes: DDP replicas (small models) or FSDP2 shards (large ones).

`--parallel ddp` (the default, what the trainer always did) keeps a full replica of weights, gradients and
AdamW state on every process. `--parallel fsdp` uses PyTorch's `fully_shard` (FSDP2): every decoder layer
is its own shard group, so a process holds 1/world of the weights, gradients and AdamW state and gathers
one layer's weights at a time for its forward and backward.

Mixed precision (`--precision bf16`): each decoder layer computes in bf16 (its weights are cast when
gathered, its gradients are reduced in fp32), while the master weights, gradients and AdamW state stay fp32.
The root group (embeddings, final norm, value head) keeps fp32 compute, so the value head and the promise
are computed in fp32 as in serving. Under DDP or on one process bf16 comes from the trainer's autocast.

Activation checkpointing (`--activation-checkpointing`) wraps every decoder layer so that only its input is
kept for the backward pass and the layer is recomputed there: activation memory falls from all of a layer's
intermediate tensors to one [B, T, H] tensor per layer.

The functions here change the module in place and know nothing about data or optimizers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

PARALLEL_MODES = ("ddp", "fsdp")
PRECISIONS = ("fp32", "bf16")


@dataclass
class ScaleConfig:
    """How a run is spread, adapted, checkpointed and batched at scale (the defaults change nothing)."""

    parallel: str = "ddp"  # ddp | fsdp (used when WORLD_SIZE > 1)
    activation_checkpointing: bool = False
    lora_rank: int = 0  # 0: full fine-tuning
    lora_alpha: float | None = None
    lora_token_ids: list[int] = field(default_factory=list)  # embedding rows trained with LoRA (the markers)
    checkpoint_dir: str | None = None
    checkpoint_every: int = 0  # optimizer steps between training checkpoints (0: none)
    resume: bool = False
    stop_after: int | None = None  # stop after this many optimizer steps of this run (checkpoint, then exit)
    batch_tokens: int = 0  # >0: an optimizer step takes trajectories until this many real tokens

    def check(self) -> None:
        if self.parallel not in PARALLEL_MODES:
            raise ValueError(f"--parallel must be one of {PARALLEL_MODES}, got {self.parallel!r}")
        if self.lora_rank and self.parallel == "fsdp":
            raise ValueError("--lora-rank with --parallel fsdp is not supported: a LoRA run keeps a frozen replica "
                             "per process (use --parallel ddp)")
        if (self.resume or self.stop_after) and not self.checkpoint_dir:
            raise ValueError("--resume and --stop-after need --checkpoint-dir")
        if self.checkpoint_every < 0 or self.batch_tokens < 0 or self.lora_rank < 0:
            raise ValueError("--checkpoint-every, --batch-tokens and --lora-rank must not be negative")


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers of a PRM's backbone (transformers' `layers` ModuleList; LoRA-wrapped or not)."""
    for name, module in model.named_modules():
        if name.endswith("layers") and isinstance(module, nn.ModuleList) and len(module) > 0:
            return list(module)
    raise ValueError(f"{type(model).__name__}: no decoder layer list found (expected a `layers` ModuleList)")


def apply_activation_checkpointing(model: nn.Module) -> int:
    """Recompute every decoder layer in the backward pass; returns the number of layers wrapped."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper

    layers = decoder_layers(model)
    owner = next(m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) and m[0] is layers[0])
    for i, layer in enumerate(layers):
        # The wrapper strips its own prefix from state_dict keys, so checkpoints keep the plain names.
        owner[i] = checkpoint_wrapper(layer, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
    return len(layers)


def shard_model(model: nn.Module, precision: str = "fp32") -> nn.Module:
    """FSDP2 in place: one shard group per decoder layer, the rest (embeddings, norm, value head) in the root.

    Needs an initialised process group. Parameters become DTensors sharded on dim 0 over all processes.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    layer_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if precision == "bf16" else MixedPrecisionPolicy()
    for layer in decoder_layers(model):
        fully_shard(layer, mp_policy=layer_policy)  # frees the gathered weights after the layer's forward
    fully_shard(model, mp_policy=MixedPrecisionPolicy())  # fp32: embeddings, final norm, value head
    return model


def remove_activation_checkpointing(model: nn.Module) -> nn.Module:
    """Put the plain decoder layers back (before export: the checkpoint holds plain module names)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

    for module in model.modules():
        if isinstance(module, nn.ModuleList):
            for i, child in enumerate(module):
                if isinstance(child, CheckpointWrapper):
                    module[i] = child._checkpoint_wrapped_module
    return model


def full_state_dict(model: nn.Module, sharded: bool) -> dict[str, torch.Tensor]:
    """Every parameter and buffer as a full CPU tensor (a collective under FSDP: all ranks must call it)."""
    if not sharded:
        return {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
