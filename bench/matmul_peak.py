"""This machine's fp32 matmul peak, and the FLOPs a Qwen2 PRM spends per scored token.

Contract:
- `measure(sizes, repeats)`: torch.matmul of random fp32 n x n matrices (into a preallocated output), best
  time of `repeats` per size after one warm-up; returns {"gflops": best over sizes, "by_size": {n: GFLOP/s},
  "threads": torch threads, "repeats": repeats}. FLOPs of one product: 2 n^3.
- `model_stats(checkpoint)`: parameter counts read from the safetensors headers (no weights loaded) and the
  backbone config: total, embedding, non-embedding (+ value head), layers, hidden, heads, kv heads, head dim.
- `forward_flops(stats, tokens, computed)`: FLOPs of computing the last `computed` of `tokens` tokens of one
  sequence: 2 * non-embedding params * computed (matmuls) + 4 * layers * heads * head_dim * computed *
  (past + computed / 2) (causal attention scores and weighted sum, useful half only).

Run `python -m bench.matmul_peak [--quick]` to print the measurement as JSON (the bench runs it in a
subprocess so the harness process never loads torch).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def measure(sizes: tuple[int, ...] = (1024, 2048, 3072), repeats: int = 5, threads: int | None = None) -> dict:
    import torch

    torch.set_num_threads(threads or os.cpu_count() or 1)
    torch.manual_seed(0)
    by_size = {}
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        out = torch.empty(n, n)
        torch.matmul(a, b, out=out)  # warm-up
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            torch.matmul(a, b, out=out)
            best = min(best, time.perf_counter() - t)
        by_size[n] = 2 * n**3 / best / 1e9
    return {"gflops": max(by_size.values()), "by_size": by_size, "threads": torch.get_num_threads(),
            "repeats": repeats, "torch": torch.__version__}


def model_stats(checkpoint: Path | str) -> dict:
    from safetensors import safe_open

    checkpoint = Path(checkpoint)
    config = json.loads((checkpoint / "backbone" / "config.json").read_text())
    total = embedding = 0
    for file in sorted((checkpoint / "backbone").glob("*.safetensors")):
        with safe_open(str(file), framework="numpy") as f:
            for key in f.keys():
                shape = f.get_slice(key).get_shape()
                numel = 1
                for d in shape:
                    numel *= d
                total += numel
                if "embed_tokens" in key:
                    embedding += numel
    hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
    head = hidden + 1
    return {"params": total + head, "embedding": embedding, "non_embedding": total - embedding + head,
            "layers": int(config["num_hidden_layers"]), "hidden": hidden, "heads": heads,
            "kv_heads": int(config.get("num_key_value_heads") or heads),
            "head_dim": int(config.get("head_dim") or hidden // heads),
            "intermediate": int(config["intermediate_size"]), "vocab": int(config["vocab_size"])}


def forward_flops(stats: dict, tokens: int, computed: int) -> float:
    past = max(0, tokens - computed)
    attention = 4 * stats["layers"] * stats["heads"] * stats["head_dim"] * computed * (past + computed / 2)
    return 2 * stats["non_embedding"] * computed + attention


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="fp32 matmul peak of this machine (JSON)")
    parser.add_argument("--quick", action="store_true", help="small matrices, fewer repeats")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    result = measure((512, 1024), 3, args.threads) if args.quick else measure(threads=args.threads)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
