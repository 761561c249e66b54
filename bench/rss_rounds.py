"""Resident memory of the engine's runner over rounds of W1-like batches, in-process (no HTTP).

    python -m bench.rss_rounds --checkpoint DIR [--rounds 8] [--cache-bytes 0] [--blas]

Each round runs 20 batches of 1-11 random sequences of 200-600 tokens through `PRMEngine.runner`, then prints
RSS, live torch tensors, and the prefix cache's bytes and blocks. Flat RSS after the cache is full means no
growth per request; `--blas` swaps the packed backend's oneDNN projections for F.linear.
"""

from __future__ import annotations

import argparse
import gc

import numpy as np
import torch


def rss_mib() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * 4096 // 2**20


def main(argv: list[str] | None = None) -> int:
    from service.engine.engine import EngineConfig, PRMEngine
    from service.engine.packed import PackedQwen2
    from service.engine.runner import ScoreJob

    parser = argparse.ArgumentParser(prog="python -m bench.rss_rounds", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--cache-bytes", type=int, default=0)
    parser.add_argument("--blas", action="store_true")
    args = parser.parse_args(argv)
    engine = PRMEngine.from_checkpoint(args.checkpoint, EngineConfig(device="cpu", prefix_cache_bytes=args.cache_bytes))
    if args.blas and engine.runner.packed is not None:
        engine.runner.packed = PackedQwen2(engine.loaded.model.backbone, onednn=False)
    vocab = engine.loaded.model.backbone.config.vocab_size
    rng = np.random.default_rng(0)
    for r in range(args.rounds):
        for _ in range(20):
            lengths = rng.integers(200, 600, int(rng.integers(1, 12)))
            engine.runner.run_batch([ScoreJob(tuple(int(t) for t in rng.integers(10, vocab, int(n))),
                                              tuple(range(20, int(n), 30))) for n in lengths])
        gc.collect()
        tensors = sum(1 for o in gc.get_objects() if type(o) is torch.Tensor)
        print(f"round {r}: rss {rss_mib()} MiB, tensors {tensors}, cache {engine.cache.bytes >> 20} MiB "
              f"({len(engine.cache)} blocks)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
