"""Resident memory of the engine over rounds of work, in-process (no HTTP): does it plateau?

    python -m bench.rss_rounds --checkpoint DIR [--rounds 8] [--cache-bytes 0] [--blas]
    python -m bench.rss_rounds --workload soak [--rounds 20] [--cache-bytes 268435456]

`--workload batches` (default): each round runs 20 batches of 1-11 random sequences of 200-600 tokens through
`PRMEngine.runner`. `--workload soak`: each round sends 120 requests of bench/soak.py's body pool (score,
rerank, beam-expand) through the engine's routes, 24 at a time, so the scheduler batches them as under load.
After every round it prints RSS, the C heap's bytes in use and free-but-held (glibc mallinfo2: what the
allocator keeps after frees; growth there with flat use is fragmentation), live torch tensors, and the prefix
cache's bytes and blocks. Flat RSS after the cache is full means no growth per request; `--blas` swaps the
packed backend's oneDNN projections for F.linear. Without --checkpoint it uses the soak's random PRM.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import gc

import numpy as np
import torch


def rss_mib() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * 4096 // 2**20


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                      "fsmblks", "uordblks", "fordblks", "keepcost")]


def heap_mib() -> tuple[int, int] | None:
    """(in use, free but held) MiB of glibc's heap arenas, or None where mallinfo2 is missing (not glibc >= 2.33)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
    except (OSError, AttributeError):
        return None
    info = libc.mallinfo2()
    return info.uordblks >> 20, info.fordblks >> 20


def batches_round(engine, rng) -> None:
    from service.engine.runner import ScoreJob

    vocab = engine.loaded.model.backbone.config.vocab_size
    for _ in range(20):
        lengths = rng.integers(200, 600, int(rng.integers(1, 12)))
        engine.runner.run_batch([ScoreJob(tuple(int(t) for t in rng.integers(10, vocab, int(n))),
                                          tuple(range(20, int(n), 30))) for n in lengths])


async def soak_round(engine, pool, start: int, requests: int = 120, concurrency: int = 24) -> None:
    from service.api.protocol import BeamExpandRequest, RerankRequest, ScoreRequest

    async def one(path: str, body: dict) -> None:
        if path == "/v1/score":
            r = ScoreRequest(**body)
            await engine.score(r.model, [t.to_engine() for t in r.trajectories], r.aggregate)
        elif path == "/v1/rerank":
            r = RerankRequest(**body)
            await engine.rerank(r.model, r.task, r.to_engine(), r.aggregate, r.top_n)
        else:
            r = BeamExpandRequest(**body)
            await engine.expand(r.model, [b.to_engine() for b in r.beams], r.beam_width)

    for k in range(start, start + requests, concurrency):
        await asyncio.gather(*(one(*pool[(k + j) % len(pool)]) for j in range(concurrency)))


def report(r: int, engine) -> None:
    gc.collect()
    tensors = sum(1 for o in gc.get_objects() if type(o) is torch.Tensor)
    heap = heap_mib()
    heap_text = f"heap in use {heap[0]} MiB, free {heap[1]} MiB, " if heap else ""
    print(f"round {r}: rss {rss_mib()} MiB, {heap_text}tensors {tensors}, cache {engine.cache.bytes >> 20} MiB "
          f"({len(engine.cache)} blocks)", flush=True)


def main(argv: list[str] | None = None) -> int:
    from service.engine.engine import EngineConfig, PRMEngine
    from service.engine.packed import PackedQwen2

    parser = argparse.ArgumentParser(prog="python -m bench.rss_rounds", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None, help="default: the soak's random PRM (.cache/soak-model)")
    parser.add_argument("--workload", choices=("batches", "soak"), default="batches")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--cache-bytes", type=int, default=None,
                        help="prefix cache bytes (default: 0 for batches, the server's 256 MiB for soak)")
    parser.add_argument("--blas", action="store_true")
    args = parser.parse_args(argv)
    if args.checkpoint is None:
        from bench.soak import default_model

        args.checkpoint = default_model()
    cache_bytes = args.cache_bytes if args.cache_bytes is not None else (
        EngineConfig().prefix_cache_bytes if args.workload == "soak" else 0)
    engine = PRMEngine.from_checkpoint(args.checkpoint, EngineConfig(device="cpu", prefix_cache_bytes=cache_bytes))
    if args.blas and engine.runner.backend == "packed":
        engine.runner.executor.packed = PackedQwen2(engine.loaded.model.backbone, onednn=False)
    if args.workload == "batches":
        rng = np.random.default_rng(0)
        for r in range(args.rounds):
            batches_round(engine, rng)
            report(r, engine)
        return 0

    async def soak() -> None:
        from bench.soak import body_pool

        pool = body_pool()
        await engine.start()
        try:
            for r in range(args.rounds):
                await soak_round(engine, pool, r * 120)
                report(r, engine)
        finally:
            await engine.shutdown()

    asyncio.run(soak())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
