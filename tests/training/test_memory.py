"""training/memory.py: the training-state bytes of its formula are the bytes a real optimizer step holds."""

from __future__ import annotations

import pytest
import torch

from model_store.modeling import PRMModel
from tests.training.scale_setup import llama_config
from training.backbone import build_backbone, qwen2_config
from training.lora import add_lora
from training.memory import estimate, main


def held_bytes(model: PRMModel) -> tuple[int, int, int]:
    """(weights, gradients, AdamW moments) in bytes after one optimizer step on a real forward/backward."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    ids = torch.randint(1, 100, (2, 12))
    model(ids, None, torch.tensor([5, 11, 20])).sum().backward()
    optimizer.step()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    grads = sum(p.grad.numel() * p.grad.element_size() for p in trainable)
    moments = sum(v.numel() * v.element_size() for state in optimizer.state.values()
                  for k, v in state.items() if k in ("exp_avg", "exp_avg_sq"))
    return weights, grads, moments


@pytest.mark.parametrize("config", [qwen2_config(100, 0, 2, 32, 64), {**llama_config(), "vocab_size": 100}],
                         ids=["qwen2", "llama"])
@pytest.mark.parametrize("lora_rank", [0, 4])
def test_state_bytes_match_a_real_optimizer_step(config, lora_rank):
    torch.manual_seed(0)
    model = PRMModel(build_backbone(dict(config)))
    if lora_rank:
        add_lora(model, lora_rank, trainable_token_ids=[95, 96, 97, 98, 99])
    weights, grads, moments = held_bytes(model)
    expected = estimate(config, lora_rank=lora_rank)
    assert (expected.weights_bytes, expected.grads_bytes, expected.optimizer_bytes) == (weights, grads, moments)
    assert expected.parameters == sum(p.numel() for p in model.parameters())
    if lora_rank:
        assert expected.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert expected.trainable < expected.parameters / 3


def test_fsdp_divides_the_state_by_the_world_and_checkpointing_cuts_activations(capsys):
    config = qwen2_config(100, 0, 4, 64, 64)
    one = estimate(config)
    eight = estimate(config, world=8, parallel="fsdp")
    assert eight.state_bytes == pytest.approx(one.state_bytes / 8, rel=1e-3) and eight.gathered_bytes > 0
    assert estimate(config, activation_checkpointing=True).activation_bytes < one.activation_bytes / 2
    assert main(["--config", __file__.replace("test_memory.py", "") + "../../examples/qwen2.5-3b-config.json",
                 "--world", "8", "--parallel", "fsdp"]) == 0
    assert '"parameters": 3085940737' in capsys.readouterr().out  # Qwen2.5-3B's backbone plus the value head
