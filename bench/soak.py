"""Soak test: a real `agentprm serve` process under sustained overload, for `--duration-s` (default 10 min).

    python -m bench.soak [--model NAME_OR_PATH] [--duration-s 600] [--factor 2] [--out bench/SOAK.md]

1. Starts the server (127.0.0.1, a free port, production defaults with the access log in JSON, unless
   --serve-arg adds flags); its log goes to .cache/soak-server.log.
2. Measures its capacity: `--concurrency` closed-loop clients for `--capacity-s` seconds of a mixed
   workload (score 60%, rerank 25%, beam-expand 15%; bodies drawn from a fixed seeded pool).
3. Offers `--factor` x capacity, open loop (requests leave on schedule whatever the answers), for
   `--duration-s`, sampling the server's RSS (/proc/PID/status VmRSS) every 2 s.
4. SIGTERMs the server and records its exit code (the drain).

Reports: capacity, offered and served rates, answers by status code (and client-side errors), latency
p50/p90/p99/max of the 200s as the client saw them and as the server's access log timed them (the two
agree unless the load generator, on the same CPUs, is the bottleneck; its own event-loop lag is reported
too), RSS after warm-up (the first sample past `--warmup-s`, default 10% of the run) and at the end, the
growth between them (target < 5%), RSS minute by minute, the prefix cache's bytes at the end (read from
/metrics: a full cache means the plateau is not the cache still filling), the machine and commit, and the
drain exit code. Writes a Markdown report to --out and prints one JSON line. Without --model it makes
(once) a random checkpoint the size of a small PRM in .cache/soak-model, so the run needs no download.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx

from clients.local_server import ServerProcess, ServerStartError, free_port, serve_command

REPO = Path(__file__).resolve().parents[1]
OBJECTS = ("red ball", "blue key", "yellow door", "green box", "grey wall", "purple ball")
ACTIONS = ("turn left", "turn right", "move forward", "pick up", "drop", "toggle")
SERVER_LOG = REPO / ".cache" / "soak-server.log"
MAX_OUTSTANDING = 4096  # open-loop requests in flight at once, beyond which the client counts a skip
SHARD_CONNECTIONS = 32  # connections per client pool of the open loop (MAX_OUTSTANDING / this many pools)


def trajectory(rng: random.Random, n_steps: int) -> dict:
    task = f"go to the {rng.choice(OBJECTS)}"
    return {"task": task, "steps": [
        {"observation": f"You see a {rng.choice(OBJECTS)} {rng.randint(1, 5)} steps ahead and a "
                        f"{rng.choice(OBJECTS)} {rng.randint(1, 4)} steps to the left. You carry nothing.",
         "action": rng.choice(ACTIONS)} for _ in range(n_steps)]}


def body_pool(seed: int = 0, size: int = 400) -> list[tuple[str, dict]]:
    rng = random.Random(seed)
    pool = []
    for _ in range(size):
        kind = rng.random()
        if kind < 0.60:
            pool.append(("/v1/score", {"trajectories": [trajectory(rng, rng.randint(3, 10))
                                                        for _ in range(rng.randint(1, 4))]}))
        elif kind < 0.85:
            base = trajectory(rng, rng.randint(3, 8))
            pool.append(("/v1/rerank", {"task": base["task"], "top_n": 1, "candidates": [
                {"steps": base["steps"][:1] + trajectory(rng, len(base["steps"]) - 1)["steps"]} for _ in range(8)]}))
        else:
            pool.append(("/v1/beam-expand", {"beam_width": 2, "beams": [
                {"trajectory": trajectory(rng, rng.randint(1, 6)), "observation": "You see a wall 1 step ahead.",
                 "candidates": list(ACTIONS[:4])} for _ in range(2)]}))
    return pool


def default_model() -> str:
    path = REPO / ".cache" / "soak-model"
    if not (path / "manifest.json").is_file():
        from model_store.export import init_random

        init_random(path, name="soak-prm", version="1", layers=4, hidden=256, heads=4, kv_heads=2, seed=0,
                    max_seq_len=2048, overwrite=True)
    return str(path)


def start_server(model: str, extra: list[str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    server = ServerProcess(serve_command(port, model, "--log-format", "json", *extra, device=None, log_level="info"),
                           f"http://127.0.0.1:{port}", log_path=SERVER_LOG)
    try:
        server.start(timeout_s=300)
    except ServerStartError as exc:
        raise SystemExit(f"the server did not start ({exc}); see .cache/soak-server.log") from None
    return server.proc, server.url


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


async def measure_capacity(url: str, pool, concurrency: int, seconds: float) -> float:
    """Closed loop: `concurrency` clients back to back; 200s per second over the measured window."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        async def worker(i: int, until: float, counter: list):
            k = i
            while time.monotonic() < until:
                path, body = pool[k % len(pool)]
                k += concurrency
                if (await client.post(path, json=body)).status_code == 200:
                    counter[0] += 1

        warm = [0]
        await asyncio.gather(*(worker(i, time.monotonic() + min(5.0, seconds / 4), warm) for i in range(concurrency)))
        done = [0]
        start = time.monotonic()
        await asyncio.gather(*(worker(i, start + seconds, done) for i in range(concurrency)))
        return done[0] / (time.monotonic() - start)


