"""Diagnosis: how much step-level signal does a training label carry, before any model is trained?

A PRM trained by TD/MC on a sampler's trajectories estimates Q^pi(s, a) of that sampler (pi) under the
outcome's discount gamma. Even a perfect estimator of that quantity only ranks the optimal action first
where Q^pi separates it from the others. This module measures that separation directly on expert states:
at every state of expert episodes it computes Monte-Carlo Q^pi(s, a) for all actions (k rollouts each)
for several sampler epsilons and discounts, and reports

- top_optimal: the share of states where argmax_a Q^pi(s, a) is an optimal action (`envs.stepcheck`);
- gap: the mean of Q^pi(best optimal action) - Q^pi(best non-optimal action) (how large the difference a
  model must resolve is), and its ratio to the rollouts' standard error (how noisy one label is).

    python -m envs.label_signal --levels BabyAI-GoToLocal-v0,... --episodes 3 --k 8 --horizon 24

Rollouts are shared across gammas (the number of steps to success is recorded once).
"""

from __future__ import annotations

import argparse
import json
import math
import sys

from envs.base import derive_seed
from envs.stepcheck import action_costs, optimal_actions


def _rollout_steps(env, seed: int, prefix: list[str], action: str, policy, k: int) -> list[int | None]:
    """Steps to success (counting `action`) of k rollouts of `policy` after `action`; None on failure."""
    out: list[int | None] = []
    for j in range(k):
        env.replay(seed, list(prefix))
        outcome = env.step(action)
        steps = 1
        if not outcome.done:
            policy.reset(derive_seed("q", seed, len(prefix), action, j))
            while not outcome.done:
                outcome = env.step(policy.act(env))
                steps += 1
        out.append(steps if outcome.success else None)
    return out


def measure(levels: list[str], episodes: int, k: int, horizon: int, epsilons: list[float], gammas: list[float],
            seed_base: int = 7) -> dict:
    from envs.evaluate import CappedBabyAIEnv
    from envs.policies import ExpertPolicy, NoisyExpertPolicy
    from envs.rollout import episode_seed
    from envs.base import run_episode

    expert = ExpertPolicy()
    rows = []  # per state: optimal set, per eps: per action list of steps
    for level in levels:
        env = CappedBabyAIEnv(level, horizon)
        for i in range(episodes):
            seed = episode_seed(seed_base, i)
            trajectory = run_episode(env, expert, seed)
            actions = [s["action"] for s in trajectory["steps"]]
            for t in range(len(actions)):
                prefix = actions[:t]
                optimal = optimal_actions(action_costs(env, seed, prefix, expert))
                if not optimal or len(optimal) == len(env.valid_actions):
                    continue
                samples = {}
                for eps in epsilons:
                    policy = NoisyExpertPolicy(eps, 0)
                    samples[eps] = {a: _rollout_steps(env, seed, prefix, a, policy, k) for a in env.valid_actions}
                rows.append({"level": level, "optimal": sorted(optimal), "samples": samples})
    report = {"states": len(rows), "k": k, "horizon": horizon, "configs": []}
    for eps in epsilons:
        for gamma in gammas:
            hits, gaps, ratios = 0, [], []
            for row in rows:
                q, se = {}, {}
                for a, steps in row["samples"][eps].items():
                    values = [gamma ** (s - 1) if s is not None else 0.0 for s in steps]
                    mean = sum(values) / len(values)
                    q[a] = mean
                    var = sum((v - mean) ** 2 for v in values) / max(1, len(values) - 1)
                    se[a] = math.sqrt(var / len(values))
                top = max(q, key=q.get)
                hits += top in row["optimal"]
                best_opt = max(row["optimal"], key=q.get)
                others = [a for a in q if a not in row["optimal"]]
                best_other = max(others, key=q.get)
                gap = q[best_opt] - q[best_other]
                gaps.append(gap)
                noise = math.sqrt(se[best_opt] ** 2 + se[best_other] ** 2)
                ratios.append(gap / noise if noise > 0 else float("inf") if gap > 0 else 0.0)
            finite = [r for r in ratios if math.isfinite(r)]
            report["configs"].append({
                "epsilon": eps, "gamma": gamma, "top_optimal": round(hits / len(rows), 3),
                "mean_gap": round(sum(gaps) / len(gaps), 4),
                "median_gap_over_se": round(sorted(finite)[len(finite) // 2], 2) if finite else None})
    forward = sum("move forward" in r["optimal"] for r in rows) / len(rows)
    uniform = sum(len(r["optimal"]) / 6 for r in rows) / len(rows)
    report["baselines"] = {"always_forward": round(forward, 3), "uniform": round(uniform, 3)}
    return report


def main(argv: list[str] | None = None) -> int:
    from envs.babyai import DEFAULT_LEVELS

    p = argparse.ArgumentParser(prog="python -m envs.label_signal", description=__doc__.split("\n\n")[0])
    p.add_argument("--levels", default=",".join(DEFAULT_LEVELS))
    p.add_argument("--episodes", type=int, default=3, help="expert episodes per level")
    p.add_argument("--k", type=int, default=8, help="rollouts per (state, action)")
    p.add_argument("--horizon", type=int, default=24)
    p.add_argument("--epsilons", default="0.7,0.3,0.1")
    p.add_argument("--gammas", default="1.0,0.9,0.8")
    args = p.parse_args(argv)
    report = measure([x for x in args.levels.split(",") if x], args.episodes, args.k, args.horizon,
                     [float(x) for x in args.epsilons.split(",")], [float(x) for x in args.gammas.split(",")])
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
