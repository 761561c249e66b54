"""Benchmark workloads: the same requests, as token ids rendered by our Renderer, for every system.

Contract:
- `build_workloads(checkpoint_dir, sizes, seed)` returns {"W1": Workload, "W2": Workload, "W3": Workload}.
  Every request is built once, deterministically from `seed`, and sent unchanged to every system; every
  cell (workload x concurrency) gets requests of its own (distinct tasks and observations), so no system
  ever finds a previous cell's sequences in a cache.
- W1 `score`: one independent trajectory per request (`sizes.w1_steps` steps, ~300-600 tokens).
- W2 `rerank`: 16 candidate trajectories of one task per request; candidates share the task and the
  first observation (Best-of-N samples from one start state) and diverge from the first action on.
- W3 `expand`: an agent loop of beam-expand calls: 8 beams x 8 candidate actions, 15 steps per episode,
  every call carrying the full history of every beam (what agent frameworks send). Histories follow a
  fixed, seeded selection of (parent beam, candidate) pairs, not the scores, so every system runs
  exactly the same calls. A cell's calls are split over agents: agent i starts at a staggered step
  of its own episode (`Agent.calls`) and `Agent.warmup` is the call it made just before (sent,
  untimed, only to systems that keep state across requests, so they start warm as in steady state).
- W4 `incremental`: incremental scoring: an agent scores its growing trajectory after every step (`/v1/score`
  with the full history each time, `sizes.w4_steps` steps per episode), as agent loops use a PRM for progress.
  Split over agents like W3 (staggered starts, warm-up call). Canonical output: the new step's promise.
- A `Request` carries our API body (`body`), the logical sequences a peer without a rerank or beam
  API sends (`seqs`: one per trajectory/candidate, with readouts [V_0, Q_0, ...] per docs/ARCHITECTURE.md "Rendering"), and the
  naive per-step prefixes (`naive_body`: each step's prefix as its own trajectory).
- Canonical outputs (what systems are compared on): W1/W2 the step promises [Q_0..Q_T] of each
  sequence (V_0 left out: vLLM's STEP pooling has no state readout); W3 each candidate's promise; W4 the
  promise of the trajectory's last step. A peer that returns only last promises (vLLM with LAST pooling) is
  compared on the last element of each W1/W2 row (bench.report.comparisons).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from model_store.render import Renderer
from service.engine.types import Step, Trajectory

COLORS = ("red", "green", "blue", "purple", "yellow", "grey")
TYPES = ("ball", "box", "key")
DOOR_STATES = ("open", "closed", "locked")
BASIC_ACTIONS = ("turn left", "turn right", "move forward", "pick up", "drop", "toggle", "done")
AGENT_KINDS = ("expand", "incremental")  # workloads run as agents (each agent's calls in order)


@dataclass(frozen=True)
class Sizes:
    w1_steps: tuple[int, int] = (10, 20)
    w2_candidates: int = 16
    w2_steps: tuple[int, int] = (8, 14)
    w3_beams: int = 8
    w3_candidates: int = 8
    w3_steps: int = 15
    # Requests per cell at each concurrency (W3: beam-expand calls, split over `concurrency` agents).
    w1_requests: dict = field(default_factory=lambda: {1: 16, 8: 32, 32: 64})
    w2_requests: dict = field(default_factory=lambda: {1: 6, 8: 16, 32: 32})
    w3_calls: dict = field(default_factory=lambda: {1: 15, 8: 32, 32: 64})
    w4_steps: int = 20
    w4_calls: dict = field(default_factory=lambda: {1: 20, 8: 40, 32: 64})
    long_tokens: int = 1500  # the long-trajectory cell (ours only, for the matmul-peak fraction)
    long_requests: int = 8

    @classmethod
    def quick(cls) -> "Sizes":
        return cls(w1_steps=(3, 6), w2_steps=(2, 4), w3_steps=4, w1_requests={1: 3, 8: 8, 32: 32},
                   w2_requests={1: 2, 8: 8, 32: 16}, w3_calls={1: 4, 8: 8, 32: 32}, w4_steps=4,
                   w4_calls={1: 4, 8: 8, 32: 32}, long_tokens=300,
                   long_requests=2)


@dataclass(frozen=True)
class Seq:
    ids: tuple[int, ...]
    readouts: tuple[int, ...]  # [state readout, step readouts...]


@dataclass
class Request:
    kind: str  # "score" | "rerank" | "expand" | "incremental"
    key: str
    body: dict  # our API's JSON body
    seqs: list[Seq]  # logical sequences: one per trajectory / candidate
    naive_body: dict  # /v1/score body with every step's prefix as its own trajectory
    naive_map: list[list[int]]  # canonical output index -> trajectory indices in naive_body (last promise)
    step: int = 0  # W3: the episode step of this call

    @property
    def tokens(self) -> int:
        return sum(len(s.ids) for s in self.seqs)

    def canonical(self, per_seq_readouts: list[list[float]], with_state: bool) -> list[list[float]]:
        """Canonical outputs from promises at each sequence's readouts ([V_0, Q...] if `with_state`)."""
        rows = [r[1:] if with_state else list(r) for r in per_seq_readouts]
        if self.kind in AGENT_KINDS:
            return [[r[-1]] for r in rows]
        return rows


