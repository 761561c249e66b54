"""Two CPU measurements behind the packed backend's defaults (service/engine/packed.py, engine.py).

    python -m bench.cpu_kernels [--checkpoint DIR] [--sequences 32]

1. The projections' matmul rate at scoring shapes: `F.linear` (the default BLAS path) against oneDNN with
   the weight reordered once (`torch.ops.mkldnn._linear_pointwise`), which the packed backend uses on a CPU.
2. The packed forward's tokens/s by pass size (`--max-forward-tokens`): W1-like sequences of 300-600
   tokens, split greedily into passes of at most N tokens.

Figures for the record (prints a table); comparisons with the peers live in `python -m bench`.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F


def _seconds(fn, repeats: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def linear_rates(shapes, repeats: int = 10) -> list[dict]:
    out = []
    for rows, k, m in shapes:
        x, w = torch.randn(rows, k), torch.randn(m, k)
        flops = 2 * rows * k * m
        row = {"shape": f"{rows}x{k} @ {k}x{m}", "blas": flops / _seconds(lambda: F.linear(x, w), repeats) / 1e9}
        if hasattr(torch.ops.mkldnn, "_linear_pointwise") and torch.backends.mkldnn.is_available():
            packed = torch.ops.mkldnn._reorder_linear_weight(w, None)
            row["onednn"] = flops / _seconds(
                lambda: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], ""), repeats) / 1e9
        out.append(row)
    return out


def pass_size_rates(checkpoint: str, sequences: int, budgets=(512, 1024, 2048, 4096, 8192), seed: int = 0):
    from service.engine.packed import PackedQwen2
    from model_store.modeling import load_prm

    model = load_prm(checkpoint).model
    packed = PackedQwen2(model.backbone)
    rng = np.random.default_rng(seed)
    vocab = model.backbone.config.vocab_size
    seqs = [torch.from_numpy(rng.integers(5, vocab, int(n))) for n in rng.integers(300, 600, sequences)]
    total = sum(len(s) for s in seqs)
    out = []
    for budget in budgets:
        passes, current, size = [], [], 0
        for s in seqs:
            if current and size + len(s) > budget:
                passes.append(current)
                current, size = [], 0
            current.append(s)
            size += len(s)
        passes.append(current)

        def run():
            with torch.inference_mode():
                for group in passes:
                    packed.forward(torch.cat(group), [len(s) for s in group])

        out.append({"budget": budget, "passes": len(passes), "tok_s": total / _seconds(run, 2)})
    return out, total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cpu_kernels", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="a checkpoint for the pass-size table (e.g. the bench's 25M model, "
                                             ".cache/bench/models/qwen2-25m); without it only the matmul table")
    parser.add_argument("--sequences", type=int, default=32)
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("\n| projection shape | F.linear GFLOP/s | oneDNN (reordered weight) GFLOP/s |\n|---|---|---|")
    for row in linear_rates([(454, 512, 1536), (454, 512, 3072), (454, 1536, 512), (72, 512, 3072),
                             (3600, 512, 3072)]):
        onednn = f"{row['onednn']:.1f}" if "onednn" in row else "n/a"
        print(f"| {row['shape']} | {row['blas']:.1f} | {onednn} |")
    if args.checkpoint:
        rows, total = pass_size_rates(args.checkpoint, args.sequences)
        print(f"\npacked forward, {args.sequences} sequences of 300-600 tokens ({total:,} tokens):\n"
              "\n| tokens per pass | passes | tok/s |\n|---|---|---|")
        for row in rows:
            print(f"| {row['budget']} | {row['passes']} | {row['tok_s']:,.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
