"""The evaluation report: results/babyai/README.md (tables, notes, commands, stage times) and PNG plots.

`write_report(summary, out)` takes what `envs.summary.summarise` returns and writes `README.md`, `bon.png`
(Best-of-N success vs N, standard and hard sampler, mean over training seeds) and `beam.png` (beam-search
success per setting, mean over seeds with the seeds' min-max). Plots use matplotlib's Agg backend. If
`out/analysis.md` exists it is inlined under "Analysis": the written interpretation, kept next to the numbers.
Every cell a method shows is the mean over its training seeds; "[a, b]" after it is the min-max over seeds.
"""

from __future__ import annotations

from pathlib import Path

LABELS = {"agentprm": "AgentPRM", "pvm": "PVM", "orm": "ORM", "mc": "MC (Math-Shepherd)",
          "random": "random scores", "forward": "\"move forward\" first", "shortest": "shortest trajectory",
          "oracle": "oracle (any success)", "sampler": "sampling policy alone", "uniform": "uniform pick",
          "expert": "expert", "cue_rule": "rule: turn toward the named object"}
COLORS = {"agentprm": "tab:red", "pvm": "tab:blue", "orm": "tab:green", "mc": "tab:purple", "random": "tab:gray",
          "forward": "tab:brown", "shortest": "tab:olive", "oracle": "black", "sampler": "tab:cyan",
          "expert": "tab:orange"}
BASELINE_TESTS = {"beam": ("random", "forward", "sampler"), "bon": ("shortest", "random", "sampler"),
                  "top": ("forward", "uniform", "random")}


