"""Targets and losses on hand-computed examples; Monte-Carlo labels and their environment-step cost."""

from __future__ import annotations

import pytest
import torch

from training.data import load_jsonl, write_jsonl
from training.labels import gae_targets, mc_labels
from training.losses import batch_loss_terms, l_a, l_q, method_targets

# One trajectory of 3 steps (V_0 = 0.5, Q = 0.6, 0.3, 0.8, outcome 1) and one of 1 step (V_0 = 0.4, Q = 0.2,
# outcome 0), padded to 3 steps.
Q = torch.tensor([[0.6, 0.3, 0.8], [0.2, 0.0, 0.0]], dtype=torch.float64)
V0 = torch.tensor([0.5, 0.4], dtype=torch.float64)
R = torch.tensor([1.0, 0.0], dtype=torch.float64)
N = torch.tensor([3, 1])


def test_lambda_zero_gives_one_step_td_targets():
    # delta_t = r_t + gamma * Q_t - Q_{t-1}; Qhat_t = delta_t + Q_{t-1} = r_t + gamma * Q_t, terminal = r.
    targets = gae_targets(Q, V0, R, N, gamma=0.9, lam=0.0)
    expected = torch.tensor([[0.9 * 0.6, 0.9 * 0.3, 1.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(targets, expected)


def test_lambda_one_gamma_one_gives_the_outcome_at_every_step():
    targets = gae_targets(Q, V0, R, N, gamma=1.0, lam=1.0)
    expected = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(targets, expected)


def test_general_lambda_on_a_hand_computed_example():
    # gamma 0.9, lambda 0.5: delta = (0.9*0.6 - 0.5, 0.9*0.3 - 0.6, 1 - 0.3) = (0.04, -0.33, 0.7);
    # A_2 = 0.7, A_1 = -0.33 + 0.45*0.7 = -0.015, A_0 = 0.04 + 0.45*(-0.015) = 0.03325;
    # Qhat = A + (V_0, Q_0, Q_1) = (0.53325, 0.585, 1.0).
    targets = gae_targets(Q, V0, R, N, gamma=0.9, lam=0.5)
    torch.testing.assert_close(targets[0], torch.tensor([0.53325, 0.585, 1.0], dtype=torch.float64))
    torch.testing.assert_close(targets[1], torch.tensor([0.0, 0.0, 0.0], dtype=torch.float64))


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.3), (0.5, 0.0)])
def test_terminal_target_is_the_outcome(gamma, lam):
    gen = torch.Generator().manual_seed(0)
    q = torch.rand(4, 6, generator=gen)
    v0, outcome = torch.rand(4, generator=gen), torch.tensor([1.0, 0.0, 0.25, 1.0])
    n = torch.tensor([6, 1, 3, 4])
    targets = gae_targets(q, v0, outcome, n, gamma, lam)
    assert targets[torch.arange(4), n - 1].tolist() == outcome.tolist()
    assert targets[1, 1:].abs().sum() == 0 and targets[2, 3:].abs().sum() == 0  # padding stays 0


def test_progress_loss_is_zero_when_step_differences_match_the_targets():
    target = torch.tensor([[0.25, 0.5, 0.125, 1.0]])  # [V_0, Q_0, Q_1, Q_2] targets
    mask = torch.ones(1, 4, dtype=torch.bool)
    shifted = target + 0.25  # every difference equal, every value off
    assert l_a(shifted, target, mask) == 0.0
    assert l_q(shifted, target, mask.float()) > 0.0
    bent = target.clone()
    bent[0, 2] += 0.25
    assert l_a(bent, target, mask) > 0.0


def test_gradients_do_not_flow_into_the_targets():
    pred = torch.tensor([[0.5, 0.6, 0.3, 0.8], [0.4, 0.2, 0.0, 0.0]], requires_grad=True)  # [V_0, Q...]
    mask = torch.tensor([[True] * 4, [True, True, False, False]])
    outcome, initial = torch.tensor([1.0, 0.0]), torch.tensor([0.75, 0.25])
    terms = batch_loss_terms("agentprm", pred, mask, outcome, initial, gamma=1.0, lam=0.95)
    terms.mean(beta=1.0).backward()

    # The same loss with the targets computed first, as constants: the gradients must be identical.
    targets, weights = method_targets("agentprm", pred, mask, outcome, initial, None, 1.0, 0.95)
    assert not targets.requires_grad
    leaf = pred.detach().clone().requires_grad_(True)
    (l_q(leaf, targets, weights) + l_a(leaf, targets, mask)).backward()
    torch.testing.assert_close(pred.grad, leaf.grad)
    # Targets do depend on the predictions (Qhat_0 uses V_0 and Q_0..), so a leaking gradient would differ.
    moved = method_targets("agentprm", pred.detach() + 0.1, mask, outcome, initial, None, 1.0, 0.95)[0]
    assert not torch.allclose(moved[:, 1:3], targets[:, 1:3])


def test_baseline_targets_and_weights():
    pred = torch.full((2, 4), 0.5)
    mask = torch.tensor([[True] * 4, [True, True, False, False]])
    outcome, initial = torch.tensor([1.0, 0.0]), torch.tensor([0.75, 0.25])
    targets, weights = method_targets("pvm", pred, mask, outcome, initial, None, 1.0, 0.95)
    assert targets.tolist() == [[0.75, 1.0, 1.0, 1.0], [0.25, 0.0, 0.0, 0.0]]
    assert weights.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    _, orm_weights = method_targets("orm", pred, mask, outcome, initial, None, 1.0, 0.95)
    assert orm_weights.tolist() == [[1, 0, 0, 1], [1, 1, 0, 0]]  # V_0 and the final step only


def test_mc_labels_follow_the_decisive_choice_and_count_env_steps(tmp_path):
    from tests.training.synthetic import SAFE, make_dataset, make_env
    from envs.policies import RandomPolicy

    records = load_jsonl(write_jsonl(make_dataset(6, 2), tmp_path / "fork.jsonl"))
    k = 3
    out = mc_labels(records, make_env, lambda meta: RandomPolicy(seed=7), k=k)
    for record, labels in zip(records, out.labels):
        fork = record.meta["fork"]
        safe = record.steps[fork].action == SAFE
        assert len(labels) == len(record.steps)
        assert labels[fork:] == [float(safe)] * (len(labels) - fork)  # after the choice the outcome is fixed
        assert set(labels[:fork]) <= {0.0, 1.0}
    # Before the fork a random rollout crosses safely half the time: with 3 rollouts most labels are 1.
    before = [lab for r, labels in zip(records, out.labels) for lab in labels[: r.meta["fork"]]]
    assert sum(before) / len(before) > 0.6
    # Each rollout from step t replays t+1 actions and walks the remaining n-t-1: n steps per rollout,
    # k rollouts for each of the n-1 non-final steps.
    assert out.env_steps == sum(k * len(r.steps) * (len(r.steps) - 1) for r in records)
    assert out.rollouts == sum(k * (len(r.steps) - 1) for r in records)


def test_mc_labels_do_not_depend_on_the_number_of_workers(tmp_path):
    from tests.training.synthetic import make_dataset, make_env
    from training.cli import PolicyFactory

    records = load_jsonl(write_jsonl(make_dataset(4, 2), tmp_path / "fork.jsonl"))
    alone = mc_labels(records, make_env, PolicyFactory("random"), k=2, workers=1)
    spread = mc_labels(records, make_env, PolicyFactory("random"), k=2, workers=2)  # spawned processes
    assert spread.labels == alone.labels and spread.env_steps == alone.env_steps > 0
