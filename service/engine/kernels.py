"""Fused gather + value head: promise logits at readout positions only.

`value_head_readout_ref` is the plain torch reference: gather the N readout rows of the flattened hidden
states, then one [N, H] x [H] product. The Triton kernel (issue 5) plugs in behind `value_head_readout`,
picked once at import with an override for tests.
"""

from __future__ import annotations

import torch


def value_head_readout_ref(hidden: torch.Tensor, flat_index: torch.Tensor, weight: torch.Tensor,
                           bias: torch.Tensor) -> torch.Tensor:
    """hidden [B*T, H], flat_index [N] (int64), weight [1, H], bias [1] -> logits [N]."""
    rows = hidden.index_select(0, flat_index)  # [N, H]
    return torch.nn.functional.linear(rows, weight, bias).squeeze(-1)  # [N]


value_head_readout = value_head_readout_ref
