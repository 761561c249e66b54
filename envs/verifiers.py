"""Evaluation units: what a verifier (the PRM service, or a baseline chooser) does on held-out BabyAI episodes.

Contract:
- A *chooser* is anything with the two `PRMClient` methods the search drivers call, `rerank` and
  `beam_expand`: the SDK client of a served checkpoint, or a baseline here: `RandomChooser` (uniform random
  scores) and `ForwardChooser` ("move forward" first, the rest random: the constant guess the old checkpoint
  collapsed to).
- `sampled_proposals(policy)`: beam-search candidates as in the paper: K actions *sampled* from the policy at
  the beam's state, duplicates merged (so a beam has at most K, often fewer, distinct candidates, and the
  policy's prior shows in which actions appear), the order of first appearance kept.
- `evaluate_bon`: Best-of-N success per episode for each N (one /v1/rerank over all samples, then the best-
  ranked among the first N: the same pick as a rerank of the first N because ranking is stable and a
  candidate's score does not depend on the others). `shortest_bon`, `oracle_bon`: the length rule and the
  ceiling. Every function returns per-episode outcomes (lists of 0/1), so paired tests and per-level tables
  are computed from the same records.
- `evaluate_beam`: beam search (`clients.search.beam_search`) on every episode for every (B, K).
- `step_discrimination`: at every state of the held-out expert trajectories, the chooser's promises for all
  six actions (one /v1/beam-expand per episode); per state: is the top action optimal (`envs.stepcheck`:
  least steps to success with the expert playing on) and is it the expert's own action; and, at the states
  where exactly one of the two turns is optimal (`turn_states`), is that turn scored above the other. The
  last isolates what a verifier must read from the observation to rank actions (where the target lies): a
  model that scores Q(s, a) as V(s) + b(a) is at chance there (0.5) whatever its other figures.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from types import SimpleNamespace

from envs.babyai import ACTIONS
from envs.base import Policy, TextEnv, derive_seed


# -- choosers --------------------------------------------------------------------------------------------------

class RandomChooser:
    """Stands in for `PRMClient` in the search drivers: every candidate gets a uniform random promise."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def score_action(self, action: str) -> float:
        return self.rng.random()

    def rerank(self, task, candidates, aggregate="last", top_n=None, episode_id=None):
        order = list(range(len(candidates)))
        self.rng.shuffle(order)
        return SimpleNamespace(results=[SimpleNamespace(index=i, score=0.0) for i in order[:top_n]])

    def beam_expand(self, beams, beam_width, episode_id=None):  # episode_id: the SDK's routing header, unused
        scored = [[SimpleNamespace(promise=self.score_action(a), progress=0.0) for a in beam["candidates"]]
                  for beam in beams]
        flat = [SimpleNamespace(beam=b, candidate=c, promise=s.promise, progress=0.0)
                for b, row in enumerate(scored) for c, s in enumerate(row)]
        flat.sort(key=lambda s: -s.promise)
        return SimpleNamespace(candidates=scored, selected=flat[:beam_width])


class ForwardChooser(RandomChooser):
    """"move forward" scores above every other action; the others are ordered at random."""

    def score_action(self, action: str) -> float:
        return 1.0 + self.rng.random() if action == "move forward" else self.rng.random()


# -- candidates ------------------------------------------------------------------------------------------------

def sampled_proposals(policy: Policy) -> Callable[[TextEnv, int], list[str]]:
    """`propose(env, k)` for beam search: k draws of `policy.act(env)`, duplicates merged, order kept."""
    def propose(env: TextEnv, k: int) -> list[str]:
        seen: dict[str, None] = {}
        for _ in range(k):
            seen.setdefault(policy.act(env), None)
        return list(seen)

    return propose


# -- Best-of-N -------------------------------------------------------------------------------------------------

