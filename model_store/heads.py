"""Value heads by kind: what turns the hidden state at a readout position into a promise.

Contract: `head_readout(head, spec, hidden [R, H], flat_index [N]) -> promises [N]` (float32), reading only
the N readout rows (gather first, then project), as `kernels.value_head_readout` does for the linear head.
The kinds and their tensors are documented on `manifest.ValueHeadSpec`:

- `linear`, `linear2`, `lm_pair` reduce to one scalar logit w.h + b: for the two-row kinds w = w_pos - w_neg
  and b = b_pos - b_neg, because sigmoid(l_pos - l_neg) is exactly the 2-way softmax of the positive class.
  They all run through `kernels.value_head_readout`, i.e. the fused Triton kernel on a GPU.
- `mlp` (Qwen2.5-Math-PRM's Linear(H,H) -> ReLU -> Linear(H,2)) takes the torch path: gather the N rows,
  upcast to fp32, run the two layers (its second layer reduces the same way when it has two outputs).

Then `(logit - mean) / std` when the spec has a normalisation, then the activation. A `linear` head is a
plain `nn.Linear(H, 1)` (training builds and trains exactly that); the other kinds are `TwoRowHead` and
`MLPHead`, whose state-dict names are the tensor names of value_head.safetensors.
"""

from __future__ import annotations

import torch
from torch import nn

from model_store.kernels import value_head_readout
from model_store.manifest import ValueHeadSpec

# Row order of two-output heads (linear2, lm_pair, mlp with 2 outputs): the promise is the positive row's.
NEGATIVE, POSITIVE = 0, 1


class TwoRowHead(nn.Module):
    """linear2 / lm_pair: weight [2, H], bias [2], rows (negative, positive)."""

    def __init__(self, hidden: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features = hidden
        self.weight = nn.Parameter(torch.zeros(2, hidden, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(2, dtype=dtype))

    def scalar(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The equivalent one-output head in fp32: weight [1, H], bias [1]."""
        weight, bias = self.weight.float(), self.bias.float()
        return (weight[POSITIVE] - weight[NEGATIVE]).unsqueeze(0), (bias[POSITIVE] - bias[NEGATIVE]).reshape(1)


class MLPHead(nn.Module):
    """mlp: fc1 [M, H] -> ReLU -> fc2 [C, M] (C = 1 or 2)."""

    def __init__(self, hidden: int, inner: int, outputs: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features = hidden
        self.fc1 = nn.Linear(hidden, inner, dtype=dtype)
        self.fc2 = nn.Linear(inner, outputs, dtype=dtype)

    def logits(self, rows: torch.Tensor) -> torch.Tensor:
        """rows [N, H] (any float dtype) -> float32 logits [N]."""
        x = torch.relu(nn.functional.linear(rows.float(), self.fc1.weight.float(), self.fc1.bias.float()))  # [N, M]
        out = nn.functional.linear(x, self.fc2.weight.float(), self.fc2.bias.float())  # [N, C]
        return out[:, 0] if out.shape[1] == 1 else out[:, POSITIVE] - out[:, NEGATIVE]


def build_head(spec: ValueHeadSpec, hidden: int, dtype: torch.dtype = torch.float32) -> nn.Module:
    """An (uninitialised) head module of the spec's kind; load value_head.safetensors into it."""
    if spec.kind == "linear":
        return nn.Linear(hidden, 1, dtype=dtype)
    if spec.kind in ("linear2", "lm_pair"):
        return TwoRowHead(hidden, dtype)
    return MLPHead(hidden, int(spec.hidden_features), spec.out_features, dtype)


def head_logits(head: nn.Module, hidden: torch.Tensor, flat_index: torch.Tensor) -> torch.Tensor:
    """hidden [R, H], flat_index [N] -> float32 logits [N] before normalisation and activation."""
    if isinstance(head, MLPHead):
        return head.logits(hidden.index_select(0, flat_index))  # [N]
    if isinstance(head, TwoRowHead):
        weight, bias = head.scalar()
        return value_head_readout(hidden, flat_index, weight, bias)
    return value_head_readout(hidden, flat_index, head.weight, head.bias)


def head_readout(head: nn.Module, spec: ValueHeadSpec, hidden: torch.Tensor, flat_index: torch.Tensor
                 ) -> torch.Tensor:
    """Promises [N] (float32) at `flat_index` rows of hidden [R, H]."""
    logits = head_logits(head, hidden, flat_index)
    if spec.normalisation is not None:
        logits = (logits - spec.normalisation.mean) / spec.normalisation.std
    return torch.sigmoid(logits) if spec.activation == "sigmoid" else logits
