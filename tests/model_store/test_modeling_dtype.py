"""The PRM in a reduced-precision backbone: the value head stays fp32 (DESIGN.md section 6), and loading
builds the backbone in the target dtype without a full fp32 copy on the host."""

from __future__ import annotations

import torch

from model_store.modeling import HEAD_DTYPE, load_prm


def test_value_head_stays_fp32_when_the_backbone_is_bf16(tiny_checkpoint):
    reference = load_prm(tiny_checkpoint, dtype=torch.float32).model
    loaded = load_prm(tiny_checkpoint, dtype=torch.bfloat16).model
    assert loaded.backbone.embed_tokens.weight.dtype == torch.bfloat16
    assert loaded.value_head.weight.dtype == HEAD_DTYPE == torch.float32
    assert torch.equal(loaded.value_head.weight, reference.value_head.weight)  # not rounded through bf16
    # Casting the whole model later (as a caller choosing a dtype does) keeps the head fp32 too.
    reference.to(torch.bfloat16)
    assert reference.value_head.bias.dtype == torch.float32
    assert reference.backbone.norm.weight.dtype == torch.bfloat16


def test_bf16_logits_use_the_fp32_head(tiny_checkpoint):
    # The logit of a bf16 backbone's hidden state through the fp32 head, not through a bf16-rounded head.
    loaded = load_prm(tiny_checkpoint, dtype=torch.bfloat16).model
    ids = torch.randint(3, loaded.backbone.config.vocab_size, (1, 30), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        hidden = loaded.hidden_states(ids)[0].reshape(-1, loaded.hidden_size)  # [30, H] bf16
        got = loaded.readout(hidden, torch.arange(30))
        head = loaded.value_head
        exact = torch.sigmoid(hidden.float() @ head.weight[0] + head.bias[0])
        rounded = torch.sigmoid(hidden.float() @ head.weight[0].bfloat16().float() + head.bias[0].bfloat16().float())
    assert torch.allclose(got, exact, atol=1e-6)
    assert (rounded - exact).abs().max() > 1e-6  # the test can tell the two heads apart

