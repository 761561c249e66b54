"""The evaluation report: results/babyai/README.md (tables, notes, commands, stage times) and PNG plots.

`write_report(summary, out)` takes the summary dict that `envs.evaluate.run_pipeline` builds and writes
`README.md`, `bon.png` (success vs N per method, with 95% Wilson intervals) and `beam.png` (success per
beam setting per method). Plots use matplotlib's Agg backend (no display needed). If `out/analysis.md`
exists it is inlined under "Analysis": the written interpretation of the numbers, kept next to them.
"""

from __future__ import annotations

from pathlib import Path

LABELS = {"agentprm": "AgentPRM", "pvm": "PVM", "orm": "ORM", "mc": "MC (Math-Shepherd)",
          "random": "random choice", "shortest": "shortest trajectory", "oracle": "oracle (any success)",
          "expert": "expert"}
COLORS = {"agentprm": "tab:red", "pvm": "tab:blue", "orm": "tab:green", "mc": "tab:purple",
          "random": "tab:gray", "shortest": "tab:olive", "oracle": "black", "expert": "tab:orange"}


def _cell(r: dict) -> str:
    low, high = r["ci95"]
    return f"{r['rate']:.2f} [{low:.2f}, {high:.2f}]"


def _seconds(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min"


def plot_bon(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = summary["config"]["ns"]
    rows = {m: r["bon"] for m, r in summary["methods"].items()}
    rows["random"] = summary["baselines"]["random"]["bon"]
    rows["shortest"] = summary["baselines"]["shortest"]["bon"]
    rows["oracle"] = summary["baselines"]["oracle"]["bon"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, bon in rows.items():
        rates = [bon[str(n)]["rate"] for n in ns]
        low = [bon[str(n)]["ci95"][0] for n in ns]
        high = [bon[str(n)]["ci95"][1] for n in ns]
        baseline = name in ("random", "shortest", "oracle")
        style = "--" if baseline else "-"
        ax.plot(ns, rates, style, marker="o", ms=4, color=COLORS.get(name), label=LABELS.get(name, name))
        if name == "agentprm":  # one band keeps the plot readable; the table has every interval
            ax.fill_between(ns, low, high, color=COLORS.get(name), alpha=0.1, label="AgentPRM 95% CI")
    expert = summary["baselines"]["expert"]["rate"]
    ax.axhline(expert, color=COLORS["expert"], ls=":", label=f"expert ({expert:.2f})")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("N (trajectories sampled, one picked)")
    ax.set_ylabel("success rate (held-out episodes)")
    ax.set_title(f"BabyAI Best-of-N ({summary['heldout']['episodes']} held-out episodes)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_beam(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = {m: r["beam"] for m, r in summary["methods"].items()}
    rows["random"] = summary["baselines"]["random"]["beam"]
    settings = list(rows["random"].keys())
    width = 0.8 / len(rows)
    x = np.arange(len(settings))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (name, beam) in enumerate(rows.items()):
        rates = np.array([beam[s]["rate"] for s in settings])
        err = np.clip(np.array([[beam[s]["rate"] - beam[s]["ci95"][0] for s in settings],
                                [beam[s]["ci95"][1] - beam[s]["rate"] for s in settings]]), 0, None)  # [2, S]
        ax.bar(x + (i - (len(rows) - 1) / 2) * width, rates, width, yerr=err, capsize=2,
               color=COLORS.get(name), label=LABELS.get(name, name))
    expert = summary["baselines"]["expert"]["rate"]
    ax.axhline(expert, color=COLORS["expert"], ls=":", label=f"expert ({expert:.2f})")
    ax.set_xticks(x, [f"{s} (beams x candidates)" for s in settings])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("success rate (held-out episodes)")
    ax.set_title("BabyAI step-level beam search (95% Wilson intervals)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _bon_table(summary: dict) -> list[str]:
    ns = summary["config"]["ns"]
    head = ["| verifier | labelling env steps | " + " | ".join(f"N={n}" for n in ns) + " |",
            "|---|---:|" + "---:|" * len(ns)]
    rows = [(LABELS.get(m, m), f"{r['labelling_env_steps']:,}", r["bon"]) for m, r in summary["methods"].items()]
    rows.append((LABELS["random"], "0", summary["baselines"]["random"]["bon"]))
    rows.append((LABELS["shortest"], "0", summary["baselines"]["shortest"]["bon"]))
    rows.append((LABELS["oracle"], "n/a", summary["baselines"]["oracle"]["bon"]))
    body = [f"| {name} | {cost} | " + " | ".join(_cell(bon[str(n)]) for n in ns) + " |" for name, cost, bon in rows]
    expert = summary["baselines"]["expert"]
    body.append(f"| {LABELS['expert']} (policy ceiling) | n/a | " + " | ".join(_cell(expert) for _ in ns) + " |")
    return head + body


def _beam_table(summary: dict) -> list[str]:
    rows = {LABELS.get(m, m): r["beam"] for m, r in summary["methods"].items()}
    rows[LABELS["random"]] = summary["baselines"]["random"]["beam"]
    settings = list(summary["baselines"]["random"]["beam"].keys())
    agreement = {LABELS.get(m, m): _cell(r["expert_agreement"]) for m, r in summary["methods"].items()
                 if "expert_agreement" in r}
    agreement[LABELS["random"]] = f"{1 / 6:.2f} (expected)"
    shares = summary["heldout"].get("expert_action_shares") or {}
    if shares:
        action = max(shares, key=shares.get)
        agreement[f"always \"{action}\""] = f"{shares[action]:.2f}"
        rows[f"always \"{action}\""] = None
    head = ["| verifier | " + " | ".join(settings) + " | env steps / episode (" + ", ".join(settings)
            + ") | top action = expert's |", "|---|" + "---:|" * (len(settings) + 2)]
    body = [f"| {name} | " + (" | ".join(_cell(beam[s]) for s in settings) + " | "
                              + ", ".join(f"{beam[s]['mean_env_steps']:.0f}" for s in settings) if beam else
                              " | ".join("-" for _ in settings) + " | -")
            + f" | {agreement.get(name, '-')} |" for name, beam in rows.items()]
    expert = summary["baselines"]["expert"]
    body.append(f"| {LABELS['expert']} (policy ceiling) | " + " | ".join(_cell(expert) for _ in settings)
                + " | - | 1 |")
    return head + body


def _checkpoint_table(summary: dict) -> list[str]:
    lines = ["| method | checkpoint | model | size | val AUC | val Brier | labelling env steps | data env steps |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for m, r in summary["methods"].items():
        val = r.get("val", {})
        auc = f"{val['auc']:.3f}" if isinstance(val.get("auc"), float) else "-"
        brier = f"{val['brier']:.3f}" if isinstance(val.get("brier"), float) else "-"
        lines.append(f"| {LABELS.get(m, m)} | `{r['checkpoint']}` ({r['ref']}) | {r['layers']} layers x "
                     f"{r['hidden']} | {r['bytes'] / 1e6:.1f} MB | {auc} | {brier} | {r['labelling_env_steps']:,} | "
                     f"{r['data_env_steps']:,} |")
    return lines


def render_readme(summary: dict, analysis: str | None = None) -> str:
    cfg, data, held = summary["config"], summary["data"], summary["heldout"]
    d = cfg["data"]
    sampler = held["sampler_success"]
    lines = [
        "# BabyAI: Best-of-N and beam search with AgentPRM, PVM, ORM and MC verifiers",
        "",
        "Made by `agentprm eval run` (envs/evaluate.py); every number below comes from `summary.json` in this "
        "folder. Everything went through the HTTP service and the Python SDK: one `agentprm serve` process per "
        "checkpoint on 127.0.0.1, `/v1/rerank` for Best-of-N and `/v1/beam-expand` for beam search.",
        "",
        "## Setup",
        "",
        f"- Levels: {', '.join(f'`{lv}`' for lv in d['levels'])}.",
        f"- Horizon: episodes end after {d['horizon']} actions (the levels' own limits are 50-64; the expert "
        f"needs about 5-6 and at most 20). Reward 1 on success, else 0.",
        f"- Sampling policy (training data and Best-of-N): noisy expert, epsilon {d['epsilon']} (the expert's "
        f"action with probability {1 - d['epsilon']:.1f}, else a uniformly random one). One sample succeeds "
        f"{_cell(sampler)} of the time on the held-out episodes: outcomes are mixed, so a verifier has "
        "something to choose.",
        f"- Training data: {data['episodes']} trajectories ({d['episodes']} per level, seed {d['seed']}), "
        f"{data['env_steps']:,} environment steps, success rate {data['success_rate']:.2f}, sha256 "
        f"`{data['sha256'][:16]}...`. Every checkpoint below was trained on this same file with the same "
        "settings (`agentprm train`, see Commands).",
        f"- Held-out: {held['episodes']} episodes ({cfg['test_episodes_per_level']} per level) from seed "
        f"base {cfg['test_seed']}, none of whose (level, seed) occurs in the training data. "
        f"{held['seen_initial_states']} of them happen to start from a (mission, first observation) that also "
        "starts a training episode (small rooms repeat across seeds).",
        f"- Best-of-N: {max(cfg['ns'])} trajectories are sampled once per held-out episode; every verifier sees "
        "the same samples, and Best-of-N uses the first N. "
        + ("One `/v1/rerank` per N over the first N candidates." if cfg["rerank_per_n"] else
           f"Each verifier ranks all {max(cfg['ns'])} with one `/v1/rerank` (aggregate `last`: the final step's "
           "promise) and Best-of-N takes the best-ranked among the first N: the same pick as a `/v1/rerank` of "
           "the first N (ranking is stable and a candidate's score does not depend on the others; "
           "tests/envs/test_eval_units.py checks the two agree), at half the scoring work."),
        "- Beam search (`clients.search.beam_search`): B beams kept x K candidates per beam; candidates are the "
        "noisy policy's `propose(K)`: the expert's action first, then other actions in a seeded random order. "
        "`propose` allows at most the 6 valid actions, so the 8x8 setting runs as **8x6** (all actions). A "
        "search ends when B beams have finished; the answer is the finished beam with the highest promise.",
        "- Baselines: **random choice** picks uniformly (Best-of-N: one of the N; beam search: random promises), "
        "**shortest trajectory** picks the one with the fewest steps (a verifier that reads only the length: "
        "under the horizon, success ends an episode early), **oracle** succeeds if any of the N samples does "
        "(the ceiling of any verifier), **expert** is minigrid's BabyAIBot (the ceiling of the policy).",
        "- Processes: every `agentprm train` and `agentprm serve` subprocess runs with `OMP_NUM_THREADS=1` "
        "(`--threads`): on this shared 2-core machine one torch thread was several times faster than two "
        "(training 17.9k vs 2.7k tokens/s; a 64-candidate rerank 0.7 s vs 2-6 s).",
        "- Intervals: 95% Wilson score intervals over held-out episodes. Labelling cost: environment steps "
        "spent to make training labels, from each checkpoint's manifest (`training.labelling.env_steps`); "
        "AgentPRM, PVM and ORM label from the recorded outcomes (0 extra steps), MC rolls out "
        f"{cfg['train']['mc_rollouts']} continuations from every step. All methods share the "
        f"{data['env_steps']:,} steps of the training rollouts themselves.",
        "",
        "## Best-of-N: success rate [95% CI]",
        "",
        *_bon_table(summary),
        "",
        "![Best-of-N](bon.png)",
        "",
        "## Step-level beam search: success rate [95% CI]",
        "",
        *_beam_table(summary),
        "",
        "\"top action = expert's\": at every state of the held-out expert trajectories, how often the verifier "
        "gives the expert's action the highest promise among all 6 actions (a direct check of step-level "
        "discrimination, which beam search needs and Best-of-N does not). The \"always\" row is the constant "
        "guess of the expert's most frequent action.",
        "",
        "![beam search](beam.png)",
        "",
        "## Checkpoints",
        "",
        *_checkpoint_table(summary),
        "",
        "Validation metrics are the trainer's, on held-out initial states of the training file: AUC of the "
        "final-step promise (successes ranked above failures) and its Brier score.",
        "",
    ]
    if analysis:
        lines += ["## Analysis", "", analysis.strip(), ""]
    lines += ["## Commands", "", "From scratch: `make default-checkpoint` (rollouts + the AgentPRM training below, written to "
              "model_store/checkpoints/agentprm-babyai-small/1), then `make eval` (the run below: it retrains the "
              "baselines and re-renders this folder). These ran:", "", "```"]
    lines += summary["commands"]["eval"] or ["agentprm eval run"]
    lines += [c for c in summary["commands"]["train"].values() if c]
    lines += ["```", "", "## Wall time of each stage (this 2-core CPU, shared with other jobs)", "",
              "| stage | wall time |", "|---|---:|"]
    lines += [f"| {name} | {_seconds(s)} |" for name, s in summary["stages_s"].items()]
    total = sum(summary["stages_s"].values())
    lines += [f"| **total** (stages above) | **{_seconds(total)}** |", ""]
    extra = summary.get("notes")
    if extra:
        lines += ["## Notes", "", *extra, ""]
    return "\n".join(lines)


def write_report(summary: dict, out: Path | str) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plot_bon(summary, out / "bon.png")
    plot_beam(summary, out / "beam.png")
    analysis_file = out / "analysis.md"
    analysis = analysis_file.read_text() if analysis_file.is_file() else None
    (out / "README.md").write_text(render_readme(summary, analysis))
