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


def test_bf16_load_builds_on_meta_and_never_holds_fp32_weights(tiny_checkpoint, monkeypatch):
    # The backbone is built with its parameters on the meta device and assigned tensors already in the
    # target dtype: no fp32 CPU copy of the model is made (a 7B model would need > 40 GB of host memory).
    from model_store import modeling

    seen = {}
    original = modeling.load_weights

    def spy(module, tensors, source):
        if "backbone" not in seen:
            seen["backbone"] = {
                "devices": {p.device.type for p in module.parameters()},
                "dtypes": {t.dtype for t in tensors.values() if t.is_floating_point()},
            }
        return original(module, tensors, source)

    monkeypatch.setattr(modeling, "load_weights", spy)
    loaded = load_prm(tiny_checkpoint, dtype=torch.bfloat16).model
    assert seen["backbone"] == {"devices": {"meta"}, "dtypes": {torch.bfloat16}}
    assert not any(t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])
    # The same weights as the fp32 load, rounded once to bf16.
    reference = load_prm(tiny_checkpoint, dtype=torch.float32).model
    for (name, got), (_, ref) in zip(loaded.backbone.named_parameters(), reference.backbone.named_parameters()):
        assert torch.equal(got, ref.bfloat16()), name
    ids = torch.randint(3, reference.backbone.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        got = loaded.readout(loaded.hidden_states(ids)[0], torch.arange(40))
        ref = reference.readout(reference.hidden_states(ids)[0], torch.arange(40))
    assert (got - ref).abs().max() < 2e-2  # bf16 backbone vs fp32: rounding, not a wrong weight or RoPE table


PEAK_SCRIPT = """
import resource, sys, torch
from model_store.modeling import build_backbone, load_prm
load_prm(sys.argv[1], dtype=torch.bfloat16)  # warm: imports, lazily loaded transformers modules, allocator pools
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
load_prm(sys.argv[2], dtype=torch.bfloat16)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(after - before)
"""


def test_peak_host_memory_of_a_bf16_load_stays_below_the_fp32_model(tmp_path, tiny_checkpoint):
    # Measured in a fresh process: the peak resident memory a bf16 load of an fp32 checkpoint adds. The old
    # path (fp32 build + fp32 weights + cast) peaked above 2x the fp32 size; the meta build needs about the bf16
    # model (half the fp32 size) plus one tensor.
    import subprocess
    import sys

    from model_store.export import init_random
    from tests.conftest import REPO

    init_random(tmp_path / "big", layers=4, hidden=384, heads=6, kv_heads=2, vocab=300)  # ~ 20 MB in fp32
    fp32_bytes = sum(f.stat().st_size for f in (tmp_path / "big" / "backbone").glob("*.safetensors"))
    assert fp32_bytes > 15e6
    run = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(tiny_checkpoint), str(tmp_path / "big")],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    grew = int(run.stdout.split()[-1])
    assert grew < 0.8 * fp32_bytes, f"a bf16 load grew the peak RSS by {grew / 1e6:.1f} MB for {fp32_bytes / 1e6:.1f} MB of fp32"
