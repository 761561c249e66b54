"""Value-head readout kernels: the torch reference, the dispatch, and the Triton kernel under the interpreter.

The Triton kernel runs on the CPU only under TRITON_INTERPRET=1, which Triton reads when a kernel is
defined (module import). Another test may already have imported the kernel module in this process, so
the interpreted runs happen in one subprocess that writes its outputs to a safetensors file; the checks
against the reference happen here, on inputs regenerated from the same seeds.

Tolerances. float32 inputs: 1e-5 (absolute and relative); both paths accumulate in float32, in different
orders. bfloat16 / float16 inputs: the same 1e-5, not a bf16-sized one: the inputs are rounded to bf16
once, before both paths; the upcast to fp32 is exact and a bf16 x bf16 product is exact in fp32, so the
paths still differ only by the order of fp32 additions (both return fp32 logits). A kernel that
accumulated or stored in bf16 would be off by ~1e-2 and fail; `test_bf16_tolerance_catches_bf16_rounding`
checks that the tolerance is tight enough to see that.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from model_store import kernels
from model_store.kernels import value_head_readout_ref

REPO = Path(__file__).resolve().parents[3]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TOL = {"float32": 1e-5, "bfloat16": 1e-5, "float16": 1e-5}

# (readouts N, hidden size H, dtype, row stride pad). Large N with small H: interpreted programs are slow.
CASES = [
    (1, 896, "float32", 0),
    (7, 200, "float32", 0),
    (123, 896, "float32", 0),
    (4097, 48, "float32", 0),
    (123, 200, "float32", 24),  # rows strided: hidden is a column slice of a wider tensor
    (1, 200, "bfloat16", 0),
    (7, 896, "bfloat16", 0),
    (123, 48, "bfloat16", 0),
    (4097, 48, "bfloat16", 0),
    (7, 200, "float16", 0),
]


def case_id(case) -> str:
    n, h, dtype, pad = case
    return f"N{n}-H{h}-{dtype}" + (f"-stride{h + pad}" if pad else "")


def make_case(n: int, h: int, dtype: str, pad: int = 0, seed: int = 0):
    """hidden [R, H] (R = 2N + 3, so indices repeat and skip rows), flat_index [N], weight [1, H], bias [1]."""
    g = torch.Generator().manual_seed(seed * 7919 + n * 31 + h)
    rows = 2 * n + 3
    wide = torch.randn(rows, h + pad, generator=g) * 2.0  # hidden states after a final norm are O(1)
    hidden = wide.to(DTYPES[dtype])[:, :h]  # [R, H], rows strided by H + pad
    index = torch.randint(0, rows, (n,), generator=g)
    index[0] = rows - 1  # the last row is read
    weight = ((torch.rand(1, h, generator=g) * 2 - 1) / h**0.5).to(DTYPES[dtype])
    bias = torch.randn(1, generator=g).to(DTYPES[dtype])
    return hidden, index, weight, bias


def exact(hidden, index, weight, bias) -> torch.Tensor:
    """float64 logits of the same (already rounded) inputs."""
    return (hidden.double()[index] @ weight.double()[0]) + bias.double()[0]


# -- reference -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_reference_reads_only_the_indexed_rows_in_float32(dtype):
    hidden, index, weight, bias = make_case(123, 200, dtype)
    logits = value_head_readout_ref(hidden, index, weight, bias)
    assert logits.dtype == torch.float32 and logits.shape == (123,)
    assert torch.allclose(logits.double(), exact(hidden, index, weight, bias), atol=1e-5, rtol=1e-5)
    # Rows outside the index never matter: garbage there changes nothing.
    spoiled = hidden.clone()
    untouched = torch.ones(hidden.shape[0], dtype=torch.bool)
    untouched[index] = False
    spoiled[untouched] = float("nan")
    assert torch.equal(value_head_readout_ref(spoiled, index, weight, bias), logits)


def test_reference_keeps_gradients_for_training():
    hidden, index, weight, bias = make_case(7, 48, "float32")
    hidden.requires_grad_(True)
    weight = weight.clone().requires_grad_(True)
    value_head_readout_ref(hidden, index, weight, bias).sum().backward()
    assert hidden.grad is not None and weight.grad is not None
    assert hidden.grad[index[0]].abs().sum() > 0


def test_reference_stays_float32_under_autocast():
    # Training runs the backbone under bf16 autocast; the head and its logits stay fp32.
    hidden, index, weight, bias = make_case(123, 200, "bfloat16")
    plain = value_head_readout_ref(hidden, index, weight, bias)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = value_head_readout_ref(hidden, index, weight, bias)
    assert autocast.dtype == torch.float32
    assert torch.equal(autocast, plain)


def test_bf16_tolerance_catches_bf16_rounding():
    # The bf16 tolerance must be able to fail: logits rounded to bf16 (what a bf16 accumulator or bf16
    # output would give) are further from the reference than TOL allows.
    hidden, index, weight, bias = make_case(123, 896, "bfloat16")
    ref = value_head_readout_ref(hidden, index, weight, bias)
    rounded = ref.bfloat16().float()
    assert not torch.allclose(rounded, ref, atol=TOL["bfloat16"], rtol=TOL["bfloat16"])


# -- dispatch ------------------------------------------------------------------------------------------
@pytest.fixture
def restore_kernel():
    previous = kernels.active_kernel()
    yield
    kernels._active = previous


def test_default_pick_follows_cuda_and_triton(monkeypatch):
    monkeypatch.delenv(kernels.ENV_VAR, raising=False)
    expected = "triton" if (kernels.HAS_TRITON and torch.cuda.is_available()) else "torch"
    assert kernels.default_kernel() == expected
    monkeypatch.setenv(kernels.ENV_VAR, "torch")
    assert kernels.default_kernel() == "torch"


def test_unknown_kernel_name_is_refused(monkeypatch, restore_kernel):
    with pytest.raises(ValueError, match="unknown value-head kernel 'cutlass'"):
        kernels.set_kernel("cutlass")
    monkeypatch.setenv(kernels.ENV_VAR, "cublas")
    with pytest.raises(ValueError, match="choose one of torch, triton"):
        kernels.default_kernel()


def test_torch_selection_uses_the_reference(restore_kernel):
    kernels.set_kernel("torch")
    hidden, index, weight, bias = make_case(7, 200, "float32")
    assert kernels.kernel_for(hidden, weight) == "torch"
    assert torch.equal(kernels.value_head_readout(hidden, index, weight, bias),
                       value_head_readout_ref(hidden, index, weight, bias))


def test_triton_without_the_package_is_refused(monkeypatch, restore_kernel):
    monkeypatch.setattr(kernels, "HAS_TRITON", False)
    with pytest.raises(RuntimeError, match="`triton` package"):
        kernels.set_kernel("triton")


@pytest.mark.skipif(not kernels.HAS_TRITON, reason="needs the `triton` package")
def test_triton_selection_falls_back_where_the_kernel_cannot_run(monkeypatch, restore_kernel):
    kernels.set_kernel("triton")
    hidden, index, weight, bias = make_case(7, 48, "float32")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if not torch.cuda.is_available():  # CPU tensors without the interpreter: the compiled kernel cannot run
        assert kernels.kernel_for(hidden, weight) == "torch"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert kernels.kernel_for(hidden, weight) == "triton"
    assert kernels.kernel_for(hidden, weight.clone().requires_grad_(True)) == "torch"  # no backward
    with torch.no_grad():
        assert kernels.kernel_for(hidden, weight.clone().requires_grad_(True)) == "triton"


# -- the Triton kernel under the interpreter -----------------------------------------------------------
_INTERPRETED = """
import json, sys, torch
from safetensors.torch import save_file
from model_store import kernels
from tests.service.engine.test_kernels import CASES, case_id, make_case
from model_store.triton_kernels import value_head_readout_triton, block_sizes

