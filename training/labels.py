"""Labellers: the per-step targets of every method, and what each costs in environment steps.

Tensors are padded per trajectory: `q` [B, S] holds the promises Q_0..Q_{n-1} of a trajectory with n
steps (positions >= n are padding), `initial` [B] the initial value V_0, `outcome` [B] the sparse reward
r(u, tau), `n_steps` [B] the step counts.

td_gae (AgentPRM), the design's formula with these two decisions:
- M(s_{-1}, a_{-1}) is V_0, the state readout at the end of the initial state (u, o_0). So delta_0 =
  gamma * Q_0 - V_0, and Qhat_0 = Ahat_0 + V_0. (V_0 itself is trained toward the mean outcome of its
  initial-state group, see training.data.)
- Terminal delta: after the last step T = n-1 the episode is over and nothing follows, so the bootstrap
  term is 0: delta_T = r - M(s_{T-1}, a_{T-1}). Then Qhat_T = Ahat_T + M(s_{T-1}, a_{T-1}) = r exactly
  (we also write r there directly, so the terminal target is the outcome bit for bit), and with gamma =
  lambda = 1 the sum telescopes to Qhat_t = r at every step.
  For t < T: delta_t = gamma * Q_t - M(s_{t-1}, a_{t-1}) (r_t = 0), Ahat_t = sum_k (gamma*lambda)^k delta_{t+k}.
  With lambda = 0 the target of a non-final step is the one-step TD target r_t + gamma * Q_t: under the
  design's convention V(s_{t+1}) = Q(s_t, a_t) it carries no new information, so the outcome reaches
  earlier steps only through lambda > 0 (default 0.95). The fixed point of every lambda is the on-policy
  value: Q_t equal to the lambda-return of the later promises and the outcome.
Targets are computed from detached predictions (constants in the loss); the trainer recomputes them with
the current model on every batch.

pvm: every step's target is the outcome (discounted by gamma^(steps to the end) when gamma < 1). orm: the same target on the final step only (other steps get no
loss). mc (Math-Shepherd hard labels): the label of step t is 1 if any of K rollouts of a policy from the
state after a_t succeeds, else 0; the final step's label is the trajectory's own success (the state after
it is terminal, nothing to roll out). td_gae, pvm and orm spend no environment steps (labels come from the
recorded outcomes); mc counts every step its environments take, prefix replays included.
"""

from __future__ import annotations

import json
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Callable

import torch

from training.defaults import METHODS  # noqa: F401  (re-exported: the method names)
from training.data import DataError, Record


def step_mask(n_steps: torch.Tensor, width: int) -> torch.Tensor:
    """[B, S] bool: True at real steps (t < n_steps)."""
    return torch.arange(width, device=n_steps.device)[None, :] < n_steps[:, None]


def last_step_mask(n_steps: torch.Tensor, width: int) -> torch.Tensor:
    """[B, S] bool: True at the final step t = n_steps - 1."""
    return torch.arange(width, device=n_steps.device)[None, :] == (n_steps - 1)[:, None]


def gae_targets(q: torch.Tensor, initial: torch.Tensor, outcome: torch.Tensor, n_steps: torch.Tensor,
                gamma: float = 1.0, lam: float = 0.95) -> torch.Tensor:
    """Qhat [B, S] by TD + GAE (module docstring); 0 at padding. No gradient flows through the result."""
    q, initial, outcome = q.detach(), initial.detach().to(q.dtype), outcome.to(q.dtype)
    batch, width = q.shape
    valid = step_mask(n_steps, width)  # [B, S]
    last = last_step_mask(n_steps, width)  # [B, S]
    previous = torch.cat([initial[:, None], q[:, :-1]], dim=1)  # M(s_{t-1}, a_{t-1}); V_0 at t = 0
    bootstrap = torch.where(last, torch.zeros_like(q), q)  # nothing follows the final step
    reward = torch.where(last, outcome[:, None].expand(batch, width), torch.zeros_like(q))
    delta = torch.where(valid, reward + gamma * bootstrap - previous, torch.zeros_like(q))  # [B, S]
    advantage = torch.zeros_like(q)
    running = torch.zeros(batch, dtype=q.dtype, device=q.device)
    for t in range(width - 1, -1, -1):  # padding has delta 0, so `running` is 0 until a trajectory's end
        running = delta[:, t] + gamma * lam * running
        advantage[:, t] = running
    targets = advantage + previous
    targets = torch.where(last, outcome[:, None].expand(batch, width), targets)
    return torch.where(valid, targets, torch.zeros_like(q))


def outcome_targets(outcome: torch.Tensor, n_steps: torch.Tensor, width: int, gamma: float = 1.0) -> torch.Tensor:
    """PVM / ORM targets [B, S]: the outcome discounted to each real step, gamma^(n-1-t) r (the plain outcome
    when gamma = 1, and at the final step always), 0 at padding. With gamma < 1 this is the Monte-Carlo
    return of the same discounted objective AgentPRM's TD targets estimate, so the methods stay comparable."""
    valid = step_mask(n_steps, width)
    remaining = (n_steps[:, None] - 1 - torch.arange(width, device=n_steps.device)[None, :]).clamp(min=0)
    discount = torch.pow(torch.full_like(outcome, float(gamma))[:, None], remaining.to(outcome.dtype))
    return torch.where(valid, outcome[:, None] * discount, torch.zeros(valid.shape, dtype=outcome.dtype,
                                                                       device=outcome.device))


