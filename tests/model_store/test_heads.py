"""Head kinds (model_store/heads.py) against plain torch written from their definitions, on odd shapes."""

from __future__ import annotations

import pytest
import torch

from model_store.heads import MLPHead, TwoRowHead, build_head, head_readout
from model_store.manifest import Normalisation, ValueHeadSpec


def _hidden(rows: int, size: int, dtype=torch.float32):
    torch.manual_seed(rows + size)
    return torch.randn(rows, size).to(dtype)


@pytest.mark.parametrize("kind", ["linear2", "lm_pair"])
@pytest.mark.parametrize("rows,size,dtype", [(1, 7, torch.float32), (123, 64, torch.float32),
                                             (37, 96, torch.bfloat16)])
def test_two_row_heads_are_the_softmax_of_the_positive_row(kind, rows, size, dtype):
    spec = ValueHeadSpec(kind=kind, in_features=size, out_features=2)
    head = build_head(spec, size)
    assert isinstance(head, TwoRowHead)
    with torch.no_grad():
        head.weight.normal_()
        head.bias.normal_()
    hidden = _hidden(rows, size, dtype)
    index = torch.randint(0, rows, (max(1, rows // 3),))
    got = head_readout(head, spec, hidden, index)
    logits = hidden[index].float() @ head.weight.T + head.bias  # [N, 2]
    assert got.dtype == torch.float32
    assert torch.allclose(got, logits.softmax(dim=-1)[:, 1], atol=1e-5)


def test_mlp_head_is_linear_relu_linear_and_reads_only_readout_rows():
    spec = ValueHeadSpec(kind="mlp", in_features=16, out_features=2, hidden_features=16, hidden_activation="relu")
    head = build_head(spec, 16)
    assert isinstance(head, MLPHead)
    reference = torch.nn.Sequential(head.fc1, torch.nn.ReLU(), head.fc2)
    hidden = _hidden(9, 16)
    index = torch.tensor([8, 0, 3])
    expected = reference(hidden[index]).softmax(dim=-1)[:, 1]
    hidden[[1, 2, 4, 5, 6, 7]] = float("nan")  # rows that are not readouts are never read
    assert torch.allclose(head_readout(head, spec, hidden, index), expected, atol=1e-6)


def test_normalisation_comes_before_the_activation():
    spec = ValueHeadSpec(in_features=8, normalisation=Normalisation(mean=0.5, std=4.0))
    head = build_head(spec, 8)
    hidden = _hidden(5, 8)
    index = torch.arange(5)
    raw = head(hidden)[:, 0]
    assert torch.allclose(head_readout(head, spec, hidden, index), torch.sigmoid((raw - 0.5) / 4.0), atol=1e-6)
    identity = spec.model_copy(update={"activation": "identity"})
    assert torch.allclose(head_readout(head, identity, hidden, index), (raw - 0.5) / 4.0, atol=1e-6)


def test_spec_checks_shapes_and_reads_schema_1():
    assert ValueHeadSpec.model_validate({"type": "linear", "in_features": 4, "out_features": 1}).kind == "linear"
    with pytest.raises(ValueError, match="linear2 head has out_features 2"):
        ValueHeadSpec(kind="linear2", in_features=4)
    with pytest.raises(ValueError, match="needs hidden_features"):
        ValueHeadSpec(kind="mlp", in_features=4, out_features=2)
    with pytest.raises(ValueError, match="std must be positive"):
        Normalisation(std=0.0)
