"""Step-level ground truth for BabyAI states: what each action costs, which actions are optimal.

Contract:
- `action_costs(env, seed, prefix, expert)`: for every valid action a at the state reached by `prefix`,
  the number of steps to success when a is taken and the expert (minigrid's BabyAIBot, `ExpertPolicy`) plays
  on from there: 1 + the expert's steps. `None` when that does not succeed within the episode's limit (an
  action that fails the mission, e.g. picking up the wrong object, or runs out the horizon).
- `optimal_actions(costs)`: the actions of least cost. Several actions are often equally good (turn left
  or right to face an object behind you; pick up or toggle facing nothing both waste one step), so the
  step-level check asks "is the PRM's top action one of these", not only "is it the expert's own".
- `discounted_values(env, seed, prefix, policy, gamma, k)`: Monte-Carlo Q(s, a) of a (stochastic) policy
  under discount gamma for every action: the mean over k rollouts of gamma^(steps to success - 1) on
  success, 0 on failure. It answers "what would a perfect on-policy estimator of this label rank first",
  the diagnosis in results/babyai/README.md.
Every function replays the environment from the episode seed; the environment's `env_steps` counts the work.
"""

from __future__ import annotations

from envs.base import Policy, TextEnv, derive_seed


def _play_out(env: TextEnv, policy: Policy, limit_steps: int) -> tuple[bool, int]:
    """Run `policy` until the episode ends; (success, steps taken)."""
    steps = 0
    while not env.done and steps < limit_steps:
        outcome = env.step(policy.act(env))
        steps += 1
        if outcome.done:
            return outcome.success, steps
    return False, steps


def action_costs(env: TextEnv, seed: int, prefix: list[str], expert: Policy) -> dict[str, int | None]:
    """Steps to success after each valid action at the state after `prefix`, the expert playing on."""
    costs: dict[str, int | None] = {}
    for action in env.valid_actions:
        env.replay(seed, list(prefix))
        outcome = env.step(action)
        if outcome.done:
            costs[action] = 1 if outcome.success else None
            continue
        expert.reset(seed)
        success, steps = _play_out(env, expert, env.max_steps)
        costs[action] = 1 + steps if success else None
    return costs


def optimal_actions(costs: dict[str, int | None]) -> set[str]:
    """The actions of least cost (empty if no action leads to success)."""
    finite = [c for c in costs.values() if c is not None]
    if not finite:
        return set()
    best = min(finite)
    return {a for a, c in costs.items() if c == best}


def discounted_values(env: TextEnv, seed: int, prefix: list[str], policy: Policy, gamma: float, k: int
                      ) -> dict[str, float]:
    """Monte-Carlo Q(s, a) of `policy` with discount `gamma` for every valid action (see module docstring)."""
    values: dict[str, float] = {}
    for action in env.valid_actions:
        total = 0.0
        for j in range(k):
            env.replay(seed, list(prefix))
            outcome = env.step(action)
            if outcome.done:
                total += 1.0 if outcome.success else 0.0
                continue
            policy.reset(derive_seed("q", seed, len(prefix), action, j))
            success, steps = _play_out(env, policy, env.max_steps)
            total += gamma ** steps if success else 0.0
        values[action] = total / k
    return values
