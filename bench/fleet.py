"""Fleet simulation: cache hit ratio and latency of 10 to 1,000 replicas under episode-affinity routing.

No servers: a discrete-event simulation whose inputs were measured here on one replica (`measure`):
the service time of a beam-expand call as a function of the tokens it computes, the prompt tokens of call
t of an episode, and the tokens computed when the episode's previous call is in the replica's prefix
cache (hit) or not (miss). Agent episodes arrive as a Poisson stream; each makes `steps` calls one after
another with a think time between them (the agent's own work). Each replica serves its calls first come,
first served; its prefix cache holds the last `cache_episodes` episodes it served (LRU).

Routing: `consistent` is nginx's `hash $http_x_episode_id consistent` (a ketama ring, 160 points per
replica, as docker/nginx/agentprm.conf), `round_robin` what a plain Service does per request. Scale events
change the replica count mid-run (the ring moves about 1/N of the episodes); hot episodes issue
`hot_branches` calls at once per step (an agent fanning out), all on their one replica.

    python -m bench.fleet measure                       # inputs on this machine -> .cache/fleet/inputs.json
    python -m bench.fleet simulate --out bench/FLEET.md  # the tables in bench/FLEET.md (minutes for 1,000)
"""

from __future__ import annotations

import argparse
import bisect
import collections
import hashlib
import heapq
import json
import random
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
INPUTS_FILE = REPO / ".cache" / "fleet" / "inputs.json"


@dataclass(frozen=True)
class Inputs:
    """Linear fits measured on one replica. Tokens of call t (t = 0 .. steps-1): prompt = p0 + p1*t,
    computed on a hit = h0 + h1*t, on a miss = m0 + m1*t; service seconds = overhead + per_token * computed."""
    overhead_s: float
    per_token_s: float
    prompt: tuple[float, float]
    hit_computed: tuple[float, float]
    miss_computed: tuple[float, float]
    source: str = ""

    def tokens(self, fit: tuple[float, float], t: int) -> float:
        return max(1.0, fit[0] + fit[1] * t)

    def service_s(self, computed: float) -> float:
        return self.overhead_s + self.per_token_s * computed


# `python -m bench.fleet measure` on the shared 2-core CPU machine, 2026-12-02 01:11 UTC (load average 5; the
# quietest of four runs: under a load average of 8-12 the same command measured 3 to 50 times slower calls),
# default checkpoint agentprm-babyai-small:1, 2 beams x 3 candidates per call, one call at a time.
MEASURED = Inputs(overhead_s=0.00327, per_token_s=1.637e-5, prompt=(180.2, 94.0), hit_computed=(86.8, 0.39),
                  miss_computed=(76.1, 31.3), source="bench/fleet.py MEASURED: 2026-12-02 01:11, 2-core CPU")


# ---- measurement -------------------------------------------------------------------------------------------------

def _fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else 0.0
    return my - slope * mx, slope


def measure(checkpoint: Path, episodes: int = 4, steps: int = 10) -> Inputs:
    """Beam-expand episodes on an in-process engine, one call at a time: with the prefix cache (every call
    after the first is a hit) and without it (every call a miss; a request's candidates still share)."""
    import asyncio

    from service.engine.engine import EngineConfig, PRMEngine
    from service.engine.types import Beam, Step, Trajectory

    words = ("red ball", "blue key", "green box", "grey door", "yellow ball", "purple key")
    actions = ("move forward", "turn left", "turn right", "pick up", "toggle", "drop")

    def beams_at(episode: int, t: int) -> list[Beam]:
        out = []
        for b in range(2):
            steps_so_far = tuple(Step(f"a {words[(episode + b + i) % 6]} is {(i + b) % 4 + 1} steps ahead .",
                                      actions[(episode + i + b) % 6]) for i in range(t))
            out.append(Beam(Trajectory(f"go to the {words[episode % 6]} then open the door", steps_so_far),
                            f"a {words[(episode + t + b) % 6]} is {t % 3 + 1} steps ahead .", actions[:3]))
        return out

    async def run(cache_bytes: int, calls: list[tuple[int, int]], repeats: int):
        engine = PRMEngine.from_checkpoint(checkpoint, EngineConfig(device="cpu", prefix_cache_bytes=cache_bytes))
        await engine.start()
        rows = []
        try:
            await engine.expand("default", beams_at(99, 2), 2)  # warm-up
            for e, t in calls:
                best = float("inf")
                for _ in range(repeats):  # the fastest of a few: the machine is shared
                    start = time.perf_counter()
                    out = await engine.expand("default", beams_at(e, t), 2)
                    best = min(best, time.perf_counter() - start)
                rows.append((t, out.usage.prompt_tokens, out.usage.computed_tokens, best))
        finally:
            await engine.shutdown()
        return rows

    # Token counts: whole episodes, with the cache (one pass: a repeat would hit in full) and without it.
    # Service time: uncached calls (their repeats compute the same tokens) over a wide range of history lengths.
    episode_calls = [(e, t) for e in range(episodes) for t in range(steps)]
    cached = asyncio.run(run(256 * 1024 * 1024, episode_calls, 1))
    uncached = asyncio.run(run(0, episode_calls, 1))
    timed = asyncio.run(run(0, [(e, t) for e in range(3) for t in (0, 5, 10, 20, 30, 40)], 5))
    hits = [r for r in cached if r[0] > 0]
    overhead, per_token = _fit([r[2] for r in timed], [r[3] for r in timed])
    return Inputs(overhead_s=max(overhead, 0.0), per_token_s=per_token,
                  prompt=_fit([r[0] for r in cached], [r[1] for r in cached]),
                  hit_computed=_fit([r[0] for r in hits], [r[2] for r in hits]),
                  miss_computed=_fit([r[0] for r in uncached], [r[2] for r in uncached]),
                  source=f"measured {time.strftime('%Y-%m-%d %H:%M')} on {checkpoint}")