kernels.set_kernel("triton")
out, report = {}, {"kernel_for": [], "blocks": {}}
for case in CASES:
    hidden, index, weight, bias = make_case(*case)
    report["kernel_for"].append(kernels.kernel_for(hidden, weight))
    report["blocks"][case_id(case)] = block_sizes(case[0], case[1])
    out[case_id(case)] = kernels.value_head_readout(hidden, index, weight, bias).contiguous()
hidden, index, weight, bias = make_case(7, 48, "float32")
out["int32-index"] = value_head_readout_triton(hidden, index.int(), weight, bias)
report["empty"] = list(value_head_readout_triton(hidden, index[:0], weight, bias).shape)
wild = index.clone()
wild[1], wild[4] = hidden.shape[0], -1  # what a GPU call (no host check) gets for out-of-range indices
out["unchecked"] = value_head_readout_triton(hidden, wild, weight, bias, check_bounds=False)
errors = {}
for name, call in [("out_of_range", lambda: value_head_readout_triton(hidden, index + 100, weight, bias)),
                   ("bad_weight", lambda: value_head_readout_triton(hidden, index, weight[:, :5], bias)),
                   ("float_index", lambda: value_head_readout_triton(hidden, index.float(), weight, bias))]:
    try:
        call()
        errors[name] = None
    except Exception as exc:
        errors[name] = type(exc).__name__
