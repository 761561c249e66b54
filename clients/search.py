"""Best-of-N and step-level beam search over the PRM service (the paths agent frameworks take).

Environment-agnostic: an environment is anything with the `envs.base.TextEnv` methods (`reset(seed)`,
`step(action)`, `replay(seed, actions)`, `task`), made by `env_factory()`; candidate actions come from
`propose(env, k)`. The PRM is reached through the SDK (`PRMClient`), never in-process. Every search sends one episode id
(`X-Episode-ID`) on all its calls, so an affinity proxy keeps the search on the replica that caches its prefix.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from clients.sdk import PRMClient


class BestOfN(NamedTuple):
    index: int  # the candidate the PRM ranks best
    scores: list[float]  # every candidate's score, in the candidates' order (empty when one needed no call)


def new_episode_id() -> str:
    return uuid.uuid4().hex


def best_of_n(prm: PRMClient, task: str | None, candidates: Sequence[Sequence[dict]], aggregate: str = "last",
              messages: Sequence[dict] | None = None, episode_id: str | None = None) -> BestOfN:
    """The candidate the PRM ranks best, and every candidate's score.

    Candidates are lists of {observation, action} steps of `task`, or (task=None) lists of chat messages that
    continue `messages` (the conversation so far, shared by every candidate). `episode_id` (default: the
    client's, else a fresh one) is sent as X-Episode-ID.
    """
    if len(candidates) == 1:
        return BestOfN(0, [])
    episode_id = episode_id or getattr(prm, "episode_id", None) or new_episode_id()
    # `messages` only when given: duck-typed choosers (envs.verifiers) take the step form alone.
    extra = {} if messages is None else {"messages": list(messages)}
    ranked = prm.rerank(task, [list(c) for c in candidates], aggregate=aggregate, episode_id=episode_id, **extra)
    scores = [0.0] * len(candidates)
    for result in ranked.results:
        scores[result.index] = result.score
    return BestOfN(ranked.results[0].index, scores)


@dataclass
class _Beam:
    actions: list[str]
    steps: list[dict]
    observation: str
    env: object | None  # an environment already at this beam's state, or None once handed on
    promise: float = 0.0
    done: bool = False
    reward: float = 0.0
    success: bool = False


@dataclass
class BeamSearchResult:
    task: str
    steps: list[dict]
    reward: float
    success: bool
    promise: float
    prm_calls: int
    env_steps: int
    finished: int = 0
    trace: list[list[tuple[int, int]]] = field(default_factory=list)
    episode_id: str = ""


def beam_search(prm: PRMClient, env_factory: Callable[[], object], seed: int,
                propose: Callable[[object, int], list[str]], beam_width: int, candidates_per_beam: int,
                max_steps: int | None = None, episode_id: str | None = None) -> BeamSearchResult:
    """Step-level beam search: every kept beam proposes candidates, the PRM scores each (state, action),
    the best `beam_width` (beam, candidate) pairs survive. Beams that end are set aside; the answer is
    the finished beam with the highest final promise. Every call carries one X-Episode-ID: `episode_id`,
    else the client's, else a fresh one (reported in the result)."""
    episode_id = episode_id or getattr(prm, "episode_id", None) or new_episode_id()
    env = env_factory()
    first = env.reset(seed)
    task = env.task
    limit = max_steps or getattr(env, "max_steps", 64)
    beams = [_Beam([], [], first, env)]
    finished: list[_Beam] = []
    calls, env_steps, trace = 0, 0, []

    def env_at(beam: _Beam):
        nonlocal env_steps
        if beam.env is not None:
            handed, beam.env = beam.env, None
            return handed
        fresh = env_factory()
        fresh.replay(seed, beam.actions)
        env_steps += len(beam.actions)
        return fresh

    for _ in range(limit):
        if not beams:
            break
        proposals = [propose(b.env, candidates_per_beam) for b in beams]
        requests = [{"trajectory": {"task": task, "steps": b.steps}, "observation": b.observation,
                     "candidates": cands} for b, cands in zip(beams, proposals)]
        expanded = prm.beam_expand(requests, beam_width=max(1, beam_width - len(finished)), episode_id=episode_id)
        calls += 1
        trace.append([(s.beam, s.candidate) for s in expanded.selected])
        survivors = []
        for sel in expanded.selected:
            parent = beams[sel.beam]
            action = proposals[sel.beam][sel.candidate]
            child_env = env_at(parent)
            outcome = child_env.step(action)
            env_steps += 1
            child = _Beam(parent.actions + [action], parent.steps + [{"observation": parent.observation,
                                                                      "action": action}],
                          outcome.observation, child_env, sel.promise, outcome.done, outcome.reward, outcome.success)
            (finished if child.done else survivors).append(child)
        beams = survivors
        if len(finished) >= beam_width:
            break
    pool = finished or beams
    best = max(pool, key=lambda b: b.promise)
    return BeamSearchResult(task=task, steps=best.steps, reward=best.reward, success=best.success,
                            promise=best.promise, prm_calls=calls, env_steps=env_steps, finished=len(finished),
                            trace=trace, episode_id=episode_id)
