"""dtype selection (model_store.precision): explicit settings win, `auto` follows the hardware, the manifest hints."""

from __future__ import annotations

import pytest

from model_store.precision import MIN_SPEEDUP, SPEEDUP_ENV, bf16_pays, measured_speedup, resolve_dtype
from training.precision import resolve_precision


@pytest.mark.parametrize("setting", ["float32", "bfloat16"])
def test_an_explicit_dtype_is_taken_whatever_the_hardware(setting):
    for speedup in (0.01, 5.0):
        assert resolve_dtype(setting, "cpu", speedup=lambda s=speedup: s).name == setting
    assert resolve_dtype(setting, "cuda").name == setting


def test_auto_on_a_cpu_follows_the_measured_bf16_speedup():
    fast = resolve_dtype("auto", "cpu", speedup=lambda: 3.4)
    slow = resolve_dtype("auto", "cpu", speedup=lambda: 0.02)  # emulated bf16: ~50x slower
    edge = resolve_dtype("auto", "cpu", speedup=lambda: MIN_SPEEDUP - 0.01)
    assert (fast.name, slow.name, edge.name) == ("bfloat16", "float32", "float32")
    assert "3.40x" in fast.reason and "0.02x" in slow.reason  # the log line says what was measured


def test_auto_on_a_gpu_is_half_precision_and_the_manifest_hints_which():
    assert resolve_dtype("auto", "cuda", speedup=lambda: 0.0).name == "bfloat16"  # no CPU probe on a GPU
    assert resolve_dtype("auto", "cuda", hint="float16").name == "float16"
    assert resolve_dtype("auto", "cuda", hint="float32").name == "bfloat16"
    assert resolve_dtype("auto", "cpu", hint="bfloat16", speedup=lambda: 0.5).name == "float32"  # hint < hardware


def test_unknown_settings_and_overrides_are_refused(monkeypatch):
    with pytest.raises(ValueError, match="dtype must be one of"):
        resolve_dtype("fp16", "cpu")
    monkeypatch.setenv(SPEEDUP_ENV, "2.5")
    assert measured_speedup() == 2.5 and bf16_pays("cpu") and resolve_precision("auto", "cpu") == "bf16"
    assert resolve_dtype("auto", "cpu").name == "bfloat16"
    monkeypatch.setenv(SPEEDUP_ENV, "1.0")
    assert not bf16_pays("cpu") and resolve_precision("auto", "cpu") == "fp32"
    monkeypatch.setenv(SPEEDUP_ENV, "fast")
    with pytest.raises(ValueError, match=SPEEDUP_ENV):
        measured_speedup()
