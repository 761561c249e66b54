"""Scale-out without losing the prefix cache: 3 `agentprm serve` processes (the shipped default checkpoint)
behind nginx on 127.0.0.1 running the shipped docker/nginx/agentprm.conf (consistent hash on X-Episode-ID,
least_conn without it). 6 concurrent agents each run a `clients.search.beam_search` episode of STEPS
beam-expand calls; the SDK sends one episode id per search.

Measured per phase (fresh episodes each, so no phase warms another's cache): cached_tokens / prompt_tokens
on one replica alone, through the affinity proxy and through a round-robin proxy. Then one replica holding
episodes is SIGKILLed halfway through a run: no SDK call fails, every answer equals the same call scored
alone on a surviving replica, and the episodes that moved hit the cache again on their new replica.

Needs the nginx binary (Debian package `nginx`; `make install-nginx`); skipped without it.
"""

from __future__ import annotations

import collections
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial

import httpx
import pytest

from clients import PRMClient
from clients.search import beam_search
from envs.base import StepOutcome
from tests.conftest import REPO, start_server, stop_server
from tests.reliability.nginx_failover import Nginx, nginx_binary
from tests.reliability.test_failover import CountingTransport

pytestmark = pytest.mark.skipif(nginx_binary() is None,
                                reason="nginx is not installed (apt-get install -y nginx; make install-nginx)")

CHECKPOINT = REPO / "model_store" / "checkpoints" / "agentprm-babyai-small" / "1"
REPLICAS, AGENTS, STEPS, BEAM_WIDTH, CANDIDATES = 3, 6, 10, 2, 3
COLORS = ("red", "green", "blue", "purple", "yellow", "grey")
OBJECTS = ("ball", "box", "key")
ACTIONS = ("move forward", "turn left", "turn right", "pick up", "toggle", "drop")


class Room:
    """A deterministic BabyAI-worded environment that runs exactly STEPS steps (beam search never ends early),
    its observations a function of (seed, step, action): every beam's history is its own prefix."""

    max_steps = STEPS

    def __init__(self, phase: int, agent: int):
        self.phase, self.agent = phase, agent
        self.task = f"pick up the {COLORS[agent]} {OBJECTS[phase % 3]} then open the {COLORS[(agent + phase) % 6]} door"

    def _observation(self) -> str:
        h = (self.seed * 131 + self.t * 17 + sum(map(ord, "".join(self.actions)))) % 997
        return (f"you carry nothing . a {COLORS[h % 6]} {OBJECTS[h % 3]} is {h % 5 + 1} steps ahead and "
                f"a {COLORS[(h // 6) % 6]} door is {(h // 30) % 4 + 1} steps to the left .")

    def reset(self, seed: int) -> str:
        self.seed, self.t, self.actions = seed, 0, []
        return self._observation()

    def step(self, action: str) -> StepOutcome:
        self.t += 1
        self.actions.append(action)
        return StepOutcome(self._observation(), 0.0, self.t >= STEPS, False)

    def replay(self, seed: int, actions: list[str]) -> str:
        observation = self.reset(seed)
        for action in actions:
            observation = self.step(action).observation
        return observation


def propose(env: Room, k: int) -> list[str]:
    return [ACTIONS[(env.t + env.agent + i) % len(ACTIONS)] for i in range(k)]


@dataclass
class Call:
    episode: str
    index: int  # the call's place in its episode, 0 .. STEPS-1
    beams: list
    beam_width: int
    promises: list[list[float]]
    prompt_tokens: int
    cached_tokens: int
    upstream: str
    after_kill: bool


class WhereTransport(CountingTransport):
    """Counts what came back on the wire and remembers the X-Upstream of the last response (the replica nginx used)."""

    upstream = ""

    def handle_request(self, request):
        response = super().handle_request(request)
        # On a retried connect nginx lists every address tried ("a, b"): the last one answered.
        self.upstream = response.headers.get("x-upstream", "direct").split(",")[-1].strip()
        return response


