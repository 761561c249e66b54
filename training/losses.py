"""Losses on readout predictions: L_Q, L_A and the per-method loss of a batch.

Predictions arrive as `pred` [B, R]: column 0 is the initial value V_0, columns 1.. are the promises
Q_0..Q_{n-1}; `readout_mask` [B, R] marks real readouts (R = 1 + the longest trajectory's steps).

- L_Q = mean over trained readouts of 1/2 (pred - target)^2. The V_0 column is trained by every method,
  toward the mean outcome of its initial-state group (training.data); the service reports it as
  `initial_value` and uses it for the first step's progress.
- L_A = mean over steps t = 0..n-1 of 1/2 ((Q_t - Q_{t-1}) - (Qhat_t - Qhat_{t-1}))^2 with Q_{-1} = V_0 and
  Qhat_{-1} its target, i.e. the differences of adjacent columns. Only `agentprm` uses it (L = L_Q + beta L_A);
  the baselines (pvm, orm, mc) train L_Q alone.

Every term is returned as (sum, count) rather than a mean, so the trainer can divide by the count of the
whole global batch (all micro-batches, all DDP processes): the gradient is then the same however the
batch is split, which is what makes 2 processes reproduce 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from training.labels import gae_targets, outcome_targets, step_weights


@dataclass
class LossTerms:
    q_sum: torch.Tensor  # scalar, differentiable
    q_count: torch.Tensor  # scalar, constant
    a_sum: torch.Tensor
    a_count: torch.Tensor

    def mean(self, beta: float) -> torch.Tensor:
        """L_Q + beta L_A of this batch alone (for tests and single-batch use)."""
        loss = self.q_sum / self.q_count.clamp(min=1)
        if self.a_count > 0:
            loss = loss + beta * self.a_sum / self.a_count
        return loss


def q_loss_terms(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of 1/2 w (pred - target)^2, sum of w); the target is a constant."""
    err = pred - target.detach()
    return (0.5 * err.square() * weight).sum(), weight.sum()


def progress_loss_terms(pred: torch.Tensor, target: torch.Tensor, readout_mask: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """L_A as (sum, count) over adjacent readouts [V_0, Q_0, ..., Q_{n-1}]: the n step differences."""
    pred_diff = pred[:, 1:] - pred[:, :-1]  # [B, R-1]: Q_t - Q_{t-1}, with Q_{-1} = V_0
    target = target.detach()
    target_diff = target[:, 1:] - target[:, :-1]
    weight = readout_mask[:, 1:].to(pred.dtype)
    return (0.5 * (pred_diff - target_diff).square() * weight).sum(), weight.sum()


def l_q(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    total, count = q_loss_terms(pred, target, weight)
    return total / count


def l_a(pred: torch.Tensor, target: torch.Tensor, readout_mask: torch.Tensor) -> torch.Tensor:
    total, count = progress_loss_terms(pred, target, readout_mask)
    return total / count


@torch.no_grad()
def method_targets(method: str, pred: torch.Tensor, readout_mask: torch.Tensor, outcome: torch.Tensor,
                   initial_target: torch.Tensor, labels: torch.Tensor | None, gamma: float, lam: float
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(targets [B, R], weights [B, R]) of a method, from the current (detached) predictions."""
    pred = pred.detach().float()
    n_steps = readout_mask.sum(dim=1) - 1  # [B]
    width = pred.shape[1] - 1
    outcome = outcome.float()
    if method == "agentprm":
        steps = gae_targets(pred[:, 1:], pred[:, 0], outcome, n_steps, gamma, lam)
    elif method in ("pvm", "orm"):
        steps = outcome_targets(outcome, n_steps, width, gamma)
    elif method == "mc":
        if labels is None:
            raise ValueError("method 'mc' needs Monte-Carlo labels")
        steps = labels.float()
    else:
        raise ValueError(f"unknown method {method!r}")
    targets = torch.cat([initial_target.float()[:, None], steps], dim=1)  # [B, R]
    weights = torch.cat([torch.ones_like(outcome)[:, None], step_weights(method, n_steps, width)], dim=1)
    return targets, weights * readout_mask.float()


def term_counts(method: str, readout_mask: torch.Tensor) -> tuple[float, float]:
    """(L_Q count, L_A count) of a batch: they depend on the shapes only, so a trainer knows the counts of the
    whole global batch before any forward pass."""
    n_steps = readout_mask.sum(dim=1) - 1
    q_count = readout_mask.shape[0] * 2 if method == "orm" else int(readout_mask.sum())
    a_count = int(n_steps.sum()) if method == "agentprm" else 0
    return float(q_count), float(a_count)


def batch_loss_terms(method: str, pred: torch.Tensor, readout_mask: torch.Tensor, outcome: torch.Tensor,
                     initial_target: torch.Tensor, labels: torch.Tensor | None = None, gamma: float = 1.0,
                     lam: float = 0.95) -> LossTerms:
    """The (sum, count) terms of a method's loss on one batch; targets are recomputed from `pred` here."""
    pred = pred.float()
    targets, weights = method_targets(method, pred, readout_mask, outcome, initial_target, labels, gamma, lam)
    q_sum, q_count = q_loss_terms(pred, targets, weights)
    if method == "agentprm":
        a_sum, a_count = progress_loss_terms(pred, targets, readout_mask)
    else:
        a_sum, a_count = pred.new_zeros(()), pred.new_zeros(())
    return LossTerms(q_sum, q_count.detach(), a_sum, a_count.detach())
