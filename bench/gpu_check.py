"""GPU checks of the fast paths: Triton readout == torch readout, CUDA graph replay == eager, and speedups.

    python -m bench.gpu_check [--hidden 896 --layers 4 --iters 50]

On a CUDA machine it builds a tiny random checkpoint (model_store.export.init_random) in a temporary
directory and, for bfloat16 and float32:
1. compares the compiled Triton readout kernel with the torch reference on odd shapes (N readouts in
   1, 7, 123, 4097; H in 48, 200, 896) and on the model's own hidden states;
2. times both readouts (CUDA events, median) on a [32*512, H] hidden batch;
3. captures CUDA graphs (service.engine.cuda_graphs.GraphRunner) and checks replay == eager on shapes
   inside the buckets (promises, and the KV of a with_kv runner), then prints eager vs graph latency
   for small batches.
On a CPU-only machine it says no GPU is present and runs only the Triton kernel under the interpreter
(TRITON_INTERPRET=1) against the reference. Exit status 1 when a check fails. Figures are printed,
not asserted; record them in bench/RESULTS.md with the device line.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

READOUTS = (1, 7, 123, 4097)
HIDDEN_SIZES = (48, 200, 896)
TOL = 1e-5  # both paths accumulate in fp32 from the same inputs; see tests/service/engine/test_kernels.py


class Report:
    def __init__(self):
        self.failures: list[str] = []

    def check(self, name: str, ok: bool, detail: str) -> None:
        print(f"  {'PASS' if ok else 'FAIL'}  {name:<46} {detail}")
        if not ok:
            self.failures.append(name)


def make_inputs(n: int, h: int, dtype: torch.dtype, device, seed: int = 0):
    g = torch.Generator().manual_seed(seed * 7919 + n * 31 + h)
    rows = 2 * n + 3
    hidden = (torch.randn(rows, h, generator=g) * 2.0).to(device, dtype)  # [R, H]
    index = torch.randint(0, rows, (n,), generator=g).to(device)  # [N]
    weight = ((torch.rand(1, h, generator=g) * 2 - 1) / h**0.5).to(device, dtype)  # [1, H]
    bias = torch.randn(1, generator=g).to(device, dtype)  # [1]
    return hidden, index, weight, bias


def close(got: torch.Tensor, ref: torch.Tensor, tol: float) -> tuple[bool, float]:
    err = (got.float() - ref.float()).abs()
    bound = tol + tol * ref.float().abs()
    return bool((err <= bound).all()), float(err.max()) if err.numel() else 0.0


def kernel_cases(report: Report, device, dtypes, interpreted: bool) -> None:
    from model_store.kernels import value_head_readout_ref
    from model_store.triton_kernels import value_head_readout_triton

    for dtype in dtypes:
        for n in READOUTS:
            for h in HIDDEN_SIZES:
                if interpreted and n * h > 4097 * 48:
                    continue  # the interpreter runs programs one by one: keep the big ones for the GPU
                hidden, index, weight, bias = make_inputs(n, h, dtype, device)
                got = value_head_readout_triton(hidden, index, weight, bias)
                ok, err = close(got, value_head_readout_ref(hidden, index, weight, bias), TOL)
                report.check(f"triton == torch  {str(dtype)[6:]:<8} N={n:<5} H={h}", ok, f"max |diff| {err:.2e}")


def interpreter_only() -> int:
    print("no CUDA GPU present (torch.cuda.is_available() is False): CUDA graph replay, compiled Triton "
          "kernel and speedups are unverified here.")
    try:
        import triton  # noqa: F401
    except ImportError:
        print("the `triton` package is not installed: the interpreter check is skipped too.")
        return 0
    if "model_store.triton_kernels" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        print("the Triton kernel module was imported before TRITON_INTERPRET=1 was set: run this as a fresh process.")
        return 1
    print(f"Triton {triton.__version__} interpreter (TRITON_INTERPRET=1), CPU tensors:")
    report = Report()
    kernel_cases(report, torch.device("cpu"), (torch.float32, torch.bfloat16), interpreted=True)
    print(f"\n{'all checks passed' if not report.failures else f'{len(report.failures)} checks FAILED'}")
    return 1 if report.failures else 0


# -- GPU ------------------------------------------------------------------------------------------------
def cuda_ms(fn, iters: int) -> float:
    """Median milliseconds of fn() over iters, each call timed by CUDA events (after 3 warm-up calls)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def wall_ms(fn, iters: int) -> float:
    """Median wall milliseconds of a call that ends synchronised (as a serving call does, reading results)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def readout_section(report: Report, model, dtype, iters: int) -> None:
    from model_store.kernels import value_head_readout_ref
    from model_store.triton_kernels import value_head_readout_triton

    head = model.value_head
    vocab = model.backbone.config.vocab_size
    ids = torch.randint(1, vocab, (4, 300), device="cuda")
    with torch.inference_mode():
        hidden = model.hidden_states(ids)[0].reshape(-1, model.hidden_size)  # [1200, H]
        index = torch.randperm(hidden.shape[0], device="cuda")[:200]
        ok, err = close(value_head_readout_triton(hidden, index, head.weight, head.bias),
                        value_head_readout_ref(hidden, index, head.weight, head.bias), TOL)
    report.check(f"triton == torch on model hidden  {str(dtype)[6:]}", ok, f"max |diff| {err:.2e}")
    big = torch.randn(32 * 512, model.hidden_size, device="cuda", dtype=dtype)  # [B*T, H]
    for n in (64, 1024, 8192):
        flat = torch.randint(0, big.shape[0], (n,), device="cuda")
        with torch.inference_mode():
            t_ref = cuda_ms(lambda: value_head_readout_ref(big, flat, head.weight, head.bias), iters * 4)
            t_tri = cuda_ms(lambda: value_head_readout_triton(big, flat, head.weight, head.bias), iters * 4)
        print(f"  readout N={n:<5} H={model.hidden_size}: torch {t_ref * 1000:7.1f} us  triton {t_tri * 1000:7.1f} us"
              f"  speedup {t_ref / t_tri:5.2f}x")


def graph_section(report: Report, model, dtype, pad_id: int, iters: int) -> None:
    from service.engine.cuda_graphs import GraphRunner, default_buckets, pad_to_bucket, pick_bucket, remap_flat_index

    buckets = default_buckets(8, (64, 128, 256))
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    runner = GraphRunner(model, buckets, torch.device("cuda"), pad_id=pad_id)
    took = time.perf_counter() - t0
    report.check(f"graphs captured  {str(dtype)[6:]}", runner.enabled, runner.disabled_reason or
                 f"{len(runner.stats)} buckets in {took:.2f} s, pool "
                 f"{runner.stats[-1].pool_bytes / 2**20 if runner.stats else 0:.1f} MiB")
    if not runner.enabled:
        return
    vocab = model.backbone.config.vocab_size
    # Same-shape eager (the padded bucket) should match the replay to rounding; unpadded eager runs other
    # GEMM shapes, which in bf16 round differently (promise = sigmoid, so |dp| <= |dlogit| / 4).
    same_tol, unpadded_tol = (1e-5, 1e-4) if dtype == torch.float32 else (2e-3, 3e-2)
    for batch, length in [(1, 5), (1, 64), (2, 100), (3, 90), (4, 128), (8, 200), (5, 256)]:
        ids = torch.randint(1, vocab, (batch, length))
        flat = torch.cat([b * length + torch.randperm(length)[: max(1, length // 8)] for b in range(batch)])
        got = runner.maybe_run(ids, flat)
        bucket = pick_bucket(runner.buckets, batch, length)
        if got is None:
            report.check(f"replay ran  {batch}x{length}", False, "maybe_run returned None inside a bucket")
            continue
        padded = runner.eager(pad_to_bucket(ids, bucket, pad_id), remap_flat_index(flat, length, bucket[1]))
        ok, err = close(got, padded, same_tol)
        report.check(f"replay == eager (bucket shape)  {batch}x{length}", ok, f"max |diff| {err:.2e}")
        ok, err = close(got, runner.eager(ids, flat), unpadded_tol)
        report.check(f"replay == eager (unpadded)      {batch}x{length}", ok, f"max |diff| {err:.2e}")
    report.check("outside the buckets falls back", runner.maybe_run(torch.ones(9, 8, dtype=torch.long),
                                                                    torch.tensor([0])) is None, "batch 9 -> None")
    kv_runner = GraphRunner(model, [(4, 128)], torch.device("cuda"), pad_id=pad_id, with_kv=True)
    report.check("graphs with KV captured", kv_runner.enabled, kv_runner.disabled_reason or "bucket 4x128")
    if kv_runner.enabled:
        from transformers import DynamicCache

        ids = torch.randint(1, vocab, (3, 100))
        flat = torch.arange(0, 300, 7)
        promises, kv = kv_runner.maybe_run_with_kv(ids, flat)
        with torch.inference_mode():
            _, cache = model.hidden_states(ids.cuda(), past_key_values=DynamicCache())
        err = max(max((k - layer.keys).abs().max().item(), (v - layer.values).abs().max().item())
                  for (k, v), layer in zip(kv, cache.layers))
        kv_tol = 1e-4 if dtype == torch.float32 else 5e-2  # bf16 K/V of other GEMM shapes: a few bf16 ulps
        ok, p_err = close(promises, kv_runner.eager(ids, flat), unpadded_tol)
        report.check("replay with KV == eager (promises, KV)", ok and err <= kv_tol,
                     f"max |diff| {p_err:.2e}, KV {err:.2e}")
    for batch, length in [(1, 64), (4, 128), (8, 256)]:
        ids = torch.randint(1, vocab, (batch, length))
        flat = torch.arange(0, batch * length, 16)
        ids_gpu, flat_gpu = ids.cuda(), flat.cuda()
        eager = wall_ms(lambda: runner.eager(ids_gpu, flat_gpu).cpu(), iters)
        graph = wall_ms(lambda: runner.maybe_run(ids, flat).cpu(), iters)
        print(f"  pass {batch}x{length:<4} eager {eager:7.3f} ms  graph {graph:7.3f} ms  speedup {eager / graph:5.2f}x")


def gpu(args) -> int:
    from model_store.export import init_random
    from model_store import kernels
    from model_store.modeling import load_prm

    torch.backends.cuda.matmul.allow_tf32 = False  # the reference readout must stay fp32
    torch.backends.cudnn.allow_tf32 = False
    print(f"device: {torch.cuda.get_device_name()} (torch {torch.__version__}, CUDA {torch.version.cuda})")
    if not kernels.HAS_TRITON:
        print("the `triton` package is not installed: only the CUDA graph checks run.")
    else:
        import triton

        print(f"triton {triton.__version__}; dispatch picked {kernels.active_kernel()!r} at import")
    report = Report()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "gpu-check"
        init_random(path, name="gpu-check", layers=args.layers, hidden=args.hidden, heads=args.heads,
                    kv_heads=args.kv_heads, max_seq_len=1024)
        for dtype in (torch.bfloat16, torch.float32):
            print(f"\n== {str(dtype)[6:]} ==")
            loaded = load_prm(path, device="cuda", dtype=dtype)
            pad_id = loaded.model.backbone.config.pad_token_id or 0
            if kernels.HAS_TRITON:
                kernel_cases(report, torch.device("cuda"), (dtype,), interpreted=False)
                readout_section(report, loaded.model, dtype, args.iters)
            graph_section(report, loaded.model, dtype, pad_id, args.iters)
            del loaded
            torch.cuda.empty_cache()
    print(f"\n{'all checks passed' if not report.failures else f'{len(report.failures)} checks FAILED'}")
    return 1 if report.failures else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=896, help="hidden size of the random checkpoint")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=14)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--iters", type=int, default=50, help="timed repetitions per figure")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernel module is imported
        return interpreter_only()
    return gpu(args)


if __name__ == "__main__":
    sys.exit(main())
