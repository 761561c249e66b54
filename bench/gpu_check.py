"""The one prepared GPU check: every section isolated, timed and reported, whatever the others do.

    python -m bench.gpu_check [--hidden 896 --layers 4 --iters 30 --budget-s 450]   (make gpu-check)

It builds a random checkpoint (model_store.export.init_random) in a temporary directory and runs, each in
its own try block (a failure or an exception is reported and the next section runs):

  environment      device, driver, torch/CUDA, Triton, a C compiler and Python headers (Triton's launcher)
  triton-kernel    the Triton readout == the torch reference on odd shapes (compiled on a GPU; the
                   interpreter on a CPU), and the start-up probe keeps it (or says why it fell back)
  graphs-<dtype>   CUDA graph replay == eager on shapes inside the buckets, with and without KV
  served-<dtype>   the engine as served (runner + serving buckets with KV + prefix cache + shared prefixes)
                   against eager padded passes without graphs or cache: promises of plain jobs, of two
                   shared prefixes in one bucket, of the past path (suffixes on a prefix), of a grown history
                   hitting the cache on a second call, and the KV the cache keeps against an eager forward
  packed-<dtype>   the packed backend with varlen attention (FlexAttention on a GPU) == eager padded
  shared-past      a rerank's suffix pass on one long past, bf16 and fp32: the padded backend attending the
                   past once == transformers' per-row copies == packed varlen, and the pass's peak memory
                   (GPU: allocator peak; CPU: its largest tensor) against one copy of the past per candidate
  two-devices      the served engine on cuda:1 == cuda:0, with no memory allocated on cuda:0 by it
  throughput       W1-like (trajectories of mixed lengths) and W3-like (short candidates on shared
                   histories) tokens/s: padded eager, padded + graphs, packed varlen (figures, not asserted)

On a CPU-only machine the CUDA sections say "skipped: no CUDA GPU" and the rest run on the CPU (graphs
emulated, the Triton kernel under the interpreter, fp32 and bf16 on a small model). Sections past the time
budget are skipped and named. Exit status 1 when any check failed or a section raised. Record the output in
bench/RESULTS.md with the device line.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import sysconfig
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

READOUTS = (1, 7, 123, 4097)
HIDDEN_SIZES = (48, 200, 896)
TOL = 1e-5  # both readouts accumulate in fp32 from the same inputs; see tests/service/engine/test_kernels.py
# Served engine vs eager: fp32 differs by GEMM shapes only; bf16 by bf16 rounding of other shapes (promise =
# sigmoid, |dp| <= |dlogit| / 4).
PROMISE_TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2}
KV_TOL = {torch.float32: 1e-4, torch.bfloat16: 5e-2}


# -- reporting -------------------------------------------------------------------------------------------
@dataclass
class Section:
    name: str
    status: str = "pass"  # pass | FAIL | ERROR | skipped
    detail: str = ""
    seconds: float = 0.0
    failures: list[str] = field(default_factory=list)

    def check(self, name: str, ok: bool, detail: str) -> None:
        print(f"  {'PASS' if ok else 'FAIL'}  {name:<52} {detail}", flush=True)
        if not ok:
            self.failures.append(name)
            self.status = "FAIL"


class Skip(Exception):
    """A section that cannot run here: the reason names the missing hardware or package."""


def close(got, ref, tol: float) -> tuple[bool, float]:
    got, ref = torch.as_tensor(got).float().cpu(), torch.as_tensor(ref).float().cpu()
    err = (got - ref).abs()
    return bool((err <= tol + tol * ref.abs()).all()), float(err.max()) if err.numel() else 0.0


def run_sections(sections, budget_s: float) -> list[Section]:
    start = time.perf_counter()
    done = []
    for name, fn in sections:
        section = Section(name)
        print(f"\n== {name} ==", flush=True)
        if time.perf_counter() - start > budget_s:
            section.status, section.detail = "skipped", f"time budget of {budget_s:.0f} s spent"
        else:
            t0 = time.perf_counter()
            try:
                fn(section)
            except Skip as why:
                section.status, section.detail = "skipped", str(why)
            except Exception as exc:  # one section's crash must not hide the others' results
                section.status, section.detail = "ERROR", f"{type(exc).__name__}: {exc}"
                traceback.print_exc(limit=6)
            section.seconds = time.perf_counter() - t0
            if torch.cuda.is_available():
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
        if section.status == "skipped":
            print(f"  skipped: {section.detail}", flush=True)
        done.append(section)
    return done


def summary(sections: list[Section], total_s: float) -> int:
    print(f"\n== summary ({total_s:.0f} s) ==")
    for s in sections:
        detail = s.detail or (f"{len(s.failures)} checks failed: {', '.join(s.failures[:3])}" if s.failures else "")
        print(f"  {s.status:<8} {s.name:<18} {s.seconds:6.1f} s  {detail}")
    bad = [s for s in sections if s.status in ("FAIL", "ERROR")]
    print("all sections that ran passed" if not bad else f"{len(bad)} sections FAILED or raised")
    return 1 if bad else 0


# -- the model and workloads -----------------------------------------------------------------------------
@dataclass
class Setup:
    device: torch.device
    checkpoint: Path
    iters: int
    on_gpu: bool


def load(setup: Setup, dtype, device=None):
    from model_store.modeling import load_prm

    return load_prm(setup.checkpoint, device=device or setup.device, dtype=dtype)


def workloads(vocab: int, marker: int, rng: np.random.Generator, scale: int = 1):
    """Batches of ScoreJobs: plain jobs, two shared prefixes in one bucket, the past path, a grown history."""
    from service.engine.types import ScoreJob

    def seq(n):
        ids = rng.integers(3, vocab, n)
        ids[rng.random(n) < 0.1] = marker
        ids[-1] = marker
        return tuple(int(t) for t in ids)

    def job(ids, prefix_len=0):
        return ScoreJob(ids, tuple(int(i) for i in np.flatnonzero(np.asarray(ids) == marker)), prefix_len)

    plain = [job(seq(n * scale)) for n in (5, 40, 17, 64, 3, 100)]
    a, b = seq(40 * scale), seq(44 * scale)  # two uncached prefixes in the same bucket
    shared = [job(a + seq(n), len(a)) for n in (1, 6, 3)] + [job(b + seq(n), len(b)) for n in (2, 5)]
    history = seq(90 * scale)
    first = [job(history)]
    grown = [job(history + seq(20)), job(history + seq(7))]  # a grown history: a cache hit on the second call
    return {"plain": plain, "two-prefixes": shared, "history": first, "grown": grown}


def runner_for(model, device, backend: str, graphs: bool, cache_bytes: int, pad_id: int, marker_ids, dtype):
    from service.engine.cuda_graphs import GraphRunner, serving_buckets
    from service.engine.prefix_cache import PrefixCache
    from service.engine.runner import TorchRunner

    graph_runner = None
    if graphs:
        buckets = serving_buckets() if device.type == "cuda" else [(1, 64), (4, 64), (8, 128), (1, 256)]
        graph_runner = GraphRunner(model, buckets, device, pad_id=pad_id, with_kv=True, emulate=device.type != "cuda")
        if not graph_runner.enabled:
            raise RuntimeError(f"graphs disabled: {graph_runner.disabled_reason}")
    return TorchRunner(model, device, pad_id=pad_id, max_forward_tokens=512 if device.type == "cpu" else 8192,
                       cache=PrefixCache(cache_bytes, block_size=16), marker_ids=marker_ids, backend=backend,
                       graphs=graph_runner)


# -- sections --------------------------------------------------------------------------------------------
def environment(setup: Setup):
    def section(report: Section):
        print(f"  torch {torch.__version__}, CUDA build {torch.version.cuda}, device {setup.device}")
        if setup.on_gpu:
            for i in range(torch.cuda.device_count()):
                free, total = torch.cuda.mem_get_info(i)
                print(f"  cuda:{i} {torch.cuda.get_device_name(i)}  {free / 2**30:.1f} / {total / 2**30:.1f} GiB free")
        driver = Path("/proc/driver/nvidia/version")
        print(f"  driver: {driver.read_text().splitlines()[0] if driver.exists() else 'none'}")
        try:
            import triton

            print(f"  triton {triton.__version__}")
        except ImportError:
            print("  triton: not installed")
        compiler = shutil.which(os.environ.get("CC", "")) or shutil.which("gcc") or shutil.which("cc")
        headers = Path(sysconfig.get_paths()["include"], "Python.h").exists()
        print(f"  C compiler: {compiler or 'none'}; Python.h: {'present' if headers else 'missing'}")
        if setup.on_gpu:
            report.check("a C compiler and Python headers (Triton's launcher)", bool(compiler) and headers,
                         f"compiler {compiler}, headers {headers}")
    return section


def triton_kernel(setup: Setup):
    def section(report: Section):
        from model_store import kernels

        if not kernels.HAS_TRITON:
            raise Skip("the `triton` package is not installed")
        if not setup.on_gpu and os.environ.get("TRITON_INTERPRET") != "1":
            raise Skip("no CUDA GPU and TRITON_INTERPRET is not 1")
        from model_store.kernels import value_head_readout_ref
        from model_store.triton_kernels import value_head_readout_triton

        if setup.on_gpu:
            print(f"  dispatch picked {kernels.active_kernel()!r} at import; probe keeps "
                  f"{kernels.probe_triton(setup.device, 896, torch.bfloat16)!r}")
            report.check("start-up probe keeps the Triton kernel", kernels.active_kernel() == "triton",
                         kernels.active_kernel())
        for dtype in (torch.float32, torch.bfloat16):
            for n in READOUTS:
                for h in HIDDEN_SIZES:
                    if not setup.on_gpu and n * h > 4097 * 48:
                        continue  # the interpreter runs programs one by one
                    g = torch.Generator().manual_seed(n * 31 + h)
                    hidden = (torch.randn(2 * n + 3, h, generator=g) * 2).to(setup.device, dtype)
                    index = torch.randint(0, 2 * n + 3, (n,), generator=g).to(setup.device)
                    weight = ((torch.rand(1, h, generator=g) * 2 - 1) / h**0.5).to(setup.device)
                    bias = torch.randn(1, generator=g).to(setup.device)
                    ok, err = close(value_head_readout_triton(hidden, index, weight, bias),
                                    value_head_readout_ref(hidden, index, weight, bias), TOL)
                    report.check(f"triton == torch {str(dtype)[6:]:<8} N={n:<5} H={h}", ok, f"max |diff| {err:.1e}")
    return section


def graphs(setup: Setup, dtype):
    def section(report: Section):
        from service.engine.cuda_graphs import GraphRunner, serving_buckets

        if not setup.on_gpu:
            raise Skip("no CUDA GPU (emulated graphs are covered by the served-* sections and the test suite)")
        model = load(setup, dtype).model
        vocab = model.backbone.config.vocab_size
        t0 = time.perf_counter()
        runner = GraphRunner(model, serving_buckets(), setup.device, with_kv=True)
        report.check("serving buckets captured", runner.enabled, runner.disabled_reason or
                     f"{len(runner.stats)} buckets in {time.perf_counter() - t0:.1f} s, pool "
                     f"{runner.stats[-1].pool_bytes / 2**20:.0f} MiB")
        if not runner.enabled:
            return
        from transformers import DynamicCache

        tol = PROMISE_TOL[dtype]
        for batch, length in [(1, 5), (2, 100), (3, 90), (8, 200), (16, 256), (4, 1000)]:
            ids = torch.randint(1, vocab, (batch, length))
            flat = torch.cat([b * length + torch.randperm(length)[: max(1, length // 8)] for b in range(batch)])
            got = runner.maybe_run_with_kv(ids, flat)
            if got is None:
                report.check(f"replay ran {batch}x{length}", False, "no bucket")
                continue
            promises, kv = got
            ok, err = close(promises, runner.eager(ids, flat), tol)
            with torch.inference_mode():
                _, cache = model.hidden_states(ids.to(setup.device), past_key_values=DynamicCache())
            kv_err = max(max((k - layer.keys).abs().max().item(), (v - layer.values).abs().max().item())
                         for (k, v), layer in zip(kv, cache.layers))
            report.check(f"replay == eager {batch}x{length} (promises, KV)", ok and kv_err <= KV_TOL[dtype],
                         f"max |diff| {err:.1e}, KV {kv_err:.1e}")
    return section


def served(setup: Setup, dtype, backend: str = "padded", graphs_on: bool = True):
    def section(report: Section):
        from service.engine.backends.packed import PackedBackend
        from transformers import DynamicCache

        loaded = load(setup, dtype)
        model = loaded.model
        template = loaded.manifest.template
        marker = loaded.tokenizer.token_to_id(template.action_end)
        markers = (marker, loaded.tokenizer.token_to_id(template.state_end))
        pad_id = model.backbone.config.pad_token_id or 0
        vocab = model.backbone.config.vocab_size
        served_runner = runner_for(model, setup.device, "padded", graphs_on and backend == "padded", 1 << 28, pad_id,
                                   markers, dtype)
        if backend == "packed":
            served_runner.executor = PackedBackend(model, setup.device, attention="varlen")
            print(f"  packed attention: varlen, {'FlexAttention' if served_runner.executor.packed._flex else 'SDPA'}")
        eager = runner_for(model, setup.device, "padded", False, 0, pad_id, markers, dtype)
        tol = PROMISE_TOL[dtype]
        for name, jobs in workloads(vocab, marker, np.random.default_rng(0)).items():
            got, ref = served_runner.run_batch(jobs), eager.run_batch(jobs)
            errs = [close(g.promises, r.promises, tol) for g, r in zip(got, ref)]
            cached = sum(len(j.ids) - g.computed_tokens for j, g in zip(jobs, got))
            report.check(f"served == eager: {name}", all(ok for ok, _ in errs),
                         f"max |diff| {max(e for _, e in errs):.1e}, cached tokens {cached}")
        if graphs_on and backend == "padded" and served_runner.graphs is not None:
            report.check("graphs replayed passes", served_runner.graphs.replays > 0, f"{served_runner.graphs.replays}")
        # The KV the prefix cache kept (across calls) against an eager forward of the same tokens.
        history = next(iter(workloads(vocab, marker, np.random.default_rng(0))["history"])).ids
        hit = served_runner.cache.lookup(history)
        if not hit.tokens:
            report.check("the prefix cache kept the history", False, "no hit")
            return
        with torch.inference_mode():
            cache = DynamicCache()
            model.hidden_states(torch.tensor([history[: hit.tokens]], device=setup.device), past_key_values=cache)
        err = max(max((k - layer.keys).abs().max().item(), (v - layer.values).abs().max().item())
                  for (k, v), layer in zip(hit.kv(), cache.layers))
        report.check("cached KV == eager KV", err <= KV_TOL[dtype], f"{hit.tokens} tokens, max |diff| {err:.1e}")
    return section


def _size(n: float) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def shared_past_pass(setup: Setup):
    def section(report: Section):
        from service.engine.backends.base import ForwardPass
        from service.engine.backends.packed import PackedBackend
        from service.engine.backends.padded import PaddedBackend
        from torch.utils._python_dispatch import TorchDispatchMode
        from transformers import DynamicCache

        class Largest(TorchDispatchMode):
            largest = 0

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in out if isinstance(out, (tuple, list)) else (out,):
                    if isinstance(t, torch.Tensor):
                        self.largest = max(self.largest, t.numel() * t.element_size())
                return out

        rows, length, past_len = (64, 12, 2000) if setup.on_gpu else (16, 6, 256)
        for dtype in (torch.bfloat16, torch.float32):
            loaded = load(setup, dtype)
            model, config = loaded.model, loaded.model.backbone.config
            gen = torch.Generator().manual_seed(5)
            with torch.inference_mode():
                cache = DynamicCache()
                model.hidden_states(torch.randint(3, config.vocab_size, (1, past_len), generator=gen).to(setup.device),
                                    past_key_values=cache)
                past = [(layer.keys, layer.values) for layer in cache.layers]  # [1, kvh, P, hd]
            past_bytes = sum(k.numel() * k.element_size() * 2 for k, _ in past)  # keys + values, every layer
            seqs = [tuple(int(t) for t in torch.randint(3, config.vocab_size, (length,), generator=gen))
                    for _ in range(rows)]
            fwd = ForwardPass(seqs, [past] * rows, [np.arange(length)] * rows, keep_kv=True)
            results, peaks = {}, {}
            for name, backend in (("once", PaddedBackend(model, setup.device, one_past=True)),
                                  ("copies", PaddedBackend(model, setup.device, one_past=False)),
                                  ("packed", PackedBackend(model, setup.device, attention="varlen"))):
                with torch.inference_mode():
                    if setup.on_gpu:
                        torch.cuda.synchronize()
                        torch.cuda.reset_peak_memory_stats()
                        base = torch.cuda.memory_allocated()
                        out = backend.run(fwd)
                        torch.cuda.synchronize()
                        peaks[name] = torch.cuda.max_memory_allocated() - base
                    else:
                        with Largest() as spy:
                            out = backend.run(fwd)
                        peaks[name] = spy.largest
                results[name] = np.concatenate(out.promises)
            label = str(dtype)[6:]
            for other in ("copies", "packed"):
                ok, err = close(results["once"], results[other], PROMISE_TOL[dtype])
                report.check(f"{label}: padded one past == {other}", ok, f"max |diff| {err:.1e}")
            measure = "peak allocated" if setup.on_gpu else "largest tensor"
            report.check(f"{label}: one past holds less than a copy per candidate",
                         peaks["once"] < rows * past_bytes / 2,
                         f"{measure}: once {_size(peaks['once'])}, copies {_size(peaks['copies'])}, packed "
                         f"{_size(peaks['packed'])}; {rows} x past = {_size(rows * past_bytes)}")
            del loaded, model, past, cache
    return section


def two_devices(setup: Setup):
    def section(report: Section):
        if not setup.on_gpu or torch.cuda.device_count() < 2:
            raise Skip(f"needs two CUDA devices ({torch.cuda.device_count() if setup.on_gpu else 0} present)")
        from model_store.modeling import activate_device

        results = {}
        before = torch.cuda.memory_allocated(0)
        for index in (1, 0):
            device = torch.device("cuda", index)
            activate_device(device)
            loaded = load(setup, torch.bfloat16, device=device)
            marker = loaded.tokenizer.token_to_id(loaded.manifest.template.action_end)
            runner = runner_for(loaded.model, device, "padded", True, 1 << 26,
                                loaded.model.backbone.config.pad_token_id or 0, (marker,), torch.bfloat16)
            jobs = workloads(loaded.model.backbone.config.vocab_size, marker, np.random.default_rng(1))["two-prefixes"]
            results[index] = np.concatenate([r.promises for r in runner.run_batch(jobs)])
            if index == 1:
                report.check("cuda:1 allocated nothing on cuda:0", torch.cuda.memory_allocated(0) == before,
                             f"{(torch.cuda.memory_allocated(0) - before) / 2**20:.1f} MiB on cuda:0")
            del runner, loaded
        ok, err = close(results[1], results[0], 1e-3)
        report.check("cuda:1 == cuda:0", ok, f"max |diff| {err:.1e}")
    return section


def throughput(setup: Setup):
    def section(report: Section):
        if not setup.on_gpu:
            raise Skip("no CUDA GPU (CPU throughput is measured by bench/, not here)")
        from service.engine.backends.packed import PackedBackend
        from service.engine.types import ScoreJob

        loaded = load(setup, torch.bfloat16)
        model = loaded.model
        marker = loaded.tokenizer.token_to_id(loaded.manifest.template.action_end)
        pad_id = model.backbone.config.pad_token_id or 0
        vocab = model.backbone.config.vocab_size
        rng = np.random.default_rng(2)

        def seq(n):
            return tuple(int(t) for t in rng.integers(3, vocab, n))

        w1 = [ScoreJob(ids, tuple(range(9, len(ids), 10))) for ids in (seq(int(n)) for n in rng.integers(150, 1000, 32))]
        w3 = []
        for _ in range(8):  # 8 beams x 6 candidates of ~12 tokens on ~600-token histories
            history = seq(int(rng.integers(400, 800)))
            w3 += [ScoreJob(history + seq(12), (len(history) - 1, len(history) + 11), len(history)) for _ in range(6)]
        for label, jobs in (("W1", w1), ("W3", w3)):
            tokens = sum(len(j.ids) for j in jobs)
            for name, backend, graphs_on in (("padded eager", "padded", False), ("padded + graphs", "padded", True),
                                             ("packed varlen", "packed", False)):
                runner = runner_for(model, setup.device, "padded", graphs_on, 0, pad_id, (marker,), torch.bfloat16)
                if backend == "packed":
                    runner.executor = PackedBackend(model, setup.device, attention="varlen")
                times = []
                for i in range(setup.iters // 5 + 3):
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    stats = runner.run_batch(jobs).stats
                    torch.cuda.synchronize()
                    if i >= 2:  # warm-up: compiles, first captures
                        times.append(time.perf_counter() - t0)
                median = statistics.median(times)
                print(f"  {label} {name:<16} {tokens / median:10.0f} tokens/s  ({median * 1000:7.1f} ms, "
                      f"{stats.forwards} passes, {stats.padded_tokens} slots)", flush=True)
    return section


def _skipped_by_flag(report: Section):
    raise Skip("left out by --skip")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=None, help="hidden size (default 896 on a GPU, 64 on a CPU)")
    parser.add_argument("--layers", type=int, default=None, help="layers (default 4 on a GPU, 2 on a CPU)")
    parser.add_argument("--heads", type=int, default=None)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--iters", type=int, default=30, help="timed repetitions per figure")
    parser.add_argument("--budget-s", type=float, default=450.0, help="skip the sections that would start after this")
    parser.add_argument("--skip", action="append", default=[], metavar="SECTION", help="leave a section out (repeatable)")
    args = parser.parse_args(argv)
    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernel module is imported
        print("no CUDA GPU present (torch.cuda.is_available() is False): the CUDA sections are skipped; graphs run "
              "emulated and the Triton kernel under its interpreter.")
    else:
        torch.backends.cuda.matmul.allow_tf32 = False  # the reference readout must stay fp32
        torch.backends.cudnn.allow_tf32 = False
    hidden = args.hidden or (896 if on_gpu else 64)
    layers = args.layers or (4 if on_gpu else 2)
    heads = args.heads or (14 if on_gpu else 4)
    from model_store.export import init_random

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "gpu-check"
        init_random(path, name="gpu-check", layers=layers, hidden=hidden, heads=heads, kv_heads=args.kv_heads,
                    max_seq_len=2048)
        setup = Setup(torch.device("cuda" if on_gpu else "cpu"), path, args.iters, on_gpu)
        sections = [("environment", environment(setup)), ("triton-kernel", triton_kernel(setup))]
        for dtype in (torch.bfloat16, torch.float32):
            name = str(dtype)[6:]
            sections += [(f"graphs-{name}", graphs(setup, dtype)), (f"served-{name}", served(setup, dtype)),
                         (f"packed-{name}", served(setup, dtype, backend="packed"))]
        sections += [("shared-past", shared_past_pass(setup)), ("two-devices", two_devices(setup)),
                     ("throughput", throughput(setup))]
        results = run_sections([(n, fn) if n not in args.skip else (n, _skipped_by_flag) for n, fn in sections],
                               args.budget_s)
    return summary(results, time.perf_counter() - start)


if __name__ == "__main__":
    sys.exit(main())