report["errors"] = errors
save_file(out, sys.argv[1])
print(json.dumps(report))
"""


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    pytest.importorskip("triton", reason="needs the `triton` package")
    out = tmp_path_factory.mktemp("triton") / "logits.safetensors"
    env = {**os.environ, "TRITON_INTERPRET": "1", "AGENTPRM_KERNEL": "torch"}
    proc = subprocess.run([sys.executable, "-c", _INTERPRETED, str(out)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return load_file(str(out)), json.loads(proc.stdout.strip().splitlines()[-1])


def test_interpreted_runs_went_through_the_dispatch_to_triton(interpreted):
    _, report = interpreted
    assert report["kernel_for"] == ["triton"] * len(CASES)
    # Odd shapes exercise both the masked H tail and several rows per program.
    assert any(bn > 1 for bn, _ in report["blocks"].values())
    assert all(bh >= 48 for _, bh in report["blocks"].values())


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_triton_kernel_matches_reference(interpreted, case):
    logits, _ = interpreted
    got = logits[case_id(case)]
    hidden, index, weight, bias = make_case(*case)
    ref = value_head_readout_ref(hidden, index, weight, bias)
    assert got.dtype == torch.float32 and got.shape == ref.shape == (case[0],)
    tol = TOL[case[2]]
    assert torch.allclose(got, ref, atol=tol, rtol=tol), (got - ref).abs().max()
    assert torch.allclose(got.double(), exact(hidden, index, weight, bias), atol=tol, rtol=tol)


def test_triton_launcher_checks_its_inputs(interpreted):
    logits, report = interpreted
    hidden, index, weight, bias = make_case(7, 48, "float32")
    assert torch.allclose(logits["int32-index"], value_head_readout_ref(hidden, index, weight, bias),
                          atol=1e-5, rtol=1e-5)
    assert report["empty"] == [0]
    # Without the host check an out-of-range index reads nothing: NaN there, the other readouts intact.
    unchecked, ref = logits["unchecked"], value_head_readout_ref(hidden, index, weight, bias)
    assert torch.isnan(unchecked[[1, 4]]).all()
    keep = [0, 2, 3, 5, 6]
    assert torch.allclose(unchecked[keep], ref[keep], atol=1e-5, rtol=1e-5)
    assert report["errors"] == {"out_of_range": "IndexError", "bad_weight": "ValueError", "float_index": "TypeError"}