def _seconds(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min"


def _method_cell(entry: dict | None) -> str:
    if not entry:
        return "-"
    s = entry["seeds"]
    return f"{s['mean']:.2f} [{s['min']:.2f}, {s['max']:.2f}]" if s["n"] > 1 else f"{s['mean']:.2f}"


def _rate_cell(r: dict | None) -> str:
    if not r:
        return "-"
    return f"{r['rate']:.2f} [{r['ci95'][0]:.2f}, {r['ci95'][1]:.2f}]"


def _p(entry: dict | None, name: str) -> str:
    test = (entry or {}).get("paired", {}).get(name)
    if not test:
        return "-"
    return f"{test['diff']:+.2f} (p={test['p']:.3f})"


def _table(summary: dict, figures: list[str], headers: list[str], baselines: tuple[str, ...]) -> list[str]:
    lines = ["| verifier | " + " | ".join(headers) + " |", "|---|" + "---:|" * len(headers)]
    for method, entry in summary["methods"].items():
        lines.append(f"| {LABELS.get(method, method)} | " + " | ".join(_method_cell(entry.get(f)) for f in figures) + " |")
    for name in baselines:
        rates = summary["baseline_rates"].get(name, {})
        if any(f in rates for f in figures):
            lines.append(f"| {LABELS.get(name, name)} | " + " | ".join(_rate_cell(rates.get(f)) for f in figures) + " |")
    return lines


def _tests_table(summary: dict, figures: list[str], against: tuple[str, ...]) -> list[str]:
    others = [m for m in summary["methods"]]
    cols = list(against) + others
    lines = ["| method | figure | " + " | ".join(f"vs {LABELS.get(c, c)}" for c in cols) + " |",
             "|---|---|" + "---:|" * len(cols)]
    for method, entry in summary["methods"].items():
        for f in figures:
            if f in entry:
                lines.append(f"| {LABELS.get(method, method)} | {f} | "
                             + " | ".join("" if c == method else _p(entry[f], c) for c in cols) + " |")
    return lines


def _per_level(summary: dict, method: str, figures: list[str]) -> list[str]:
    entry = summary["methods"].get(method)
    if not entry:
        return []
    levels = sorted({lv for f in figures if f in entry for lv in entry[f]["per_level"]})
    lines = ["| level | " + " | ".join(figures) + " |", "|---|" + "---:|" * len(figures)]
    for level in levels:
        cells = []
        for f in figures:
            r = entry.get(f, {}).get("per_level", {}).get(level)
            cells.append(f"{r['rate']:.2f} (n={r['n']})" if r else "-")
        lines.append(f"| `{level}` | " + " | ".join(cells) + " |")
    return lines


def _checkpoints(summary: dict) -> list[str]:
    lines = ["| method | seed | model | val AUC | val Brier | best step / steps | labelling env steps | checkpoint |",
             "|---|---:|---|---:|---:|---:|---:|---|"]
    for r in summary["runs"]:
        val = r.get("val", {})
        auc = f"{val['auc']:.3f}" if isinstance(val.get("auc"), float) else "-"
        brier = f"{val['brier']:.3f}" if isinstance(val.get("brier"), float) else "-"
        lines.append(f"| {LABELS.get(r['method'], r['method'])} | {r['seed']} | {r['layers']}x{r['hidden']}, "
                     f"{r['bytes'] / 1e6:.1f} MB | {auc} | {brier} | {r.get('best_step')} / {r.get('train_steps')} | "
                     f"{r['labelling_env_steps']:,} | `{r['checkpoint']}` |")
    return lines


def _plots(summary: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    ns = [n for n in summary["config"]["ns"] if f"bon@{n}" in next(iter(summary["methods"].values()), {})]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, kind, title in ((axes[0], "bon", "standard sampler"), (axes[1], "bon_hard", "hard sampler")):
        for method, entry in summary["methods"].items():
            ax.plot(ns, [entry[f"{kind}@{n}"]["seeds"]["mean"] for n in ns], "-o", ms=4, color=COLORS.get(method),
                    label=LABELS.get(method, method))
        for name in ("shortest", "random", "oracle"):
            rates = summary["baseline_rates"].get(name, {})
            if all(f"{kind}@{n}" in rates for n in ns):
                ax.plot(ns, [rates[f"{kind}@{n}"]["rate"] for n in ns], "--", color=COLORS.get(name),
                        label=LABELS.get(name, name))
        ax.set_xscale("log", base=2)
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.set_xlabel("N")
        ax.set_title(f"Best-of-N, {title}")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("success rate (held-out levels)")
    axes[1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "bon.png", dpi=110)
    plt.close(fig)

    settings = [f"{b}x{k}" for b, k in summary["config"]["beams"]]
    rows = {m: [e.get(f"beam {s}", {}).get("seeds", {}) for s in settings] for m, e in summary["methods"].items()}
    for name in ("random", "forward", "sampler"):
        rates = summary["baseline_rates"].get(name, {})
        rows[name] = [{"mean": rates[f"beam {s}"]["rate"], "min": rates[f"beam {s}"]["rate"],
                       "max": rates[f"beam {s}"]["rate"]} if f"beam {s}" in rates else {} for s in settings]
    width = 0.8 / len(rows)
    x = np.arange(len(settings))
    fig, ax = plt.subplots(figsize=(8, 4.2))
    for i, (name, cells) in enumerate(rows.items()):
        mean = np.array([c.get("mean", 0.0) for c in cells])
        err = np.array([[c.get("mean", 0) - c.get("min", 0) for c in cells], [c.get("max", 0) - c.get("mean", 0)
                                                                              for c in cells]])
        ax.bar(x + (i - (len(rows) - 1) / 2) * width, mean, width, yerr=np.clip(err, 0, None), capsize=2,
               color=COLORS.get(name), label=LABELS.get(name, name))
    ax.set_xticks(x, [f"{s} (beams x samples)" for s in settings])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("success rate (held-out levels)")
    ax.set_title("Step-level beam search (mean over training seeds; bars: min-max)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(out / "beam.png", dpi=110)
    plt.close(fig)


def render_readme(summary: dict, analysis: str | None = None) -> str:
    cfg, data, test = summary["config"], summary["data"], summary["test"]
    d, t, tr = cfg["data"], cfg["test"], cfg["train"]
    settings = [f"beam {b}x{k}" for b, k in cfg["beams"]]
    step_figures = ["top_optimal", "top_expert", "turn_direction"] + (["turn_cued"] if "cued_levels" in test else [])
    step_headers = ["top action is optimal", "top action is the expert's", "the optimal turn above the other",
                    "the same, target in view"][:len(step_figures)]
    ns = [n for n in cfg["ns"] if n <= t["n_max"]]
    seeds_text = (f"seeds {', '.join(map(str, t['seeds']))} on every level" if t["seeds"]
                  else f"{t['episodes']} per level from seed base {t['seed_base']}")
    lines = [
        "# BabyAI: step-level discrimination, beam search and Best-of-N on held-out levels",
        "",
        "Made by `agentprm eval run` (envs/pipeline.py); every number below comes from `summary.json` in this "
        "folder, which also keeps every per-episode record. Every verifier was queried through the HTTP "
        "service and the Python SDK (one `agentprm serve` per checkpoint on 127.0.0.1).",
        "",
        "## Setup",
        "",
        f"- Training levels: {', '.join(f'`{lv}`' for lv in d['levels'])}; {d['episodes']} episodes each, noisy "
        f"expert with epsilon cycling through {', '.join(map(str, d['epsilons']))}; horizon {d['horizon']}. "
        f"{data['episodes']} trajectories, {data['env_steps']:,} environment steps, success {data['success_rate']:.2f}, "
        f"sha256 `{data['sha256'][:16]}...`.",
        f"- Test levels (never trained on): {', '.join(f'`{lv}`' for lv in t['levels'])}; "
        f"{len(test['episodes'])} episodes ({seeds_text}).",
        f"- Training: every method with the same `agentprm train` settings ({tr['layers']} layers x {tr['hidden']}, "
        f"{tr['epochs']} epochs, gamma {tr['gamma']}), seeds {', '.join(map(str, tr['seeds']))}. A method's cell is "
        "the mean over its seeds, with the seeds' [min, max]; baselines show a 95% Wilson interval.",
        f"- Step-level check: {test['states']} states of the expert's test trajectories where not every action is "
        "equally good. An action is *optimal* if the expert, playing on after it, succeeds in the fewest steps "
        "(several often tie). Each verifier scores all six actions at each state (`/v1/beam-expand`). \"The "
        f"optimal turn above the other\": at the {len(test.get('turn_levels', []))} of those states where exactly "
        "one of the two turns is optimal, is it scored strictly above the other turn (a coin flip gets 0.5; a "
        "model that scores an action by the state's value plus a bias for the action, blind to where the "
        "target lies, cannot beat it)." + (" \"Target in view\": the "
        f"{len(test['cued_levels'])} of those where the object the task names is in view on one side only, "
        "so the observation itself says which turn is right (`envs.babyai.target_side`); the rule \"turn toward "
        "the named object\" shows how often that reading is the optimal turn." if "cued_levels" in test else ""),
        f"- Beam search: B beams x K candidates *sampled* from the sampling policy (noisy expert, epsilon "
        f"{t['sample_epsilon']}), duplicates merged; the best B (beam, candidate) pairs by promise survive; the "
        "answer is the finished beam with the highest promise.",
        f"- Best-of-N: {t['n_max']} samples per test episode from the sampling policy (one succeeds "
        f"{test['sampler_success']:.2f} of the time) and from a harder one (epsilon {t['hard_epsilon']}: "
        f"{test['hard_sampler_success']:.2f}); `/v1/rerank` with aggregate `last`.",
        "- Paired tests: sign-flip permutation tests on the per-episode (per-state) outcomes, the method's "
        "averaged over its seeds, against each baseline on the same episodes; a cell reads \"difference of "
        "means (p)\".",
        "",
        "## Step-level discrimination on held-out levels",
        "",
        *_table(summary, step_figures, step_headers, ("forward", "uniform", "random", "cue_rule")),
        "",
        *_tests_table(summary, [f for f in step_figures if f != "top_expert"], ("forward", "uniform", "random")),
        "",
        "## Step-level beam search",
        "",
        *_table(summary, settings, [s.replace("beam ", "") for s in settings], ("random", "forward", "sampler")),
        "",
        *_tests_table(summary, settings, ("random", "forward", "sampler")),
        "",
        "![beam search](beam.png)",
        "",
        "## Best-of-N",
        "",
        "Standard sampler:",
        "",
        *_table(summary, [f"bon@{n}" for n in ns], [f"N={n}" for n in ns], ("shortest", "random", "oracle", "sampler")),
        "",
        "Hard sampler:",
        "",
        *_table(summary, [f"bon_hard@{n}" for n in ns], [f"N={n}" for n in ns],
                ("shortest", "random", "oracle", "sampler")),
        "",
        *_tests_table(summary, [f"bon_hard@{n}" for n in ns if n >= 8], ("shortest", "random")),
        "",
        "![Best-of-N](bon.png)",
        "",
        "## AgentPRM per level",
        "",
        *_per_level(summary, "agentprm", ["top_optimal", *settings, f"bon_hard@{max(ns)}"]),
        "",
        "## Checkpoints",
        "",
        *_checkpoints(summary),
        "",
    ]
    if analysis:
        lines += ["## Analysis", "", analysis.strip(), ""]
    lines += ["## Commands", "", "```", *(summary["commands"]["eval"] or ["agentprm eval run"]),
              *summary["commands"]["train"], "```", "", "## Wall time of each stage (2-core CPU, shared)", "",
              "| stage | wall time |", "|---|---:|"]
    lines += [f"| {name} | {_seconds(s)} |" for name, s in summary["stages_s"].items()]
    lines += [f"| **total** | **{_seconds(sum(summary['stages_s'].values()))}** |", ""]
    reused = [f"{r['method']} seed {r['seed']}" for r in summary["runs"] if r.get("reused")]
    if reused:
        lines += [f"Not trained in this run (reused checkpoints, trained earlier or given with `--checkpoint`, so their "
                  f"training time is not above): {', '.join(reused)}.", ""]
    return "\n".join(lines)


def write_report(summary: dict, out: Path | str) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _plots(summary, out)
    analysis_file = out / "analysis.md"
    analysis = analysis_file.read_text() if analysis_file.is_file() else None
    (out / "README.md").write_text(render_readme(summary, analysis))