def bon_picks(prm, task: str, candidates: list[list[dict]], ns: tuple[int, ...], per_n: bool = False
              ) -> dict[int, int]:
    """For each N, the index (among the first N candidates) that the chooser ranks best."""
    from clients.search import best_of_n

    if per_n:
        return {n: best_of_n(prm, task, candidates[:n]).index for n in ns}
    ranked = prm.rerank(task, candidates, aggregate="last").results
    position = {r.index: p for p, r in enumerate(ranked)}
    return {n: min(range(min(n, len(candidates))), key=position.__getitem__) for n in ns}


def evaluate_bon(prm, samples_per_episode: list[list[dict]], ns: tuple[int, ...], per_n: bool = False,
                 desc: str = "best-of-n", progress: bool = False) -> dict[str, list[int]]:
    """{str(N): [0/1 per episode]} of the chooser's Best-of-N picks."""
    from tqdm import tqdm

    outcomes: dict[str, list[int]] = {str(n): [] for n in ns}
    for samples in tqdm(samples_per_episode, unit="ep", desc=desc, disable=not progress):
        picks = bon_picks(prm, samples[0]["task"], [s["steps"] for s in samples], ns, per_n)
        for n in ns:
            outcomes[str(n)].append(int(samples[picks[n]]["reward"] > 0))
    return outcomes


def oracle_bon(samples_per_episode: list[list[dict]], ns: tuple[int, ...]) -> dict[str, list[int]]:
    """Success if any of the first N samples succeeds (the ceiling of every verifier)."""
    return {str(n): [int(any(s["reward"] > 0 for s in samples[:n])) for samples in samples_per_episode]
            for n in ns}


def shortest_bon(samples_per_episode: list[list[dict]], ns: tuple[int, ...]) -> dict[str, list[int]]:
    """Pick the trajectory with the fewest steps (first on ties): a verifier that reads only the length."""
    def pick(samples, n):
        return samples[min(range(min(n, len(samples))), key=lambda i: len(samples[i]["steps"]))]

    return {str(n): [int(pick(samples, n)["reward"] > 0) for samples in samples_per_episode] for n in ns}


# -- beam search -----------------------------------------------------------------------------------------------

def evaluate_beam(chooser_for_episode, env_factory: Callable[[str], TextEnv], policy: Policy,
                  episodes: list[tuple[str, int]], settings: tuple[tuple[int, int], ...], desc: str = "beam",
                  progress: bool = False) -> dict[str, dict]:
    """{"BxK": {"outcomes": [0/1 per episode], "env_steps": [...], "prm_calls": [...]}} of beam search with
    candidates sampled from `policy` (re-seeded per episode and setting, so every verifier sees the same
    proposal randomness at the same states)."""
    from tqdm import tqdm

    from clients.search import beam_search

    propose = sampled_proposals(policy)
    out = {}
    for beams, k in settings:
        record = {"outcomes": [], "env_steps": [], "prm_calls": []}
        for level, seed in tqdm(episodes, unit="ep", desc=f"{desc} {beams}x{k}", disable=not progress):
            policy.reset(derive_seed("beam", level, seed, beams, k))
            result = beam_search(chooser_for_episode(seed), lambda: env_factory(level), seed, propose, beams, k)
            record["outcomes"].append(int(result.success))
            record["env_steps"].append(result.env_steps)
            record["prm_calls"].append(result.prm_calls)
        out[f"{beams}x{k}"] = record
    return out


# -- step-level discrimination ---------------------------------------------------------------------------------