def step_weights(method: str, n_steps: torch.Tensor, width: int) -> torch.Tensor:
    """[B, S] float: which steps the method trains (orm: only the final one)."""
    mask = last_step_mask(n_steps, width) if method == "orm" else step_mask(n_steps, width)
    return mask.float()


# -- Monte-Carlo labelling (Math-Shepherd) ------------------------------------------------------------------

EnvFactory = Callable[[dict], object]  # meta -> envs.base.TextEnv
PolicyFactory = Callable[[dict], object]  # meta -> envs.base.Policy


@dataclass
class MCLabels:
    labels: list[list[float]]  # per record, per step (0.0 / 1.0)
    env_steps: int  # every environment step spent, prefix replays included
    rollouts: int


def _cache_key(meta: dict, fields: tuple[str, ...]) -> str:
    return json.dumps([meta.get(f) for f in fields], sort_keys=True, default=str)


class _Labeller:
    """Labels records one by one, reusing one environment per (env, level) and one policy per (policy, epsilon)."""

    def __init__(self, env_factory: EnvFactory, policy_factory: PolicyFactory, k: int, success_above: float):
        self.env_factory, self.policy_factory = env_factory, policy_factory
        self.k, self.success_above = k, success_above
        self.envs: dict[str, object] = {}
        self.policies: dict[str, object] = {}

    def label(self, record: Record, where: str) -> tuple[list[float], int, int]:
        from envs.base import continue_rollouts  # optional package: only MC labelling needs it

        meta = record.meta
        if meta.get("seed") is None:
            raise DataError(f"{where}: meta.seed is missing; Monte-Carlo labels rebuild the episode from its seed")
        env_key, policy_key = _cache_key(meta, ("env", "level")), _cache_key(meta, ("policy", "epsilon"))
        if env_key not in self.envs:
            self.envs[env_key] = self.env_factory(meta)
        if policy_key not in self.policies:
            self.policies[policy_key] = self.policy_factory(meta)
        env, policy = self.envs[env_key], self.policies[policy_key]
        seed, actions = int(meta["seed"]), record.actions
        before = env.env_steps
        first = env.replay(seed, [])
        if env.task != record.task or first != record.steps[0].observation:
            raise DataError(f"{where}: the environment does not reproduce this trajectory from seed {seed} "
                            f"(task or first observation differs); MC labels need the environment that made it")
        labels, rollouts = [], 0
        for t in range(len(actions) - 1):
            try:
                outcomes = continue_rollouts(env, seed, actions[: t + 1], policy, self.k)
            except ValueError as exc:  # the recorded actions end the episode early
                raise DataError(f"{where}: replaying the recorded actions failed ({exc})") from None
            labels.append(1.0 if any(o > self.success_above for o in outcomes) else 0.0)
            rollouts += len(outcomes)
        labels.append(1.0 if record.reward > self.success_above else 0.0)  # terminal: the trajectory's own success
        return labels, env.env_steps - before, rollouts


def _label_chunk(args) -> list[tuple[int, list[float], int, int]]:
    env_factory, policy_factory, k, success_above, items = args
    labeller = _Labeller(env_factory, policy_factory, k, success_above)
    return [(i, *labeller.label(record, where)) for i, record, where in items]


def mc_labels(records: list[Record], env_factory: EnvFactory, policy_factory: PolicyFactory, k: int = 4,
              success_above: float = 0.0, workers: int = 1, source: str = "data", progress: bool = False) -> MCLabels:
    """Math-Shepherd hard labels for every step of every record, with the environment steps they cost.

    `env_factory(meta)` builds an `envs.base.TextEnv` that reproduces the trajectory from meta["seed"];
    `policy_factory(meta)` the rollout policy. With workers > 1 the records are labelled in that many spawned
    processes (the factories must then be picklable: module-level functions or classes). Results do not
    depend on `workers`.
    """
    from tqdm import tqdm

    if k < 1:
        raise ValueError(f"the number of MC rollouts must be >= 1, got {k}")
    items = [(i, r, f"{source}:{r.line}") for i, r in enumerate(records)]
    labels: list[list[float] | None] = [None] * len(records)
    env_steps = rollouts = 0
    bar = tqdm(total=len(records), desc="mc labels", unit="traj", disable=not progress)
    if workers <= 1:
        results = (_label_chunk((env_factory, policy_factory, k, success_above, [item])) for item in items)
        chunks = iter(results)
    else:
        import multiprocessing

        size = max(1, min(64, len(items) // (workers * 4) or 1))
        parts = [items[s:s + size] for s in range(0, len(items), size)]
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
        chunks = pool.map(_label_chunk, [(env_factory, policy_factory, k, success_above, p) for p in parts])
    try:
        for chunk in chunks:
            for i, lab, steps, n in chunk:
                labels[i] = lab
                env_steps += steps
                rollouts += n
            bar.update(len(chunk))
    finally:
        bar.close()
        if workers > 1:
            pool.shutdown(cancel_futures=True)
    return MCLabels(labels=labels, env_steps=env_steps, rollouts=rollouts)  # type: ignore[arg-type]