class RecordingClient(PRMClient):
    """The SDK, recording every beam-expand call that returned (a failed one raises out of the search)."""

    def __init__(self, url: str, calls: list, killed: threading.Event, seen: collections.Counter):
        self.wire = WhereTransport(seen)
        super().__init__(url, transport=self.wire, max_retries=8, backoff_base_s=0.05, backoff_cap_s=1.0)
        self.calls, self.killed = calls, killed
        self.after_call = lambda: None

    def beam_expand(self, beams, beam_width, model=None, *, episode_id=None, headers=None):
        out = super().beam_expand(beams, beam_width, model, episode_id=episode_id, headers=headers)
        self.calls.append(Call(episode_id, len(beams[0]["trajectory"]["steps"]), beams, beam_width, [[s.promise for s in c] for c in out.candidates],
                               out.usage.prompt_tokens, out.usage.cached_tokens, self.wire.upstream,
                               self.killed.is_set()))
        self.after_call()
        return out


@dataclass
class Run:
    calls: list = field(default_factory=list)
    failures: list = field(default_factory=list)
    seen: collections.Counter = field(default_factory=collections.Counter)
    killed: threading.Event = field(default_factory=threading.Event)

    def hit_ratio(self, calls=None) -> float:
        calls = self.calls if calls is None else calls
        return sum(c.cached_tokens for c in calls) / max(1, sum(c.prompt_tokens for c in calls))

    def by_episode(self) -> dict[str, list[Call]]:
        out: dict[str, list[Call]] = collections.defaultdict(list)
        for c in self.calls:
            out[c.episode].append(c)
        return out


