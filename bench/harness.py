"""The benchmark harness: runs every (system, workload, concurrency) cell and collects the figures.

Contract:
- `run_system(system, workloads, config)` starts one system, sends it a few calibration requests (untimed,
  distinct from the measured ones), runs each workload at each concurrency and stops the system. It
  returns `CellResult`s; a failure in one cell is recorded in the cell (`error`) and the run goes on.
- A cell sends its requests with `c` in flight (closed loop: a worker sends its next request when its
  previous one is answered) until the list is done or the cell's time budget is spent (no new request
  after it; those in flight finish). If one wave of `c` requests would pass the hard cap at the
  calibration estimate (one request at a time), fewer are kept in flight; `sent`, `planned` and
  `in_flight` record what ran. W1/W2 requests are alike, so a cut keeps what is measured. For W3 and W4 a
  stateful system (ours, and vLLM with prefix caching) runs agents, each agent's calls in order after its warm-up call (untimed), until the
  hard cap; a stateless system gets the same calls in a fixed shuffled order (it reuses nothing across
  calls, so order does not matter to it, and any prefix of the shuffle has the step mix of the whole).
- Figures per cell: requests/s, workload tokens/s (tokens of the logical sequences, the same for every
  system), computed tokens (total and per request), p50/p99 latency, and the canonical promises of every
  request (compared across systems by bench.report).
- Bounded: every request has a timeout; 429/503 are retried (Retry-After honoured) for at most 300 s.
"""

from __future__ import annotations

import asyncio
import math
import random
import statistics
import time
from dataclasses import dataclass, field

import httpx

from bench.systems import System
from bench.workloads import AGENT_KINDS, Request, Workload


@dataclass(frozen=True)
class HarnessConfig:
    concurrencies: tuple[int, ...] = (1, 8, 32)
    budget_s: float = 40.0  # per (system, workload), split over the concurrencies by `weights`
    weights: tuple[float, ...] = (0.25, 0.35, 0.4)
    hard_cap_factor: float = 2.0  # a cell may run up to this many times its budget to reach `c` requests
    request_timeout_s: float = 900.0
    max_retry_s: float = 300.0  # 429/503 answers are retried (Retry-After honoured) for at most this long


@dataclass
class CellResult:
    system: str
    workload: str
    concurrency: int
    planned: int = 0
    sent: int = 0
    in_flight: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    workload_tokens: int = 0
    prompt_tokens: int = 0
    computed_tokens: int = 0
    retries: int = 0
    outputs: dict[str, list[list[float]]] = field(default_factory=dict)  # request key -> canonical promises
    rankings: dict[str, list[int]] = field(default_factory=dict)
    steps: list[int] = field(default_factory=list)  # W3: episode step of each call sent
    pairs: list[tuple[int, int]] = field(default_factory=list)  # single-sequence requests: (tokens, computed)
    server: dict = field(default_factory=dict)  # server-side counter deltas over the cell
    extra: dict = field(default_factory=dict)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.sent > 0

    @property
    def rps(self) -> float:
        return self.sent / self.seconds if self.seconds else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.workload_tokens / self.seconds if self.seconds else 0.0

    @property
    def computed_per_request(self) -> float:
        return self.computed_tokens / self.sent if self.sent else 0.0

    def latency(self, q: float) -> float:
        if not self.latencies:
            return 0.0
        xs = sorted(self.latencies)
        return xs[min(len(xs) - 1, max(0, math.ceil(q * len(xs)) - 1))]

    @property
    def p50(self) -> float:
        return statistics.median(self.latencies) if self.latencies else 0.0

    @property
    def p99(self) -> float:
        return self.latency(0.99)


def in_flight_for(concurrency: int, est_s: float, hard_cap_s: float) -> int:
    """`concurrency`, unless one wave of that many requests (at the one-at-a-time estimate) passes the hard cap."""
    if est_s <= 0 or concurrency * est_s <= hard_cap_s:
        return concurrency
    return max(1, int(hard_cap_s / est_s))


def interleaved(items: list, seed: int = 0) -> list:
    """A fixed shuffle: any prefix of it has about the mix of the whole list (W3 steps)."""
    order = list(items)
    random.Random(seed).shuffle(order)
    return order


class Sender:
    """Sends one request to a system over a shared AsyncClient and records the figures in a cell."""

    def __init__(self, system: System, client: httpx.AsyncClient, config: HarnessConfig):
        self.system, self.client, self.config = system, client, config

    async def call(self, req: Request, payload: tuple[str, bytes], cell: CellResult | None) -> None:
        path, content = payload
        start = time.perf_counter()
        give_up = start + self.config.max_retry_s
        for attempt in range(1000):
            resp = await self.client.post(path, content=content, headers={"content-type": "application/json"})
            if resp.status_code not in (429, 503) or time.perf_counter() >= give_up:
                break
            # Backpressure: wait as told (Retry-After) and send again; the wait counts in the latency.
            if cell is not None:
                cell.retries += 1
            retry_after = resp.headers.get("retry-after", "")
            wait = float(retry_after) if retry_after.isdigit() else 0.2 * 2 ** min(attempt, 5)
            await asyncio.sleep(max(0.05, min(10.0, wait, give_up - time.perf_counter())))
        if resp.status_code != 200:
            raise RuntimeError(f"{self.system.name} answered {resp.status_code} on {path}: {resp.text[:500]}")
        outcome = self.system.parse(req, resp.json())
        elapsed = time.perf_counter() - start
        if cell is None:
            return
        cell.latencies.append(elapsed)
        cell.sent += 1
        cell.workload_tokens += req.tokens
        cell.prompt_tokens += outcome.prompt_tokens
        cell.computed_tokens += outcome.computed_tokens
        cell.outputs[req.key] = outcome.canonical
        if outcome.ranking:
            cell.rankings[req.key] = outcome.ranking
        if req.kind in AGENT_KINDS:
            cell.steps.append(req.step)
        if len(req.seqs) == 1:
            cell.pairs.append((req.tokens, outcome.computed_tokens))