async def open_loop(url: str, pool, rate: float, seconds: float, pid: int) -> dict:
    codes: Counter = Counter()
    latencies: list[float] = []
    rss: list[tuple[float, int]] = []
    lags: list[float] = []
    outstanding = 0
    skipped = 0
    # The client side must not be what is measured. httpcore 1.0's pool costs O(queued x connections) per
    # request, and closes every idle connection whenever it holds more than max_keepalive_connections in all
    # (busy ones counted): one pool of 4096 connections stalled this client's own event loop for seconds
    # once a few thousand were open, and one with 256 kept alive held requests back for up to 20 s while it
    # closed connections. So: many small pools, each keeping all its connections alive, requests dealt out
    # round robin, and bodies encoded once.
    shards = MAX_OUTSTANDING // SHARD_CONNECTIONS
    limits = httpx.Limits(max_connections=SHARD_CONNECTIONS, max_keepalive_connections=SHARD_CONNECTIONS)
    encoded = [(path, json.dumps(body).encode()) for path, body in pool]
    headers = {"content-type": "application/json"}
    async with contextlib.AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(httpx.AsyncClient(base_url=url, timeout=120, limits=limits))
                   for _ in range(shards)]

        async def one(client: httpx.AsyncClient, path: str, body: bytes):
            nonlocal outstanding
            start = time.monotonic()
            try:
                response = await client.post(path, content=body, headers=headers)
                codes[response.status_code] += 1
                if response.status_code == 200:
                    latencies.append(time.monotonic() - start)
            except httpx.HTTPError as exc:
                codes[type(exc).__name__] += 1
            finally:
                outstanding -= 1

        async def sample_rss(until: float):
            t0 = time.monotonic()
            while time.monotonic() < until:
                rss.append((time.monotonic() - t0, rss_bytes(pid)))
                await asyncio.sleep(2.0)

        async def sample_lag(until: float):  # how late this client's own event loop runs its callbacks
            while time.monotonic() < until:
                start = time.monotonic()
                await asyncio.sleep(0.1)
                lags.append(time.monotonic() - start - 0.1)

        t0 = time.monotonic()
        sampler = asyncio.create_task(sample_rss(t0 + seconds))
        lag_sampler = asyncio.create_task(sample_lag(t0 + seconds))
        tasks = set()
        i = 0
        while True:
            due = t0 + i / rate
            if due >= t0 + seconds:
                break
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if outstanding >= MAX_OUTSTANDING:
                skipped += 1
            else:
                outstanding += 1
                task = asyncio.create_task(one(clients[i % shards], *encoded[i % len(encoded)]))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            i += 1
        await asyncio.gather(*tasks)
        await sampler
        await lag_sampler
    return {"codes": codes, "latencies": latencies, "rss": rss, "client_lag_s": lags, "sent": i - skipped,
            "skipped": skipped, "elapsed": time.monotonic() - t0}


