"""bench.per_token_ops: every variant it times against the eager op computes the same thing (so the op-by-op
table in bench/ANALYSIS.md compares like with like), on a tiny layer, in fp32 and bf16. Compile is left out here
(minutes on two loaded cores); its variants are the eager functions themselves, handed to torch.compile."""

from __future__ import annotations

import pytest
import torch

from bench.per_token_ops import build_layer, op_variants, w1_lengths

TINY = dict(hidden=64, heads=4, kv_heads=2, intermediate=96)
PURE_OPS = ("(a)", "(b)", "(c)", "(c2)", "(f)", "(g)")  # (d), (d2), (e) update the residual in place


def _flat(out) -> list[torch.Tensor]:
    return [t.float() for t in (out if isinstance(out, tuple) else (out,))]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_every_variant_computes_what_the_eager_op_computes(dtype):
    model = build_layer(TINY, dtype)
    tol = 1e-5 if dtype == torch.float32 else 3e-2  # bf16: one rounding of the output (8 bits of mantissa)
    seen = set()
    with torch.inference_mode():
        for op, variants in op_variants(model, [5, 17, 1, 9], compile_=False):
            assert list(variants)[0] == "eager"
            if not op.startswith(PURE_OPS):
                continue
            seen.add(op.split()[0])
            want = _flat(variants["eager"]())
            for name, fn in variants.items():
                bound = max(tol, 3e-2) if "bf16" in name else tol  # a variant that computes in bf16 on purpose
                for got, ref in zip(_flat(fn()), want, strict=True):
                    scale = ref.abs().max().item() + 1e-6
                    assert (got - ref).abs().max().item() <= bound * scale, (op, name)
    assert {"(a)", "(b)", "(c)", "(f)", "(g)"} <= seen


def test_w1_lengths_fill_the_pass_with_trajectory_sized_sequences():
    lengths = w1_lengths(2048)
    assert sum(lengths) == 2048
    assert all(300 <= n <= 600 for n in lengths[:-1]) and 1 <= lengths[-1] <= 600