@dataclass
class Agent:
    warmup: Request | None
    calls: list[Request]


@dataclass
class Workload:
    name: str
    kind: str
    description: str
    cells: dict[int, list[Request]] = field(default_factory=dict)  # W1, W2 (and "long")
    agents: dict[int, list[Agent]] = field(default_factory=dict)  # W3, W4

    def requests(self, concurrency: int) -> list[Request]:
        if self.kind not in AGENT_KINDS:
            return self.cells[concurrency]
        return [r for a in self.agents[concurrency] for r in a.calls]


class TextGen:
    """BabyAI-like observations, tasks and free-text actions from a seeded RNG."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)

    def obj(self) -> str:
        r = self.rng
        if r.random() < 0.25:
            return f"a {r.choice(DOOR_STATES)} {r.choice(COLORS)} door"
        return f"a {r.choice(COLORS)} {r.choice(TYPES)}"

    def position(self) -> str:
        r = self.rng
        ahead, side = r.randint(0, 6), r.randint(0, 4)
        parts = [f"{ahead} step{'s' if ahead != 1 else ''} ahead"] if ahead else []
        if side:
            parts.append(f"{side} step{'s' if side != 1 else ''} {r.choice(('left', 'right'))}")
        return " and ".join(parts) or "right here"

    def observation(self) -> str:
        r = self.rng
        seen = ", ".join(f"{self.obj()} {self.position()}" for _ in range(1 if r.random() < 0.6 else 2))
        text = f"You see {seen}."
        if r.random() < 0.3:
            text += f" Walls: {r.randint(1, 6)} steps ahead."
        if r.random() < 0.2:
            text += f" You are facing {self.obj()}."
        if r.random() < 0.15:
            text += f" You are carrying {self.obj()}."
        return text

    def task(self) -> str:
        r = self.rng
        c1, t1, c2, t2 = r.choice(COLORS), r.choice(TYPES), r.choice(COLORS), r.choice(TYPES)
        return r.choice((f"go to the {c1} {t1}", f"pick up the {c1} {t1}", f"open the {c1} door",
                         f"put the {c1} {t1} next to the {c2} {t2}",
                         f"pick up the {c1} {t1} then go to the {c2} {t2}"))

    def action(self) -> str:
        r = self.rng
        if r.random() < 0.6:
            return r.choice(BASIC_ACTIONS)
        return r.choice((f"go to {self.obj()}", f"pick up {self.obj()}", f"toggle {self.obj()}",
                         f"drop the {r.choice(COLORS)} {r.choice(TYPES)}"))

    def distinct_actions(self, n: int) -> list[str]:
        out: list[str] = []
        for _ in range(50 * n):
            if len(out) == n:
                break
            a = self.action()
            if a not in out:
                out.append(a)
        while len(out) < n:  # bounded fallback: unique by construction
            out.append(f"move forward {len(out)} steps")
        return out

    def steps(self, n: int) -> list[Step]:
        return [Step(self.observation(), self.action()) for _ in range(n)]


def _traj_json(task: str, steps) -> dict:
    return {"task": task, "steps": [{"observation": s.observation, "action": s.action} for s in steps]}


class Builder:
    def __init__(self, renderer: Renderer, sizes: Sizes, max_seq_len: int):
        self.renderer = renderer
        self.sizes = sizes
        self.max_seq_len = max_seq_len

    def seq(self, task: str, steps) -> Seq:
        r = self.renderer.render(Trajectory(task, tuple(steps)))
        if len(r.ids) > self.max_seq_len:
            raise ValueError(f"a bench sequence of {len(r.ids)} tokens exceeds the model's max_seq_len "
                             f"{self.max_seq_len}; use smaller --sizes or a model with a longer context")
        return Seq(r.ids, r.readouts)

    @staticmethod
    def _naive(trajs: list[tuple[str, list[Step]]]) -> tuple[dict, list[list[int]]]:
        """Every step's prefix of every trajectory as its own trajectory (the per-step baseline)."""
        out, mapping = [], []
        for task, steps in trajs:
            idx = []
            for t in range(1, len(steps) + 1):
                idx.append(len(out))
                out.append(_traj_json(task, steps[:t]))
            mapping.append(idx)
        return {"model": "default", "trajectories": out}, mapping

    def score_request(self, gen: TextGen, key: str, n_steps: int) -> Request:
        task, steps = gen.task(), gen.steps(n_steps)
        naive_body, naive_map = self._naive([(task, steps)])
        body = {"model": "default", "trajectories": [_traj_json(task, steps)], "aggregate": "last"}
        # naive_map per canonical output row: the prefix trajectories whose last promise forms the row.
        return Request("score", key, body, [self.seq(task, steps)], naive_body, naive_map)

    def rerank_request(self, gen: TextGen, key: str) -> Request:
        s = self.sizes
        task, first_obs = gen.task(), gen.observation()
        cands = []
        for _ in range(s.w2_candidates):
            steps = gen.steps(gen.rng.randint(*s.w2_steps))
            steps[0] = Step(first_obs, steps[0].action)
            cands.append(steps)
        naive_body, naive_map = self._naive([(task, c) for c in cands])
        body = {"model": "default", "task": task, "aggregate": "last",
                "candidates": [{"steps": _traj_json(task, c)["steps"]} for c in cands]}
        return Request("rerank", key, body, [self.seq(task, c) for c in cands], naive_body, naive_map)

    def episode(self, gen: TextGen, key: str, upto: int | None = None) -> list[Request]:
        """One agent episode: `w3_steps` beam-expand calls of `w3_beams` x `w3_candidates` (the first `upto`)."""
        s = self.sizes
        task, root_obs = gen.task(), gen.observation()
        beams: list[tuple[list[Step], str]] = [([], root_obs) for _ in range(s.w3_beams)]
        calls = []
        for t in range(min(s.w3_steps, upto if upto is not None else s.w3_steps)):
            cand_sets = [gen.distinct_actions(s.w3_candidates) for _ in beams]
            body = {"model": "default", "beam_width": s.w3_beams,
                    "beams": [{"trajectory": _traj_json(task, hist), "observation": obs, "candidates": cands}
                              for (hist, obs), cands in zip(beams, cand_sets)]}
            seqs, naive_trajs = [], []
            for (hist, obs), cands in zip(beams, cand_sets):
                for a in cands:
                    steps = hist + [Step(obs, a)]
                    seqs.append(self.seq(task, steps))
                    naive_trajs.append(_traj_json(task, steps))
            naive_map = [[i] for i in range(len(naive_trajs))]
            # The naive system re-scores each beam's last step (the baseline of progress) on its own.
            naive_trajs += [_traj_json(task, hist) for hist, _ in beams if hist]
            calls.append(Request("expand", f"{key}/t{t}", body, seqs, {"model": "default",
                                                                        "trajectories": naive_trajs}, naive_map, t))
            # Fixed selection: 8 distinct (beam, candidate) pairs, skewed towards the first beams.
            pairs = sorted(gen.rng.sample(range(len(beams) * s.w3_candidates), s.w3_beams))
            beams = [(beams[p // s.w3_candidates][0] + [Step(beams[p // s.w3_candidates][1],
                                                             cand_sets[p // s.w3_candidates][p % s.w3_candidates])],
                      gen.observation()) for p in pairs]
        return calls

    def incremental_episode(self, gen: TextGen, key: str, upto: int | None = None) -> list[Request]:
        """One agent episode of W4: after each of `w4_steps` steps, /v1/score of the trajectory so far."""
        s = self.sizes
        task, steps = gen.task(), gen.steps(s.w4_steps)
        calls = []
        for t in range(min(s.w4_steps, upto if upto is not None else s.w4_steps)):
            body = {"model": "default", "trajectories": [_traj_json(task, steps[:t + 1])], "aggregate": "last"}
            calls.append(Request("incremental", f"{key}/t{t}", body, [self.seq(task, steps[:t + 1])], body, [[0]], t))
        return calls

    def long_request(self, gen: TextGen, key: str, tokens: int) -> Request:
        task = gen.task()
        steps: list[Step] = []
        for _ in range(10_000):
            step = gen.steps(1)[0]
            if len(self.renderer.render(Trajectory(task, tuple(steps + [step]))).ids) > tokens:
                break
            steps.append(step)
        naive_body, naive_map = self._naive([(task, steps)])
        body = {"model": "default", "trajectories": [_traj_json(task, steps)], "aggregate": "last"}
        return Request("score", key, body, [self.seq(task, steps)], naive_body, naive_map)


def load_renderer(checkpoint_dir: Path | str) -> tuple[Renderer, int]:
    from tokenizers import Tokenizer

    from model_store.store import read_manifest

    checkpoint_dir = Path(checkpoint_dir)
    manifest = read_manifest(checkpoint_dir)
    tokenizer = Tokenizer.from_file(str(checkpoint_dir / "tokenizer" / "tokenizer.json"))
    return Renderer(tokenizer, manifest.template), manifest.max_seq_len


def build_workloads(checkpoint_dir: Path | str, sizes: Sizes = Sizes(), seed: int = 0,
                    concurrencies: tuple[int, ...] = (1, 8, 32)) -> dict[str, Workload]:
    renderer, max_seq_len = load_renderer(checkpoint_dir)
    b = Builder(renderer, sizes, max_seq_len)
    w1 = Workload("W1", "score", f"score: one independent trajectory per request, {sizes.w1_steps[0]}-"
                                 f"{sizes.w1_steps[1]} steps")
    w2 = Workload("W2", "rerank", f"rerank: {sizes.w2_candidates} candidates per task ({sizes.w2_steps[0]}-"
                                  f"{sizes.w2_steps[1]} steps each), sharing the task and first observation")
    w3 = Workload("W3", "expand", f"agent loop: beam-expand calls, {sizes.w3_beams} beams x {sizes.w3_candidates} "
                                  f"candidates, {sizes.w3_steps}-step episodes, full history in every call")
    w4 = Workload("W4", "incremental", f"incremental scoring: an agent scores its growing trajectory after every "
                                       f"step, {sizes.w4_steps}-step episodes, full history in every call")
    for ci, c in enumerate(concurrencies):
        gen = TextGen(seed * 1000 + ci)
        w1.cells[c] = [b.score_request(gen, f"W1/c{c}/{i}", gen.rng.randint(*sizes.w1_steps))
                       for i in range(sizes.w1_requests[c])]
        w2.cells[c] = [b.rerank_request(gen, f"W2/c{c}/{i}") for i in range(sizes.w2_requests[c])]
        w3.agents[c] = _agents(b.episode, "W3", gen, c, sizes.w3_calls[c], sizes.w3_steps)
        w4.agents[c] = _agents(b.incremental_episode, "W4", gen, c, sizes.w4_calls[c],
                               sizes.w4_steps)
    long = Workload("long", "score", f"long trajectories of ~{sizes.long_tokens} tokens (ours only: matmul fraction)")
    gen = TextGen(seed * 1000 + 999)
    long.cells[8] = [b.long_request(gen, f"long/{i}", min(sizes.long_tokens, max_seq_len))
                     for i in range(sizes.long_requests)]
    return {"W1": w1, "W2": w2, "W3": w3, "W4": w4, "long": long}


def _agents(episode, name: str, gen: TextGen, agents: int, calls: int, steps: int) -> list[Agent]:
    """`agents` agents sharing `calls` calls; agent i starts at a staggered step of its own episode."""
    per_agent = max(1, calls // agents)
    out = []
    for i in range(agents):
        start = 0 if agents == 1 else (i * steps) // agents
        seq: list[Request] = []
        for e in range(start + per_agent):  # continue into a new episode past the last step
            if len(seq) >= start + per_agent:
                break
            seq += episode(gen, f"{name}/a{agents}/{i}/e{e}", upto=start + per_agent - len(seq))
        out.append(Agent(warmup=seq[start - 1] if start > 0 else None, calls=seq[start:start + per_agent]))
    return out


def build_calibration(checkpoint_dir: Path | str, sizes: Sizes = Sizes(), seed: int = 0) -> dict[str, list[Request]]:
    """A few requests per workload, distinct from every measured one: warm-up and per-request time estimate."""
    renderer, max_seq_len = load_renderer(checkpoint_dir)
    b = Builder(renderer, sizes, max_seq_len)
    gen = TextGen(seed * 1000 + 777)
    mid = max(1, sizes.w3_steps // 2)
    return {"W1": [b.score_request(gen, f"calib/W1/{i}", gen.rng.randint(*sizes.w1_steps)) for i in range(2)],
            "W2": [b.rerank_request(gen, f"calib/W2/{i}") for i in range(2)],
            "W3": b.episode(gen, "calib/W3", upto=mid + 1)[mid - 1: mid + 1],
            "W4": b.incremental_episode(gen, "calib/W4")[sizes.w4_steps // 2 - 1: sizes.w4_steps // 2 + 1],
            "long": [b.long_request(gen, "calib/long", min(sizes.long_tokens, max_seq_len))]}
