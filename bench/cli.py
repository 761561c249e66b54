"""`agentprm bench` / `python -m bench`: every system on the same models in one run, writing bench/RESULTS.md.

    agentprm bench [--quick] [--systems ours,ours-fp32,ours-vllm,vllm,vllm-last,openrlhf,naive] [--models default,25m]
                   [--dtype auto] [--wait-quiet 0] [--out bench/RESULTS.md]

Contract: one invocation measures the machine's matmul peak (square fp32, and per model the linear-layer shapes
in fp32 and bf16: bench.matmul_peak), then for each model (`default`: the shipped
checkpoint model_store/checkpoints/agentprm-babyai-small/<latest>/, or a random one of the training default
size when none is shipped, said so in the report; `25m`: a ~25M-parameter Qwen2 from init_random; or a
checkpoint path) builds the workloads, runs each system in turn (one server at a time; ours first, whose
dtype -- `--dtype`, default auto -- the vLLM peers then use), profiles our runner,
and writes the whole report (and `--json`) from that run only. A system that cannot start (vLLM missing) is
reported as not run; the rest goes on. `--quick` uses small workloads and budgets (tests). Bounded: per-cell
time budgets (`--budget`), request timeouts, bounded server starts, a bounded wait for a quiet machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_NAME = "agentprm-babyai-small"
# A random checkpoint of the training default size (training.DEFAULT_SIZE) stands in for the default one.
RANDOM_DEFAULT = dict(layers=4, hidden=128, heads=4, kv_heads=2, intermediate=512, vocab=1024)
QWEN2_25M = dict(layers=8, hidden=512, heads=8, kv_heads=2, intermediate=1536, vocab=1024)
QWEN2_100M = dict(layers=12, hidden=768, heads=12, kv_heads=2, intermediate=2816, vocab=1024)  # ~95M non-embedding
QUICK_TINY = dict(layers=2, hidden=64, heads=2, kv_heads=1, intermediate=128, vocab=512)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="small workloads and budgets (tests, smoke runs)")
    p.add_argument("--systems", default="ours,ours-fp32,ours-vllm,vllm,vllm-last,openrlhf,naive",
                   help="comma-separated: ours,ours-fp32,ours-vllm,vllm,vllm-last,openrlhf,naive")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                   help="ours' --dtype; the vLLM peers run at the dtype ours resolves to [default auto]")
    p.add_argument("--models", default=None,
                   help="comma-separated: default, 25m, 100m, or checkpoint paths [default: default,25m; --quick: "
                        "default]")
    p.add_argument("--out", default=str(REPO_ROOT / "bench" / "RESULTS.md"), help="report path")
    p.add_argument("--json", default=None, help="also write the raw figures (cells, latencies, promises) as JSON")
    p.add_argument("--work-dir", default=str(REPO_ROOT / ".cache" / "bench"),
                   help="generated models, vLLM export, server logs")
    p.add_argument("--concurrency", default=None, help="comma-separated [default 1,8,32; --quick 1,8]")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds per (system, workload), split over concurrencies [default 40; --quick 4]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--wait-quiet", type=float, default=None,
                   help="wait up to this many seconds for 1-min load < 1.5 before measuring [default 900; --quick 0]")
    p.add_argument("--no-profile", action="store_true", help="skip the in-process profile of our runner")
    p.add_argument("--analysis", default=None, help="a Markdown file added as 'What limits the figures'")
    p.add_argument("--from-json", default=None,
                   help="measure nothing: re-render --out from the --json record of an earlier run (with --analysis)")


def register(subparsers) -> None:
    p = subparsers.add_parser("bench", help="benchmark ours against vLLM, an OpenRLHF-style server and naive scoring",
                              description=__doc__.splitlines()[0])
    add_arguments(p)
    p.set_defaults(func=cmd_bench)


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def machine_info() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in _read("/proc/cpuinfo").splitlines()
                if line.startswith("model name")), platform.processor() or "unknown")
    mem_kib = next((int(line.split()[1]) for line in _read("/proc/meminfo").splitlines()
                    if line.startswith("MemTotal:")), 0)
    versions = {}
    for pkg in ("torch", "transformers", "fastapi"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = "not installed"
    from bench.vllm_peer import VENV_DIR
    vllm = sorted(VENV_DIR.glob("lib/python3*/site-packages/vllm*.dist-info"))
    versions["vllm"] = vllm[0].name.removesuffix(".dist-info").split("-", 1)[1] if vllm else "not installed"
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": mem_kib / 2**20, "python": platform.python_version(),
            "load_start": os.getloadavg()[0], "flags": cpu_flags(), **versions}


def cpu_flags() -> str:
    """The CPU's matrix and vector flags from /proc/cpuinfo (what decides fp32 vs bf16 speed): avx2, fma, avx512*,
    amx*; '' where unreadable."""
    flags = next((line.split(":", 1)[1].split() for line in _read("/proc/cpuinfo").splitlines()
                  if line.startswith("flags")), [])
    return " ".join(f for f in flags if f in ("avx2", "fma") or f.startswith(("avx512", "amx")))


def wait_quiet(max_s: float, threshold: float = 1.5, log=print) -> float:
    deadline = time.monotonic() + max_s
    load = os.getloadavg()[0]
    while load >= threshold and time.monotonic() < deadline:
        log(f"bench: load average {load:.2f} >= {threshold}; waiting (up to {max_s:.0f} s in all)")
        time.sleep(min(30.0, max(1.0, deadline - time.monotonic())))
        load = os.getloadavg()[0]
    return load


def _json_subprocess(args: list[str], timeout_s: float) -> dict:
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout_s, cwd=REPO_ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed: {proc.stderr[-1500:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _random_checkpoint(path: Path, name: str, size: dict, seed: int) -> Path:
    from model_store.export import init_random
    from model_store.store import read_manifest

    if (path / "manifest.json").is_file():
        try:
            cfg = read_manifest(path).backbone["config"]
            if (cfg.get("num_hidden_layers"), cfg.get("hidden_size"), cfg.get("intermediate_size")) == (
                    size["layers"], size["hidden"], size["intermediate"]):
                return path
        except Exception:  # noqa: BLE001 - rebuilt below
            pass
    init_random(path, name=name, version="1", max_seq_len=2048, seed=seed, overwrite=True, **size)
    return path


def resolve_model(spec: str, work_dir: Path, quick: bool, seed: int) -> tuple[str, Path, str]:
    """(key, checkpoint path, source description) for `default`, `25m` or a path."""
    from model_store.store import CheckpointError, ModelStore, read_manifest

    if spec == "default" and quick:
        path = _random_checkpoint(work_dir / "models" / "quick-tiny", "quick-tiny", QUICK_TINY, seed)
        return "default", path, "a tiny random checkpoint (--quick)"
    if spec == "default":
        try:
            path = ModelStore().resolve(DEFAULT_NAME)
            m = read_manifest(path)
            return "default", path, f"the shipped default checkpoint {m.ref} ({m.training.method})"
        except CheckpointError:
            path = _random_checkpoint(work_dir / "models" / "random-default", "random-default", RANDOM_DEFAULT, seed)
            return "default", path, ("a RANDOM checkpoint of the training default size (no "
                                     f"model_store/checkpoints/{DEFAULT_NAME}/ was shipped when this ran)")
    if spec == "25m":
        path = _random_checkpoint(work_dir / "models" / "qwen2-25m", "qwen2-25m", QWEN2_25M, seed)
        return "25m", path, "a ~25M-parameter Qwen2 (init_random, random weights)"
    if spec == "100m":
        path = _random_checkpoint(work_dir / "models" / "qwen2-100m", "qwen2-100m", QWEN2_100M, seed)
        return "100m", path, "a ~100M-parameter Qwen2 (init_random, random weights)"
    path = Path(spec).expanduser().resolve()
    m = read_manifest(path)
    return path.name, path, f"checkpoint {m.ref} at {path}"


def _workload_info(workload, concurrencies) -> dict:
    levels = [c for c in concurrencies if c in (workload.cells or workload.agents)]
    reqs = [r for c in levels for r in workload.requests(c)]
    return {"description": workload.description,
            "requests": {c: len(workload.requests(c)) for c in levels},
            "tokens_per_request": sum(r.tokens for r in reqs) / len(reqs) if reqs else 0}


def run_bench(args, log=print):
    from bench.harness import HarnessConfig, run_system
    from bench.matmul_peak import model_stats
    from bench.report import ModelRun, RunResult, write_report
    from bench.systems import SYSTEMS, VLLM_SYSTEMS, SystemError_, make_system
    from bench.workloads import Sizes, build_calibration, build_workloads

    started = time.monotonic()
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown or not systems:
        raise SystemExit(f"agentprm bench: unknown system(s) {unknown}; choose from {', '.join(SYSTEMS)}")
    models = [m.strip() for m in (args.models or ("default" if args.quick else "default,25m")).split(",") if m.strip()]
    concurrencies = tuple(int(c) for c in (args.concurrency or ("1,8" if args.quick else "1,8,32")).split(","))
    if not concurrencies or any(not 1 <= c <= 256 for c in concurrencies):
        raise SystemExit("agentprm bench: --concurrency values must be in [1, 256]")
    budget = args.budget if args.budget is not None else (4.0 if args.quick else 40.0)
    sizes = Sizes.quick() if args.quick else Sizes()
    for table in (sizes.w1_requests, sizes.w2_requests, sizes.w3_calls, sizes.w4_calls):
        for c in concurrencies:
            table.setdefault(c, max(table.values()))
    work_dir = Path(args.work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    wait = args.wait_quiet if args.wait_quiet is not None else (0.0 if args.quick else 900.0)
    load = wait_quiet(wait, log=log) if wait > 0 else os.getloadavg()[0]
    weights = (0.25, 0.35, 0.4) if len(concurrencies) == 3 else tuple(1 / len(concurrencies) for _ in concurrencies)
    config = HarnessConfig(concurrencies=concurrencies, budget_s=budget, weights=weights)
    command = "agentprm bench " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[0].endswith(
        "agentprm") else "python -m bench " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    machine = machine_info()
    machine["load_start"] = load
    log(f"bench: measuring the fp32 matmul peak (load {load:.2f})")
    matmul = _json_subprocess(["-m", "bench.matmul_peak"] + (["--quick"] if args.quick else []), 600)
    log(f"bench: matmul peak {matmul['gflops']:.1f} GFLOP/s")
    run = RunResult(command=command, started=datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
                    machine=machine, matmul=matmul,
                    config={"systems": systems, "concurrencies": list(concurrencies), "budget_s": budget,
                            "quick": args.quick, "seed": args.seed, "sizes": str(sizes), "dtype": args.dtype, "models": models,
                            "analysis": _read(args.analysis) if args.analysis else ""})
    if load >= 1.5:
        run.notes.append(f"The machine was busy when the run started (1-min load {load:.2f} >= 1.5 after waiting "
                         f"up to {wait:.0f} s): other work shared the 2 cores, so absolute figures are low and "
                         "noisier; ratios within a cell pair are still from the same run.")
    for spec in models:
        key, path, source = resolve_model(spec, work_dir, args.quick, args.seed)
        stats = model_stats(path)
        log(f"bench: model {key}: {source}; {stats['params']:,} parameters ({stats['non_embedding']:,} non-embedding)")
        workloads = build_workloads(path, sizes, args.seed, concurrencies)
        calib = build_calibration(path, sizes, args.seed)
        model = ModelRun(key=key, path=str(path), source=source, stats=stats,
                         workloads={n: _workload_info(w, concurrencies) for n, w in workloads.items()})
        run.models.append(model)
        log(f"bench: [{key}] measuring the linear-layer peak per dtype")
        try:
            model.linear_peak = _json_subprocess(["-m", "bench.matmul_peak", "--model", str(path)]
                                                 + (["--quick"] if args.quick else []), 600)
        except (RuntimeError, subprocess.SubprocessError, ValueError) as exc:
            model.linear_peak = {"error": str(exc)[:500]}
        ours_dtype = None if args.dtype == "auto" else args.dtype
        for name in sorted(systems, key=lambda n: n != "ours"):  # ours first: the peers take its dtype
            if name == "ours-fp32" and (ours_dtype or "float32") == "float32":
                model.systems[name] = {"error": "not run: ours already computes in float32"}
                continue
            system = make_system(name, path, work_dir / key,
                                 dtype=args.dtype if name == "ours" and args.dtype != "auto" else
                                 (ours_dtype if name in (*VLLM_SYSTEMS, "ours-vllm") else None))
            log(f"bench: [{key}] starting {name}")
            try:
                system.start()
            except (SystemError_, OSError, RuntimeError, subprocess.SubprocessError) as exc:
                model.systems[name] = {"error": str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)}
                log(f"bench: [{key}] {name} did not start: {model.systems[name]['error']}")
                system.stop()
                continue
            model.systems[name] = dict(system.info)
            if name == "ours":
                ours_dtype = system.info.get("dtype", "float32")
                model.dtype = ours_dtype
                log(f"bench: [{key}] ours computes in {ours_dtype}; the vLLM peers will too")
            try:
                model.cells += run_system(system, workloads, calib, config, system.workloads, log=lambda m: log(m))
            finally:
                system.stop()
        if "ours" in systems and not args.no_profile:
            log(f"bench: [{key}] profiling our runner in-process on long trajectories")
            try:
                model.profile = _json_subprocess(["-m", "bench.profile_ours", "--checkpoint", str(path),
                                                  "--tokens", str(sizes.long_tokens),
                                                  "--sequences", str(sizes.long_requests), "--seed", str(args.seed)],
                                                 600)
            except (RuntimeError, subprocess.SubprocessError, ValueError) as exc:
                model.profile = {"error": str(exc)[:500]}
        if len(run.models) < len(models):  # the report so far: a run stopped later still leaves this model's tables
            run.duration_s, run.load_end = time.monotonic() - started, os.getloadavg()
            write_report(run, args.out, args.json)
            log(f"bench: wrote {args.out} after model {key} ({len(run.models)} of {len(models)})")
    run.duration_s = time.monotonic() - started
    run.load_end = os.getloadavg()
    write_report(run, args.out, args.json)
    log(f"bench: wrote {args.out} ({run.duration_s / 60:.1f} min)")
    return run


def rerender(args) -> None:
    """Rewrite the report from one run's JSON record (figures unchanged), e.g. to add the analysis."""
    from bench.report import from_json, write_report

    run = from_json(json.loads(Path(args.from_json).read_text()))
    if args.analysis:
        run.config["analysis"] = _read(args.analysis)
    write_report(run, args.out)


def cmd_bench(args) -> int:
    if args.from_json:
        rerender(args)
    else:
        run_bench(args)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return cmd_bench(parser.parse_args(argv))
