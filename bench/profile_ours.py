"""Profile of our engine's runner on long trajectories, in-process (no HTTP): speed and the top torch ops.

Contract: `python -m bench.profile_ours --checkpoint DIR --tokens N --sequences K [--seed S]` prints JSON:
{"sequences", "tokens_per_seq", "seconds", "tok_s", "gflops" (bench.matmul_peak.forward_flops),
"profiled_s", "top_ops": [{"name", "self_ms", "share", "calls"}]}. It builds the engine exactly as
`agentprm serve` does (PRMEngine.from_checkpoint with the default EngineConfig) and calls its runner
with the long trajectories as one batch: a warm-up, a timed run, then a run under torch.profiler. The bench
runs it in a subprocess, with no server running.
"""

from __future__ import annotations

import argparse
import json
import time


def profile(checkpoint: str, tokens: int, sequences: int, seed: int = 0, top: int = 12) -> dict:
    import torch

    from bench.matmul_peak import forward_flops, model_stats
    from bench.workloads import Builder, Sizes, TextGen
    from service.engine.engine import EngineConfig, PRMEngine
    from service.engine.runner import ScoreJob

    engine = PRMEngine.from_checkpoint(checkpoint, EngineConfig(device="cpu"))
    builder = Builder(engine.renderer, Sizes(), engine.manifest.max_seq_len)
    gen = TextGen(seed * 1000 + 555)
    tokens = min(tokens, engine.manifest.max_seq_len)

    def jobs(n):
        out = []
        for i in range(n):
            seq = builder.long_request(gen, f"profile/{i}", tokens).seqs[0]
            out.append(ScoreJob(seq.ids, seq.readouts))
        return out

    runner = engine.runner
    runner.run_batch(jobs(1))  # warm-up
    timed = jobs(sequences)
    t = time.perf_counter()
    runner.run_batch(timed)
    seconds = time.perf_counter() - t
    stats = model_stats(checkpoint)
    flops = sum(forward_flops(stats, len(j.ids), len(j.ids)) for j in timed)
    profiled = jobs(sequences)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        t = time.perf_counter()
        runner.run_batch(profiled)
        profiled_s = time.perf_counter() - t
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    top_ops = [{"name": e.key, "self_ms": e.self_cpu_time_total / 1000, "share": e.self_cpu_time_total / total,
                "calls": e.count} for e in events[:top]]
    n_tokens = sum(len(j.ids) for j in timed)
    return {"sequences": sequences, "tokens_per_seq": round(n_tokens / sequences), "seconds": seconds,
            "tok_s": n_tokens / seconds, "gflops": flops / seconds / 1e9, "profiled_s": profiled_s,
            "threads": torch.get_num_threads(), "top_ops": top_ops, "w3_call": _w3_call(engine, builder, gen)}


def _w3_call(engine, builder, gen, step: int = 8) -> dict:
    """One mid-episode beam-expand call through the engine (after the call before it, which warms the cache):
    how many forward passes it takes, their padded tokens, and the time."""
    import asyncio

    from service.engine.types import Beam, Step, Trajectory

    calls = builder.episode(gen, "profile/W3", upto=step + 1)[step - 1: step + 1]

    def beams(req):
        return [Beam(Trajectory(b["trajectory"]["task"], tuple(Step(s["observation"], s["action"])
                                                               for s in b["trajectory"]["steps"])),
                     b["observation"], tuple(b["candidates"])) for b in req.body["beams"]]

    passes = {"forwards": 0, "padded_tokens": 0, "batch_shapes": []}
    runner = engine.runner
    run_batch = runner.run_batch

    def counted(jobs):  # the runner's own per-batch stats: right on every backend (packed, padded, graphs)
        out = run_batch(jobs)
        passes["forwards"] += out.stats.forwards
        passes["padded_tokens"] += out.stats.padded_tokens
        passes["batch_shapes"] += out.stats.shapes
        return out

    async def go():
        await engine.start()
        try:
            await engine.expand("default", beams(calls[0]), 8)
            engine.scheduler.run_batch = counted
            t = time.perf_counter()
            out = await engine.expand("default", beams(calls[1]), 8)
            seconds = time.perf_counter() - t
            engine.scheduler.run_batch = run_batch
            return seconds, out
        finally:
            await engine.shutdown()

    seconds, out = asyncio.run(go())
    return {"step": step, "seconds": seconds, "computed_tokens": out.usage.computed_tokens,
            "prompt_tokens": out.usage.prompt_tokens, **passes}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="profile our runner on long trajectories (JSON)")
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--tokens", type=int, default=1500)
    parser.add_argument("--sequences", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not (1 <= args.sequences <= 256 and 8 <= args.tokens <= 100_000):
        parser.error("--sequences in [1, 256], --tokens in [8, 100000]")
    print(json.dumps(profile(args.checkpoint, args.tokens, args.sequences, args.seed)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