def run_agents(url: str, phase: int, on_call=None) -> Run:
    """AGENTS concurrent beam searches of STEPS calls each; `on_call(run)` runs after every returned call."""
    run = Run()
    lock = threading.Lock()

    def agent(a: int):
        with RecordingClient(url, run.calls, run.killed, run.seen) as prm:
            if on_call is not None:
                prm.after_call = lambda: on_call(run, lock)
            try:
                beam_search(prm, partial(Room, phase, a), seed=phase * 100 + a, propose=propose,
                            beam_width=BEAM_WIDTH, candidates_per_beam=CANDIDATES,
                            episode_id=f"phase{phase}-agent{a}")
            except BaseException as exc:  # noqa: BLE001 (counted, asserted below)
                run.failures.append(exc)

    threads = [threading.Thread(target=agent, args=(a,)) for a in range(AGENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(240)
    return run


@pytest.fixture(scope="module")
def replicas():
    # Started together, with a longer wait than the default: 3 model loads share 2 busy cores.
    with ThreadPoolExecutor(REPLICAS) as pool:
        starts = [pool.submit(start_server, CHECKPOINT, ready_timeout=240) for _ in range(REPLICAS)]
    servers = []
    try:
        servers = [s.result() for s in starts]
        yield servers
    finally:
        for s in starts:
            if s.exception() is None:
                stop_server(s.result()[0])


def test_affinity_keeps_the_cache_hit_ratio_and_survives_a_replica_kill(replicas):
    urls = [url for _, url in replicas]
    ports = [int(url.rsplit(":", 1)[1]) for url in urls]

    clock = [time.monotonic()]
    single = run_agents(urls[0], phase=1)
    with Nginx(ports) as round_robin:
        spread = run_agents(round_robin.url, phase=2)
    with Nginx(ports, affinity=True) as proxy:
        affine = run_agents(proxy.url, phase=3)
        clock.append(time.monotonic())

        # Without an episode id the proxy spreads requests (least_conn) and still answers them.
        with RecordingClient(proxy.url, [], threading.Event(), collections.Counter()) as anonymous:
            where = set()
            for _ in range(2 * REPLICAS):
                anonymous.models()
                where.add(anonymous.wire.upstream)

        victim_holder: dict = {}

        def kill_halfway(run: Run, lock: threading.Lock):
            with lock:
                if run.killed.is_set() or len(run.calls) < AGENTS * STEPS // 2:
                    return
                # The replica that serves the most episodes of this run, so some episodes must move.
                first = [calls[0].upstream for calls in run.by_episode().values()]
                busiest = collections.Counter(first).most_common(1)[0][0]
                index = ports.index(int(busiest.rsplit(":", 1)[1]))
                replicas[index][0].kill()  # SIGKILL under load: connections drop, nothing drains
                victim_holder.update(index=index, upstream=busiest)
                run.killed.set()

        chaos = run_agents(proxy.url, phase=4, on_call=kill_halfway)
        clock.append(time.monotonic())

    ratios = {"single": single.hit_ratio(), "affinity": affine.hit_ratio(), "round robin": spread.hit_ratio()}
    print(f"\nhit ratio (cached/prompt tokens), {AGENTS} agents x {STEPS} beam-expand calls: "
          + ", ".join(f"{k} {v:.3f}" for k, v in ratios.items())
          + "; tokens computed: " + ", ".join(f"{k} {sum(c.prompt_tokens - c.cached_tokens for c in r.calls)}"
                                              for k, r in (("single", single), ("affinity", affine),
                                                           ("round robin", spread)))
          + f"; 3 phases {clock[1] - clock[0]:.1f} s, the kill phase {clock[2] - clock[1]:.1f} s")
    for run in (single, spread, affine):
        assert not run.failures, run.failures[0]
        assert len(run.calls) == AGENTS * STEPS
    # Affinity: every episode stays on one replica, the episodes use more than one, and the fleet keeps
    # (almost) one replica's hit ratio; round robin loses much of it.
    assert all(len({c.upstream for c in calls}) == 1 for calls in affine.by_episode().values())
    assert len({c.upstream for c in affine.calls}) > 1
    assert len(where) > 1, where
    assert ratios["affinity"] >= 0.9 * ratios["single"]
    assert ratios["round robin"] < ratios["affinity"]

    # The kill: no failed call, every answer equals the same call scored alone on a survivor.
    assert chaos.killed.is_set() and replicas[victim_holder["index"]][0].poll() is not None
    assert not chaos.failures, f"{len(chaos.failures)} failed searches, first: {chaos.failures[0]!r}"
    assert len(chaos.calls) == AGENTS * STEPS
    survivor = next(url for i, url in enumerate(urls) if i != victim_holder["index"])
    worst = 0.0
    with PRMClient(survivor) as alone:
        for call in chaos.calls:
            again = alone.beam_expand(call.beams, call.beam_width)
            for got, want in zip(call.promises, again.candidates):
                worst = max([worst] + [abs(g - w.promise) for g, w in zip(got, want)])
    assert worst <= 1e-5, worst

    # The victim's episodes moved to one survivor each, missed once there, then hit again as often as the
    # episodes that stayed put did at the same steps.
    moved = {e: calls for e, calls in chaos.by_episode().items()
             if any(c.upstream == victim_holder["upstream"] for c in calls)}
    stayed = [c for e, calls in chaos.by_episode().items() if e not in moved for c in calls]
    assert moved and stayed
    first_after, later = [], []
    for calls in moved.values():
        post = [c for c in sorted(calls, key=lambda c: c.index) if c.upstream != victim_holder["upstream"]]
        assert len({c.upstream for c in post}) == 1, "a moved episode must settle on one replica"
        assert post and all(c.after_kill for c in post)
        first_after.append(post[0])
        later += post[1:]
    assert later, "the moved episodes need calls after their first on the new replica"
    later_steps = {c.index for c in later}
    recovered = {"first call on the new replica": chaos.hit_ratio(first_after),
                 "later calls": chaos.hit_ratio(later),
                 "episodes that stayed, same steps": chaos.hit_ratio([c for c in stayed if c.index in later_steps])}
    print(f"kill: {len(chaos.calls)} SDK calls, 0 failed, max |answer - alone| {worst:.1e}; "
          f"{len(moved)} episodes moved, their hit ratio " + ", ".join(f"{k} {v:.3f}" for k, v in recovered.items())
          + f"; on the wire before retries: {dict(chaos.seen)}")
    assert recovered["first call on the new replica"] < recovered["later calls"]
    assert recovered["later calls"] >= 0.9 * recovered["episodes that stayed, same steps"]
