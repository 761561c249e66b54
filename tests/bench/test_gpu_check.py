"""`make gpu-check` (bench/gpu_check.py): every section isolated and reported; on a CPU-only machine it runs the
sections it can (the served engine with emulated graphs, the packed varlen backend, Triton under its
interpreter) and names what it skipped and why."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from bench import gpu_check
from tests.conftest import REPO


def test_a_raising_section_is_reported_and_the_next_one_still_runs(capsys):
    def broken(report):
        raise RuntimeError("device-side assert")

    def failing(report):
        report.check("replay == eager", False, "max |diff| 1.0")

    def fine(report):
        report.check("something", True, "ok")

    def missing(report):
        raise gpu_check.Skip("needs two CUDA devices (1 present)")

    sections = gpu_check.run_sections([("broken", broken), ("failing", failing), ("missing", missing),
                                       ("fine", fine)], budget_s=60)
    assert [s.status for s in sections] == ["ERROR", "FAIL", "skipped", "pass"]
    assert gpu_check.summary(sections, 1.0) == 1
    out = capsys.readouterr().out
    assert "device-side assert" in out and "needs two CUDA devices" in out
    late = gpu_check.run_sections([("fine", fine)], budget_s=-1)  # past the budget: skipped and said so
    assert late[0].status == "skipped" and "time budget" in late[0].detail


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only report; on a GPU run make gpu-check")
def test_cpu_run_checks_what_it_can_and_names_what_it_skipped():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    # The interpreted Triton cases are left out: tests/service/engine/test_kernels.py runs them.
    run = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--skip", "triton-kernel"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=400)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = run.stdout.split("== summary")[1]
    for name in ("served-bfloat16", "served-float32", "packed-bfloat16", "packed-float32", "shared-past"):
        assert f"pass     {name}" in report
    assert "skipped  graphs-float32" in report and "no CUDA GPU" in report
    assert "skipped  triton-kernel" in report and "left out by --skip" in report
    assert "skipped  two-devices" in report and "needs two CUDA devices" in report
    assert "PASS  served == eager: two-prefixes" in run.stdout and "FAIL" not in run.stdout
