"""Triton is optional at run time: a kernel that cannot be built (no C compiler or Python headers in the image)
is found by a probe at start-up, or by the first failing call, and the readout falls back to torch with one
warning instead of failing every batch."""

from __future__ import annotations

import logging

import pytest
import torch

from model_store import kernels
from model_store.kernels import value_head_readout_ref

COMPILE_ERROR = "Failed to find C compiler. Please specify via CC environment variable."


@pytest.fixture
def broken_triton(monkeypatch):
    """The triton selection active, with a kernel whose launcher cannot be built (as in an image without gcc)."""
    calls = []

    def cannot_build(*args, **kwargs):
        calls.append(args)
        raise RuntimeError(COMPILE_ERROR)

    monkeypatch.setattr(kernels, "HAS_TRITON", True)
    monkeypatch.setattr(kernels, "_triton_impl", cannot_build)
    monkeypatch.setattr(kernels, "_active", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # so CPU tensors are routed to the (broken) kernel
    return calls


def case(n=5, h=48):
    g = torch.Generator().manual_seed(n)
    return torch.randn(2 * n, h, generator=g), torch.arange(n) * 2, torch.randn(1, h, generator=g), torch.randn(1, generator=g)


def test_probe_falls_back_to_torch_when_the_kernel_cannot_compile(broken_triton, caplog):
    with caplog.at_level(logging.WARNING, logger="model_store.kernels"):
        assert kernels.probe_triton("cpu") == "torch"
    assert broken_triton  # the probe did try to build the kernel
    assert kernels.active_kernel() == "torch"
    assert any("falling back to torch" in r.message and COMPILE_ERROR in r.message for r in caplog.records)
    hidden, index, weight, bias = case()
    assert torch.equal(kernels.value_head_readout(hidden, index, weight, bias),
                       value_head_readout_ref(hidden, index, weight, bias))
    assert len(broken_triton) == 1  # later readouts no longer try the kernel


def test_a_failing_launch_falls_back_once_and_serves_the_reference(broken_triton, caplog):
    hidden, index, weight, bias = case(7)
    with caplog.at_level(logging.WARNING, logger="model_store.kernels"):
        first = kernels.value_head_readout(hidden, index, weight, bias)
        second = kernels.value_head_readout(hidden, index, weight, bias)
    ref = value_head_readout_ref(hidden, index, weight, bias)
    assert torch.equal(first, ref) and torch.equal(second, ref)
    assert len(broken_triton) == 1 and kernels.active_kernel() == "torch"
    assert sum("falling back to torch" in r.message for r in caplog.records) == 1


def test_probe_keeps_a_working_kernel(monkeypatch):
    monkeypatch.setattr(kernels, "HAS_TRITON", True)
    monkeypatch.setattr(kernels, "_triton_impl", value_head_readout_ref)  # a kernel that builds and is right
    monkeypatch.setattr(kernels, "_active", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert kernels.probe_triton("cpu") == "triton"


def test_probe_refuses_a_kernel_that_computes_wrong_logits(monkeypatch):
    monkeypatch.setattr(kernels, "HAS_TRITON", True)
    monkeypatch.setattr(kernels, "_triton_impl", lambda h, i, w, b: value_head_readout_ref(h, i, w, b) + 1.0)
    monkeypatch.setattr(kernels, "_active", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert kernels.probe_triton("cpu") == "torch"


def test_engine_start_probes_the_kernel(broken_triton, tiny_checkpoint):
    # The engine probes at construction: a server in an image without a compiler serves on the torch path.
    from service.engine.config import EngineConfig
    from service.engine.engine import PRMEngine

    engine = PRMEngine.from_checkpoint(tiny_checkpoint, EngineConfig(device="cpu"))
    assert broken_triton and kernels.active_kernel() == "torch"
    assert engine.kernel == "torch"


@pytest.mark.skipif(not kernels.HAS_TRITON, reason="needs the `triton` package (block_sizes lives in its module)")
def test_warm_up_reaches_every_kernel_variant_live_requests_can_pick():
    from model_store.triton_kernels import block_sizes

    for hidden in (64, 896, 3584):
        live = {(block_sizes(n, hidden), n == 1, n % 16 == 0) for n in range(1, 9000)}
        warmed = {(block_sizes(n, hidden), n == 1, n % 16 == 0) for n in kernels.WARM_READOUTS}
        assert live <= warmed, hidden
