"""This machine's fp32 matmul peak, and the FLOPs a Qwen2 PRM spends per scored token.

Contract:
- `measure(sizes, repeats)`: torch.matmul of random fp32 n x n matrices (into a preallocated output), best
  time of `repeats` per size after one warm-up; returns {"gflops": best over sizes, "by_size": {n: GFLOP/s},
  "threads": torch threads, "repeats": repeats}. FLOPs of one product: 2 n^3.
- `linear_peak(checkpoint, dtypes, rows)`: the physical limit of a model's projections, per dtype: each
  linear-layer shape of the model (q|k|v, o, gate|up, down; [rows, in] x [in, out]) timed through oneDNN with
  the weight reordered once (the packed backend's path) and through F.linear, best of `repeats`; per shape the
  faster path's GFLOP/s, and "gflops": the model's projection mix (the layer's FLOPs / the sum of the best
  times per shape), the rate the projections could reach end to end. JSON keys by dtype name.
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


def linear_shapes(stats: dict) -> dict[str, tuple[int, int]]:
    """(in, out) of each projection of one decoder layer, as the packed backend fuses them."""
    h, hd = stats["hidden"], stats["head_dim"]
    q, kv = stats["heads"] * hd, stats["kv_heads"] * hd
    return {"qkv": (h, q + 2 * kv), "o": (q, h), "gate_up": (h, 2 * stats["intermediate"]),
            "down": (stats["intermediate"], h)}


def linear_peak(checkpoint: Path | str, dtypes: tuple[str, ...] = ("float32", "bfloat16"), rows: int = 2048,
                repeats: int = 5, threads: int | None = None) -> dict:
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads or os.cpu_count() or 1)
    torch.manual_seed(0)
    shapes = linear_shapes(model_stats(checkpoint))
    onednn = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")

    def best(fn) -> float:
        fn()
        out = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            out = min(out, time.perf_counter() - t)
        return out

    result: dict = {"rows": rows, "threads": torch.get_num_threads(), "repeats": repeats}
    for name in dtypes:
        dtype = getattr(torch, name)
        per_shape, total_flops, total_s = {}, 0.0, 0.0
        for key, (k, m) in shapes.items():
            x, w = torch.randn(rows, k).to(dtype), torch.randn(m, k).to(dtype)
            seconds = best(lambda: F.linear(x, w))
            if onednn:
                try:
                    packed = torch.ops.mkldnn._reorder_linear_weight(w, None)
                    seconds = min(seconds, best(lambda: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none",
                                                                                            [], "")))
                except RuntimeError:  # no oneDNN kernel for this dtype: F.linear's time stands
                    pass
            flops = 2 * rows * k * m
            per_shape[f"{key} {k}x{m}"] = flops / seconds / 1e9
            total_flops, total_s = total_flops + flops, total_s + seconds
        result[name] = {"gflops": total_flops / total_s / 1e9, "by_shape": per_shape}
    return result


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
    parser.add_argument("--model", default=None, help="a checkpoint: its linear-layer shapes in fp32 and bf16 instead")
    args = parser.parse_args(argv)
    if args.model:
        result = linear_peak(args.model, rows=512 if args.quick else 2048, repeats=2 if args.quick else 5,
                             threads=args.threads)
    else:
        result = measure((512, 1024), 3, args.threads) if args.quick else measure(threads=args.threads)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
