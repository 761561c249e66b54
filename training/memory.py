"""Memory per process of a training configuration: exact for the training state, estimated for activations.

    python -m training.memory --config CONFIG.json [--lora-rank R] [--world W] [--precision bf16]
                              [--batch-tokens T] [--activation-checkpointing]

Training state (exact; tests/training/test_memory.py checks it against the bytes of the parameters, gradients
and AdamW state of real tiny models after an optimizer step):
- full fine-tuning: fp32 weights 4 P + fp32 gradients 4 P + AdamW (exp_avg, exp_avg_sq) 8 P = 16 P bytes,
  P = backbone + value head parameters; FSDP divides it by the world size W (each dimension 0 padded to a
  multiple of W, ignored here);
- LoRA (one replica per process): the frozen fp32 base 4 P plus 16 bytes per trainable parameter (adapters
  r (d_in + d_out) per projection, the marker rows of the embeddings, the value head).

Transient and activation memory (estimated, not measured: it depends on the attention kernel):
- FSDP gathers the root group (embeddings, final norm, value head) for the whole step and one decoder
  layer at a time (two with prefetching), in the compute dtype;
- activations with checkpointing: each layer keeps its input [tokens, H] plus one layer's intermediates
  while it is recomputed, about tokens * (6 H + 3 I) values (q, k, v, o, norms, gate, up, act, down
  inputs; a fused/flash attention keeps no [T, T] matrix); without checkpointing every layer keeps that.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass

import torch

GIB = 1024 ** 3


@dataclass
class MemoryEstimate:
    parameters: int
    trainable: int
    weights_bytes: int  # per process
    grads_bytes: int
    optimizer_bytes: int
    gathered_bytes: int  # FSDP: unsharded root + 2 layers in the compute dtype (estimated)
    activation_bytes: int  # estimated

    @property
    def state_bytes(self) -> int:
        return self.weights_bytes + self.grads_bytes + self.optimizer_bytes

    @property
    def total_bytes(self) -> int:
        return self.state_bytes + self.gathered_bytes + self.activation_bytes

    def table(self) -> dict:
        gib = lambda b: round(b / GIB, 2)
        return {**asdict(self), "state_gib": gib(self.state_bytes), "gathered_gib": gib(self.gathered_bytes),
                "activation_gib": gib(self.activation_bytes), "total_gib": gib(self.total_bytes)}


def count_parameters(config: dict, lora_rank: int = 0, marker_tokens: int = 5) -> tuple[int, int, int, int]:
    """(all parameters, trainable, largest decoder layer, root group) of the PRM for `config`, built on meta.

    `marker_tokens`: embedding rows LoRA trains (the template's 5 markers)."""
    from model_store.modeling import PRMModel
    from training.backbone import build_backbone
    from training.lora import LORA_TARGETS

    with torch.device("meta"):
        model = PRMModel(build_backbone(dict(config)))
    total = sum(p.numel() for p in model.parameters())
    layers = model.backbone.layers
    layer = max(sum(p.numel() for p in m.parameters()) for m in layers)
    root = total - sum(p.numel() for p in layers.parameters())
    if not lora_rank:
        return total, total, layer, root
    adapters = sum(lora_rank * (m.in_features + m.out_features) for name, m in model.backbone.named_modules()
                   if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in LORA_TARGETS)
    added = adapters + marker_tokens * model.hidden_size  # LoRA matrices, peft's delta rows of the marker tokens
    return total + added, added + model.hidden_size + 1, layer, root  # trainable: + the value head


def estimate(config: dict, lora_rank: int = 0, world: int = 1, parallel: str = "ddp", precision: str = "fp32",
             batch_tokens: int = 16384, activation_checkpointing: bool = False) -> MemoryEstimate:
    total, trainable, layer, root = count_parameters(config, lora_rank)
    shards = world if parallel == "fsdp" else 1
    compute_bytes = 2 if precision == "bf16" else 4
    trainable_local = trainable if lora_rank else -(-total // shards)
    weights = 4 * total if lora_rank else 4 * trainable_local  # fp32 (LoRA: the whole frozen replica)
    grads, optimizer = 4 * trainable_local, 8 * trainable_local
    gathered = (4 * root + 2 * compute_bytes * layer) if shards > 1 else 0
    hidden, inter = int(config["hidden_size"]), int(config["intermediate_size"])
    layers = int(config["num_hidden_layers"])
    per_layer = batch_tokens * (6 * hidden + 3 * inter) * compute_bytes
    if activation_checkpointing:
        activations = layers * batch_tokens * hidden * compute_bytes + per_layer
    else:
        activations = layers * per_layer
    return MemoryEstimate(total, trainable, weights, grads, optimizer, gathered, activations)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.memory", description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="a transformers config.json of the backbone")
    p.add_argument("--lora-rank", type=int, default=0)
    p.add_argument("--world", type=int, default=1, help="processes (GPUs)")
    p.add_argument("--parallel", default="ddp", choices=("ddp", "fsdp"))
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--batch-tokens", type=int, default=16384, help="padded tokens per micro-batch")
    p.add_argument("--activation-checkpointing", action="store_true")
    args = p.parse_args(argv)
    config = json.loads(open(args.config).read())
    result = estimate(config, args.lora_rank, args.world, args.parallel, args.precision, args.batch_tokens,
                      args.activation_checkpointing)
    print(json.dumps(result.table(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