async def _pool(items: list, concurrency: int, fn, deadline: float) -> None:
    """Run `fn(item)` over `items`, `concurrency` in flight (closed loop); no new item after `deadline`."""
    queue: asyncio.Queue = asyncio.Queue()
    for item in items:
        queue.put_nowait(item)

    async def worker():
        while time.perf_counter() < deadline:
            try:
                item = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            await fn(item)

    await asyncio.gather(*(worker() for _ in range(max(1, min(concurrency, len(items))))))


async def run_cell(sender: Sender, workload: Workload, concurrency: int, est_s: float, budget_s: float,
                   hard_cap_s: float) -> CellResult:
    system = sender.system
    cell = CellResult(system.name, workload.name, concurrency)
    in_flight = in_flight_for(concurrency, est_s, hard_cap_s)
    if workload.kind in AGENT_KINDS and system.stateful:
        # Agents run their calls in order; a time cut would skew the step mix, so they may use the hard cap.
        agents = workload.agents[concurrency]
        cell.planned = sum(len(a.calls) for a in agents)
        runs = agents[:in_flight]
        cell.in_flight = len(runs)
        payloads = {r.key: system.payload(r) for a in runs for r in a.calls}
        warm = [a.warmup for a in runs if a.warmup is not None]
        await _pool(warm, in_flight, lambda r: sender.call(r, system.payload(r), None), math.inf)
        before = system.counters()
        t0 = time.perf_counter()
        deadline = t0 + hard_cap_s

        async def agent(calls):
            for r in calls:
                if time.perf_counter() >= deadline:
                    return
                await sender.call(r, payloads[r.key], cell)

        await asyncio.gather(*(agent(a.calls) for a in runs))
    else:
        items = (interleaved(workload.requests(concurrency)) if workload.kind in AGENT_KINDS
                 else workload.requests(concurrency))
        cell.planned = len(items)
        cell.in_flight = min(in_flight, len(items))
        payloads = {r.key: system.payload(r) for r in items}
        before = system.counters()
        t0 = time.perf_counter()
        await _pool(items, in_flight, lambda r: sender.call(r, payloads[r.key], cell), t0 + budget_s)
    cell.seconds = time.perf_counter() - t0
    after = system.counters()
    if before and after:
        cell.server = {k: after[k] - before.get(k, 0.0) for k in after}
        cell.computed_tokens -= int(cell.server.get("prompt_tokens_cached", 0))  # vLLM's own cache hits
    return cell


async def calibrate(sender: Sender, workload: Workload, calib: list[Request]) -> float:
    """Median seconds of the calibration requests, sent one at a time (also warms the system up)."""
    times = []
    for r in calib:
        t = time.perf_counter()
        await sender.call(r, sender.system.payload(r), None)
        times.append(time.perf_counter() - t)
    return statistics.median(times) if times else 0.0


async def run_system_async(system: System, workloads: dict[str, Workload], calib: dict[str, list[Request]],
                           config: HarnessConfig, only: tuple[str, ...], log=print) -> list[CellResult]:
    results: list[CellResult] = []
    limits = httpx.Limits(max_connections=max(config.concurrencies) + 8,
                          max_keepalive_connections=max(config.concurrencies) + 8)
    timeout = httpx.Timeout(config.request_timeout_s, connect=30.0)
    async with httpx.AsyncClient(base_url=system.url, limits=limits, timeout=timeout) as client:
        sender = Sender(system, client, config)
        for name in only:
            workload = workloads.get(name)
            if workload is None:
                continue
            try:
                est = await calibrate(sender, workload, calib.get(name, []))
            except Exception as exc:  # noqa: BLE001 - recorded in the report, the run goes on
                for c in (workload.cells or workload.agents):
                    results.append(CellResult(system.name, name, c, error=f"calibration failed: {exc}"))
                log(f"  {system.name} {name}: calibration failed: {exc}")
                continue
            concurrencies = [c for c in config.concurrencies if c in (workload.cells or workload.agents)]
            for c in concurrencies:
                w = config.weights[config.concurrencies.index(c)] if len(config.weights) == len(
                    config.concurrencies) else 1 / len(concurrencies)
                budget = config.budget_s * w
                try:
                    cell = await run_cell(sender, workload, c, est, budget, budget * config.hard_cap_factor)
                except Exception as exc:  # noqa: BLE001
                    cell = CellResult(system.name, name, c, error=str(exc)[:500])
                cell.extra["calibration_s"] = round(est, 4)
                results.append(cell)
                if cell.ok:
                    log(f"  {system.name:9s} {name:5s} c={c:<3d} sent {cell.sent:3d}/{cell.planned:<3d} "
                        f"{cell.rps:8.2f} req/s {cell.tokens_per_s:10.0f} tok/s p50 {cell.p50 * 1000:8.1f} ms "
                        f"computed/req {cell.computed_per_request:9.0f}")
                else:
                    log(f"  {system.name:9s} {name:5s} c={c:<3d} FAILED: {cell.error}")
    return results


def run_system(system: System, workloads: dict[str, Workload], calib: dict[str, list[Request]],
               config: HarnessConfig, only: tuple[str, ...], log=print) -> list[CellResult]:
    return asyncio.run(run_system_async(system, workloads, calib, config, only, log))