# ---- simulation --------------------------------------------------------------------------------------------------

def _hash(text: str) -> int:
    return int.from_bytes(hashlib.md5(text.encode()).digest()[:8], "big")


class Ring:
    """Consistent hashing: `vnodes` points per replica on a 64-bit ring; a key goes to the next point."""

    def __init__(self, replicas: list[int], vnodes: int = 160):
        points = sorted((_hash(f"replica-{r}-{v}"), r) for r in replicas for v in range(vnodes))
        self.keys = [p[0] for p in points]
        self.owners = [p[1] for p in points]

    def lookup(self, key: str) -> int:
        i = bisect.bisect(self.keys, _hash(key)) % len(self.keys)
        return self.owners[i]


@dataclass(frozen=True)
class Scenario:
    replicas: int
    policy: str = "consistent"  # or "round_robin"
    load: float = 0.6  # offered work / fleet capacity (with cache hits)
    episodes_per_replica: int = 40
    steps: int = 10
    think_s: float = 1.0
    cache_episodes: int = 64
    hot_episodes: int = 0
    hot_branches: int = 16
    scale_to: int | None = None  # replica count after the scale event (at half the arrival span)
    seed: int = 0


def simulate(inputs: Inputs, sc: Scenario) -> dict:
    rng = random.Random(sc.seed)
    hit_service = sum(inputs.service_s(inputs.tokens(inputs.hit_computed, t)) for t in range(sc.steps))
    episode_rate = sc.load * sc.replicas / hit_service  # episodes per second the fleet can take at `load`
    n_episodes = sc.episodes_per_replica * sc.replicas
    arrivals, now = [], 0.0
    for _ in range(n_episodes):
        now += rng.expovariate(episode_rate)
        arrivals.append(now)
    scale_time = arrivals[len(arrivals) // 2] if sc.scale_to else float("inf")
    hot = set(rng.sample(range(n_episodes), sc.hot_episodes)) if sc.hot_episodes else set()

    live = list(range(sc.replicas))
    ring = Ring(live)
    next_id = sc.replicas
    free_at = collections.defaultdict(float)
    caches: dict[int, collections.OrderedDict] = collections.defaultdict(collections.OrderedDict)
    home: dict[int, int] = {}  # episode -> replica (consistent), memoised until the ring changes
    rr = 0
    events = [(t, 0, "call", e, 0) for e, t in enumerate(arrivals)]
    heapq.heapify(events)
    seq = 1
    pending = collections.Counter()  # outstanding calls of an episode's current step
    latencies, prompt_sum, computed_sum = [], 0.0, 0.0
    active: set[int] = set()  # episodes between their first call and their last answer
    moved = active_at_scale = 0
    scaled = False

    while events:
        t_now, _, kind, episode, step = heapq.heappop(events)
        if not scaled and t_now >= scale_time:
            scaled = True
            before = {e: ring.lookup(f"episode-{e}") for e in active}
            if sc.scale_to > len(live):
                live += list(range(next_id, next_id + sc.scale_to - len(live)))
                next_id = max(live) + 1
            else:
                for r in live[sc.scale_to:]:
                    caches.pop(r, None)
                live = live[:sc.scale_to]
            ring = Ring(live)
            home = {}
            moved = sum(ring.lookup(f"episode-{e}") != r for e, r in before.items())
            active_at_scale = len(before)
        if kind == "done":
            pending[episode] -= 1
            if pending[episode] == 0 and step + 1 < sc.steps:
                heapq.heappush(events, (t_now + rng.expovariate(1 / sc.think_s), seq, "call", episode, step + 1))
                seq += 1
            elif pending[episode] == 0:
                active.discard(episode)
            continue
        active.add(episode)
        branches = sc.hot_branches if episode in hot else 1
        for b in range(branches):
            if sc.policy == "consistent":
                if episode not in home:
                    home[episode] = ring.lookup(f"episode-{episode}")
                replica = home[episode]
            else:
                replica = live[rr % len(live)]
                rr += 1
            cache = caches[replica]
            hit = episode in cache
            cache[episode] = True
            cache.move_to_end(episode)
            while len(cache) > sc.cache_episodes:
                cache.popitem(last=False)
            prompt = inputs.tokens(inputs.prompt, step)
            computed = inputs.tokens(inputs.hit_computed if hit else inputs.miss_computed, step)
            start = max(t_now, free_at[replica])
            free_at[replica] = start + inputs.service_s(computed)
            latencies.append(free_at[replica] - t_now)
            prompt_sum += prompt
            computed_sum += computed
            pending[episode] += 1
            heapq.heappush(events, (free_at[replica], seq, "done", episode, step))
            seq += 1

    latencies.sort()

    def pct(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))]

    out = {"replicas": sc.replicas, "policy": sc.policy, "calls": len(latencies),
           "hit_ratio": 1 - computed_sum / prompt_sum, "computed_per_call": computed_sum / len(latencies),
           "computed_total": computed_sum,
           "p50_s": pct(0.50), "p99_s": pct(0.99), "hot_episodes": sc.hot_episodes}
    if sc.scale_to:
        out.update(scale_to=sc.scale_to, moved=moved, moved_share=moved / max(1, active_at_scale))
    return out


