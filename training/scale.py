"""The `agentprm train` flags for training at scale, and the data loading they change.

Kept apart from training/cli.py so the CLI only adds the flags and calls `scale_config` / `load_data`;
README "Training at scale" shows them in use.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from training.sharding import PARALLEL_MODES, ScaleConfig


def add_scale_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training at scale (README: Training at scale)")
    g.add_argument("--parallel", default="ddp", choices=PARALLEL_MODES,
                   help="with several processes: ddp (a full replica per process) or fsdp (FSDP2: weights, "
                        "gradients and AdamW state sharded over the processes)")
    g.add_argument("--activation-checkpointing", action="store_true",
                   help="recompute each decoder layer in the backward pass (activation memory: one [B, T, H] "
                        "tensor per layer)")
    g.add_argument("--lora-rank", type=int, default=0,
                   help="train LoRA adapters of this rank (peft) on the attention and MLP projections, the "
                        "marker-token embeddings and the value head; the export merges them (0: full fine-tuning)")
    g.add_argument("--lora-alpha", type=float, default=None, help="LoRA scale numerator (default: 2 x rank)")
    g.add_argument("--checkpoint-dir", default=None, help="write training checkpoints here (sharded, resumable)")
    g.add_argument("--checkpoint-every", type=int, default=0, help="optimizer steps between training checkpoints")
    g.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --checkpoint-dir")
    g.add_argument("--stop-after", type=int, default=None,
                   help="stop after this many optimizer steps of this run, checkpoint, exit 0 without exporting "
                        "(for job time limits; continue with --resume)")
    g.add_argument("--batch-tokens", type=int, default=0,
                   help="global batches by size: take trajectories until this many real tokens (0: --batch-size)")
    g.add_argument("--stream", action="store_true",
                   help="read the training trajectories from disk when a batch needs them (index in memory, "
                        "not the data); --data may also be a directory of *.jsonl shards")


def scale_config(args, tokenizer, template) -> ScaleConfig:
    token_ids = [tokenizer.token_to_id(m) for m in template.markers()] if args.lora_rank else []
    return ScaleConfig(parallel=args.parallel,
                       activation_checkpointing=args.activation_checkpointing, lora_rank=args.lora_rank,
                       lora_alpha=args.lora_alpha, lora_token_ids=[t for t in token_ids if t is not None],
                       checkpoint_dir=args.checkpoint_dir, checkpoint_every=args.checkpoint_every,
                       resume=args.resume, stop_after=args.stop_after, batch_tokens=args.batch_tokens)


@dataclass
class StreamedData:
    """What `run_train` needs from the data before the model exists (the streaming path)."""

    index: object  # streaming.DataIndex
    train_indices: list[int]
    val_indices: list[int]

    @classmethod
    def open(cls, path, val_fraction: float, seed: int) -> "StreamedData":
        from training.streaming import DataIndex

        index = DataIndex.scan(path)
        train, val = index.split(val_fraction, seed)
        return cls(index, train, val)

    def corpus(self) -> str:
        from training.data import corpus_text

        return corpus_text(self.index.records(range(len(self.index))))

    def examples(self, renderer, max_seq_len: int, gamma: float = 1.0):
        """(train examples rendered on demand, validation examples in memory, skipped lines)."""
        from training.streaming import StreamingExamples

        train = StreamingExamples(self.index, self.train_indices, renderer, max_seq_len, gamma)
        val = StreamingExamples(self.index, self.val_indices, renderer, max_seq_len, gamma)
        return train, val.materialize(), train.skipped + val.skipped