def expert_states(expert_trajectories: list[dict], env_factory: Callable[[str], TextEnv], expert: Policy
                  ) -> list[dict]:
    """Every state of the expert trajectories with its optimal actions: [{"level", "seed", "t", "task",
    "steps" (history), "observation", "expert", "optimal": [actions]}]. States where every action is
    equally good (or none succeeds) are left out: they cannot tell verifiers apart."""
    from envs.stepcheck import action_costs, optimal_actions

    states, envs = [], {}
    for trajectory in expert_trajectories:
        level, seed = trajectory["meta"]["level"], trajectory["meta"]["seed"]
        env = envs.setdefault(level, env_factory(level))
        actions = [s["action"] for s in trajectory["steps"]]
        for t, step in enumerate(trajectory["steps"]):
            optimal = optimal_actions(action_costs(env, seed, actions[:t], expert))
            if not optimal or len(optimal) == len(ACTIONS):
                continue
            states.append({"level": level, "seed": seed, "t": t, "task": trajectory["task"],
                           "steps": trajectory["steps"][:t], "observation": step["observation"],
                           "expert": step["action"], "optimal": sorted(optimal)})
    return states


def turn_states(states: list[dict]) -> list[int]:
    """Indices of the states where exactly one of "turn left" and "turn right" is optimal."""
    return [i for i, s in enumerate(states) if ("turn left" in s["optimal"]) != ("turn right" in s["optimal"])]


def cued_turn_states(states: list[dict]) -> list[int]:
    """The `turn_states` at which the observation shows where to turn: the object the task names is in view on
    one side only (`envs.babyai.target_side`). At the others (the object out of view, or matches on both
    sides) only the history, if anything, says which turn is right."""
    from envs.babyai import target_side

    return [i for i in turn_states(states) if target_side(states[i]["task"], states[i]["observation"])]


def cue_rule_turns(states: list[dict]) -> list[int]:
    """At each `cued_turn_states` state, is "turn toward the named object" the optimal turn (0/1): what a
    one-line rule reading the observation scores on the cued figure."""
    from envs.babyai import target_side

    return [int(f"turn {target_side(states[i]['task'], states[i]['observation'])}" in states[i]["optimal"])
            for i in cued_turn_states(states)]


def step_discrimination(chooser, states: list[dict]) -> dict[str, list[int]]:
    """{"top_optimal": [0/1 per state], "top_expert": [0/1 per state], "top": [action per state],
    "turn_direction": [0/1 per state of `turn_states`: the optimal turn scored strictly above the other],
    "turn_cued": the same at the states of `cued_turn_states` only}."""
    top_optimal, top_expert, tops = [], [], []
    turn_right_of: dict[int, bool] = {}
    left, right = ACTIONS.index("turn left"), ACTIONS.index("turn right")
    index = {id(s): i for i, s in enumerate(states)}
    by_episode: dict[tuple, list[dict]] = {}
    for state in states:
        by_episode.setdefault((state["level"], state["seed"]), []).append(state)
    for group in by_episode.values():
        beams = [{"trajectory": {"task": s["task"], "steps": s["steps"]}, "observation": s["observation"],
                  "candidates": list(ACTIONS)} for s in group]
        scored = chooser.beam_expand(beams, beam_width=1).candidates
        for state, promises in zip(group, scored):
            top = ACTIONS[max(range(len(ACTIONS)), key=lambda i: promises[i].promise)]
            tops.append(top)
            top_optimal.append(int(top in state["optimal"]))
            top_expert.append(int(top == state["expert"]))
            if promises[left].promise != promises[right].promise:
                turn_right_of[index[id(state)]] = promises[right].promise > promises[left].promise
    def turn(indices):
        return [int(turn_right_of.get(i) == ("turn right" in states[i]["optimal"])) for i in indices]

    return {"top_optimal": top_optimal, "top_expert": top_expert, "top": tops,
            "turn_direction": turn(turn_states(states)), "turn_cued": turn(cued_turn_states(states))}


def discrimination_baselines(states: list[dict]) -> dict[str, float]:
    """Expected shares of the constant "move forward" guess and of a uniform random pick."""
    n = len(states) or 1
    return {"forward_optimal": sum("move forward" in s["optimal"] for s in states) / n,
            "forward_expert": sum(s["expert"] == "move forward" for s in states) / n,
            "uniform_optimal": sum(len(s["optimal"]) / len(ACTIONS) for s in states) / n,
            "uniform_expert": 1 / len(ACTIONS)}