def run(inputs: Inputs, sc: Scenario) -> dict:
    return simulate(inputs, sc)


def single_replica_hit_ratio(inputs: Inputs, steps: int) -> float:
    """An episode alone on one replica: its first call misses, every later one hits."""
    prompt = sum(inputs.tokens(inputs.prompt, t) for t in range(steps))
    computed = inputs.tokens(inputs.miss_computed, 0) + sum(inputs.tokens(inputs.hit_computed, t)
                                                              for t in range(1, steps))
    return 1 - computed / prompt


# ---- report ------------------------------------------------------------------------------------------------------

def report(inputs: Inputs, counts: list[int], episodes_per_replica: int) -> str:
    lines = [f"Inputs: {json.dumps(asdict(inputs))}", "",
             f"One replica alone, every episode's history cached after its first call: hit ratio "
             f"{single_replica_hit_ratio(inputs, 10):.3f}.", "",
             "| replicas | routing | calls | hit ratio | tokens computed / call | p50 ms | p99 ms |",
             "| ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    for n in counts:
        for policy in ("consistent", "round_robin"):
            r = run(inputs, Scenario(n, policy, episodes_per_replica=episodes_per_replica))
            lines.append(f"| {n} | {policy} | {r['calls']} | {r['hit_ratio']:.3f} | {r['computed_per_call']:.0f} | "
                         f"{r['p50_s'] * 1000:.1f} | {r['p99_s'] * 1000:.1f} |")
    lines += ["", "Scale events at half the arrival span (consistent hashing); the cost is the tokens computed",
              "beyond the same run (same seed, same arrivals) without the event:", "",
              "| replicas | to | episodes moved | extra tokens computed | per moved episode | of all tokens computed |",
              "| ---: | ---: | ---: | ---: | ---: | ---: |"]
    for n, to in ((100, 110), (100, 90), (100, 200)):
        base = run(inputs, Scenario(n, episodes_per_replica=episodes_per_replica))
        r = run(inputs, Scenario(n, scale_to=to, episodes_per_replica=episodes_per_replica))
        extra = r["computed_total"] - base["computed_total"]
        lines.append(f"| {n} | {to} | {r['moved']} ({r['moved_share']:.1%}) | {extra:.0f} | "
                     f"{extra / max(1, r['moved']):.0f} | {extra / base['computed_total']:.2%} |")
    lines += ["", f"Hot episodes (each issues {Scenario(1).hot_branches} calls at once per step), 100 replicas:", "",
              "| hot episodes | routing | p50 ms | p99 ms | hit ratio |", "| ---: | --- | ---: | ---: | ---: |"]
    for hot in (0, 5, 20):
        for policy in ("consistent", "round_robin"):
            r = run(inputs, Scenario(100, policy, hot_episodes=hot, episodes_per_replica=episodes_per_replica))
            lines.append(f"| {hot} | {policy} | {r['p50_s'] * 1000:.1f} | {r['p99_s'] * 1000:.1f} | "
                         f"{r['hit_ratio']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fleet", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("measure", help="measure the inputs on this machine (an in-process engine)")
    m.add_argument("--checkpoint", type=Path,
                   default=REPO / "model_store" / "checkpoints" / "agentprm-babyai-small" / "1")
    m.add_argument("--out", type=Path, default=INPUTS_FILE)
    s = sub.add_parser("simulate", help="the fleet tables (markdown)")
    s.add_argument("--inputs", type=Path, help="a file from `measure` (default: the MEASURED figures in this module)")
    s.add_argument("--replicas", default="10,30,100,300,1000")
    s.add_argument("--episodes-per-replica", type=int, default=40)
    s.add_argument("--out", type=Path, help="write the tables here as well as to stdout")
    args = parser.parse_args(argv)
    if args.command == "measure":
        inputs = measure(args.checkpoint)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(asdict(inputs), indent=2))
        print(json.dumps(asdict(inputs), indent=2))
        return 0
    inputs = MEASURED
    if args.inputs:
        raw = json.loads(args.inputs.read_text())
        inputs = replace(MEASURED, **{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})
    text = report(inputs, [int(n) for n in args.replicas.split(",")], args.episodes_per_replica)
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
