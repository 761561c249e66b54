"""bench.report: the headline ratio is against the fastest vLLM configuration of each cell, LAST-pooling rows are
compared on their last promise, and the targets name the configuration they were measured against."""

from __future__ import annotations

from bench.harness import CellResult
from bench.report import ModelRun, RunResult, best_vllm, comparisons, render


def cell(system, workload, c, sent, seconds, outputs, rankings=None):
    out = CellResult(system, workload, c, planned=sent, sent=sent, in_flight=c, seconds=seconds,
                     latencies=[seconds / sent] * sent, workload_tokens=1000 * sent, prompt_tokens=1000 * sent,
                     computed_tokens=500 * sent)
    out.outputs, out.rankings = outputs, rankings or {}
    return out


def model_run() -> ModelRun:
    rows = {"r0": [[0.2, 0.4], [0.5, 0.7]]}
    last = {"r0": [[0.4], [0.7000001]]}
    cells = [cell("ours", "W2", 32, 10, 1.0, rows, {"r0": [1, 0]}),
             cell("vllm", "W2", 32, 10, 4.0, rows, {"r0": [1, 0]}),  # STEP: 2.5 req/s
             cell("vllm-last", "W2", 32, 10, 2.0, last, {"r0": [1, 0]}),  # LAST + caching: 5 req/s, the best
             cell("ours", "W1", 32, 10, 1.0, rows), cell("vllm", "W1", 32, 10, 0.5, rows)]
    stats = dict(params=10, non_embedding=8, layers=1, hidden=8, heads=1, kv_heads=1, head_dim=8,
                 intermediate=16, vocab=10)
    return ModelRun(key="m", path="/m", source="test", stats=stats, cells=cells, dtype="bfloat16",
                    workloads={"W1": {"description": "score", "requests": {32: 10}, "tokens_per_request": 1000},
                               "W2": {"description": "rerank", "requests": {32: 10}, "tokens_per_request": 1000}},
                    linear_peak={"float32": {"gflops": 50.0, "by_shape": {"qkv 8x24": 50.0}},
                                 "bfloat16": {"gflops": 120.0, "by_shape": {"qkv 8x24": 120.0}}})


def test_best_vllm_is_the_faster_configuration_per_cell():
    model = model_run()
    assert best_vllm(model.cells, "W2", 32).system == "vllm-last"
    assert best_vllm(model.cells, "W1", 32).system == "vllm"  # LAST did not run W1
    assert best_vllm(model.cells, "W3", 32) is None


def test_last_pooling_rows_are_compared_on_the_last_promise():
    cmp = comparisons(model_run().cells)
    assert cmp[("vllm-last", "W2", 32)]["max_abs_diff"] < 1e-6
    assert cmp[("vllm-last", "W2", 32)]["top1_agree"] == (1, 1)


def test_report_ratios_and_targets_are_against_the_best_vllm():
    run = RunResult(command="python -m bench", started="now", machine={"cpu": "x", "flags": "avx512_bf16"},
                    matmul={"gflops": 40.0, "by_size": {}}, config={"systems": ["ours", "vllm", "vllm-last"],
                                                                      "concurrencies": [32]},
                    models=[model_run()])
    text = render(run)
    w2 = text.split("### W2:", 1)[1].split("\n### ", 1)[0]
    assert "| 32 | **2.00x** (vllm-last) |" in w2  # ours 10 req/s vs LAST's 5, not STEP's 2.5
    assert "W2 throughput >= 1.3x the best vLLM at c=32 | 2.00x (vs vllm-last) | **met**" in text
    assert "W1 throughput >= 1.2x the best vLLM at c=32 | 0.50x (vs vllm) | **not met**" in text
    assert "bfloat16 linear-layer peak: 120.0 GFLOP/s" in text and "avx512_bf16" in text