def server_latencies(log_path: Path, since: float) -> list[float]:
    """Seconds the server spent on each 200 scoring answer after `since` (time.time()), from its JSON access log
    (duration_ms: from the request's first byte in the middleware to its last response byte)."""
    out = []
    with open(log_path, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            if '"agentprm.access"' not in line:
                continue
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("status") == 200 and record.get("route", "").startswith("/v1/"):
                when = datetime.datetime.fromisoformat(record["ts"]).timestamp()
                if when >= since:
                    out.append(record["duration_ms"] / 1000)
    return out


def latency_summary(values: list[float]) -> dict:
    return {"n": len(values), "p50": round(percentile(values, 0.5), 4), "p90": round(percentile(values, 0.9), 4),
            "p99": round(percentile(values, 0.99), 4), "max": round(max(values), 4) if values else None}


def prefix_cache_mib(url: str) -> float | None:
    """agentprm_prefix_cache_bytes from /metrics, in MiB (None if it cannot be read)."""
    try:
        text = httpx.get(f"{url}/metrics", timeout=10).text
    except httpx.HTTPError:
        return None
    for line in text.splitlines():
        if line.startswith("agentprm_prefix_cache_bytes "):
            return round(float(line.split()[1]) / 2**20, 1)
    return None


def by_minute(rss: list[tuple[float, int]]) -> list[int]:
    """RSS (MiB) of the first sample of every minute after the first, then of the last sample."""
    if not rss:
        return []
    marks = [next(b for t, b in rss if t >= 60 * m) for m in range(1, int(rss[-1][0] // 60) + 1)]
    return [round(b / 2**20) for b in marks + [rss[-1][1]]]


def commit() -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return head + (" with uncommitted changes" if git("status", "--porcelain", "--untracked-files=no") else "")


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def summarize(args, model: str, capacity: float, rate: float, run: dict, exit_code: int | None,
              cache_mib: float | None = None) -> dict:
    from bench.cli import machine_info

    rss = run["rss"]
    warmup = args.warmup_s if args.warmup_s is not None else 0.1 * args.duration_s
    after_warmup = next((b for t, b in rss if t >= warmup), rss[0][1] if rss else 0)
    end = rss[-1][1] if rss else 0
    lat = run["latencies"]
    return {
        "model": model, "duration_s": round(run["elapsed"], 1), "capacity_rps": round(capacity, 2),
        "factor": args.factor, "offered_rps": round(rate, 2), "sent": run["sent"], "client_skipped": run["skipped"],
        "served_200_rps": round(run["codes"].get(200, 0) / run["elapsed"], 2),
        "codes": {str(k): v for k, v in sorted(run["codes"].items(), key=lambda kv: str(kv[0]))},
        "latency_s": latency_summary(lat), "server_latency_s": latency_summary(run.get("server_latencies", [])),
        "client_loop_lag_s": latency_summary(run["client_lag_s"]),
        "rss_mib": {"after_warmup": round(after_warmup / 2**20, 1), "end": round(end / 2**20, 1),
                    "max": round(max(b for _, b in rss) / 2**20, 1) if rss else None, "warmup_s": warmup},
        "rss_growth_pct": round(100.0 * (end - after_warmup) / after_warmup, 2) if after_warmup else None,
        "rss_by_minute_mib": by_minute(rss),
        "prefix_cache_mib_end": cache_mib,
        "drain_exit_code": exit_code, "serve_args": args.serve_arg, "cpus": os.cpu_count(),
        "cpu": machine_info()["cpu"], "cpu_flags": machine_info().get("flags", ""), "commit": commit(),
        "dtype": run.get("dtype", "unknown"),
        "started_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(time.time() - run["elapsed"])),
    }


def markdown(s: dict) -> str:
    codes = ", ".join(f"{k}: {v}" for k, v in s["codes"].items())
    lat, server, rss = s["latency_s"], s["server_latency_s"], s["rss_mib"]
    return f"""# Soak run (bench/soak.py)

`python -m bench.soak --duration-s {s['duration_s']:.0f} --factor {s['factor']}` on {s['cpus']} CPUs ({s['cpu']}),
CPU flags: {s.get('cpu_flags') or 'n/a'}; the server computed in {s.get('dtype', 'unknown')};
started {s['started_utc']} at commit {s['commit']}; model `{s['model']}`, server flags
{s['serve_args'] or 'none (production defaults; the access log in JSON)'}.

| figure | value |
|---|---|
| measured capacity (closed loop) | {s['capacity_rps']} requests/s |
| offered load (open loop, {s['factor']}x) | {s['offered_rps']} requests/s for {s['duration_s']} s ({s['sent']} requests) |
| served (200) | {s['served_200_rps']} requests/s |
| answers by status | {codes} |
| requests the client could not send (over {MAX_OUTSTANDING} outstanding) | {s['client_skipped']} |
| latency of 200s at the client p50 / p90 / p99 / max | {lat['p50']} / {lat['p90']} / {lat['p99']} / {lat['max']} s |
| the same 200s in the server's access log p50 / p90 / p99 / max | {server['p50']} / {server['p90']} / {server['p99']} / {server['max']} s |
| lag of the load generator's own event loop p50 / p99 / max (same {s['cpus']} CPUs) | {s['client_loop_lag_s']['p50']} / {s['client_loop_lag_s']['p99']} / {s['client_loop_lag_s']['max']} s |
| RSS after warm-up ({rss['warmup_s']:.0f} s) / end / max | {rss['after_warmup']} / {rss['end']} / {rss['max']} MiB |
| RSS growth after warm-up (target < 5%) | {s['rss_growth_pct']}% |
| RSS minute by minute (MiB; the last is the end) | {' / '.join(str(m) for m in s['rss_by_minute_mib'])} |
| prefix cache at the end (from /metrics) | {s['prefix_cache_mib_end']} MiB |
| exit code after SIGTERM (drain) | {s['drain_exit_code']} |
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="checkpoint path or name (default: a random small PRM)")
    parser.add_argument("--duration-s", type=float, default=600.0)
    parser.add_argument("--factor", type=float, default=2.0, help="offered load as a multiple of capacity")
    parser.add_argument("--capacity-s", type=float, default=30.0)
    parser.add_argument("--concurrency", type=int, default=16, help="closed-loop clients for the capacity")
    parser.add_argument("--warmup-s", type=float, default=None, help="RSS baseline time (default 10%% of run)")
    parser.add_argument("--serve-arg", action="append", default=[], help="extra `agentprm serve` flag (repeat)")
    parser.add_argument("--out", default=str(REPO / "bench" / "SOAK.md"))
    args = parser.parse_args(argv)
    (REPO / ".cache").mkdir(exist_ok=True)
    model = args.model or default_model()
    extra = [flag for arg in args.serve_arg for flag in arg.split()]
    proc, url = start_server(model, extra)
    try:
        # Before the measured window: the access log's 200s after `started` must be the soak's requests only.
        dtype = httpx.get(url + "/v1/models", timeout=30).json()["data"][0].get("dtype", "unknown")
        pool = body_pool()
        capacity = asyncio.run(measure_capacity(url, pool, args.concurrency, args.capacity_s))
        rate = args.factor * capacity
        print(f"capacity {capacity:.1f} requests/s; offering {rate:.1f} requests/s for {args.duration_s:.0f} s",
              flush=True)
        started = time.time()
        run = asyncio.run(open_loop(url, pool, rate, args.duration_s, proc.pid))
        cache_mib = prefix_cache_mib(url)
        proc.send_signal(signal.SIGTERM)
        exit_code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    run["server_latencies"] = server_latencies(SERVER_LOG, started)
    run["dtype"] = dtype
    summary = summarize(args, model, capacity, rate, run, exit_code, cache_mib)
    Path(args.out).write_text(markdown(summary))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
