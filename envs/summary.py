"""From per-episode records to the figures of the report: rates, means and spreads over training seeds,
per-level tables and paired tests against every baseline.

`summarise(records)` takes what `envs.pipeline.run_pipeline` collected (per run: `records` = {"bon": {N:
[0/1 per episode]}, "bon_hard": ..., "beam": {"BxK": {"outcomes": [...], ...}}, "steps": {"top_optimal":
[0/1 per state], "top_expert": [...]}}; baselines in the same shape) and adds:
- `runs[i]["rates"]`: every figure of that run as a rate with its 95% interval;
- `methods[m]`: for every figure, the spread over the method's seeds (mean, min, max, std), the per-episode
  mean over seeds, its per-level table, and paired tests (`envs.stats.paired_test`) against each baseline
  and each other method on the same episodes (p-value and the difference of means).
The records stay in the summary, so the report can be re-rendered without re-running anything.
"""

from __future__ import annotations

from envs.stats import mean_over_seeds, paired_test, per_level, rate, spread


def _figures(records: dict) -> dict[str, list[float]]:
    """Flatten a verifier's records into {figure name: per-item outcomes}."""
    out: dict[str, list[float]] = {}
    for n, outcomes in records.get("bon", {}).items():
        out[f"bon@{n}"] = outcomes
    for n, outcomes in records.get("bon_hard", {}).items():
        out[f"bon_hard@{n}"] = outcomes
    for setting, record in records.get("beam", {}).items():
        out[f"beam {setting}"] = record["outcomes"]
    for key in STEP_FIGURES:
        if records.get("steps", {}).get(key):  # none when no test state has exactly one optimal turn
            out[key] = records["steps"][key]
    if "success" in records:
        out["success"] = records["success"]
    return out


STEP_FIGURES = ("top_optimal", "top_expert", "turn_direction", "turn_cued")


def _levels_for(figure: str, records: dict) -> list[str]:
    test = records["test"]
    if figure == "turn_direction":
        return test["turn_levels"]
    if figure == "turn_cued":
        return test["cued_levels"]
    return test["state_levels"] if figure in STEP_FIGURES else test["levels"]


def baseline_figures(records: dict) -> dict[str, dict[str, list[float]]]:
    """{baseline: {figure: outcomes}}; the sampler's single sample also stands for beam search's
    "sampling policy alone" and the constant/uniform step guesses come from the test states."""
    out = {name: _figures(rec) for name, rec in records["baselines"].items()}
    sampler = out.setdefault("sampler", {})
    for setting in records["config"]["beams"]:
        sampler[f"beam {setting[0]}x{setting[1]}"] = sampler.get("bon@1", [])
    test = records["test"]
    out.setdefault("forward", {}).update(top_optimal=test["forward_optimal"], top_expert=test["forward_expert"])
    out["uniform"] = {"top_optimal": [k / 6 for k in test["optimal_sizes"]],
                      "top_expert": [1 / 6] * len(test["optimal_sizes"])}
    if test.get("turn_levels"):  # a coin flip between the two turns
        out["uniform"]["turn_direction"] = [0.5] * len(test["turn_levels"])
    if test.get("cued_levels"):  # the coin flip, and the rule "turn toward the named object"
        out["uniform"]["turn_cued"] = [0.5] * len(test["cued_levels"])
        out.setdefault("cue_rule", {})["turn_cued"] = test["cue_rule"]
    return out


def summarise(records: dict) -> dict:
    summary = dict(records)
    by_method: dict[str, list[dict]] = {}
    for run in records["runs"]:
        figures = _figures(run["records"])
        run["rates"] = {name: rate(values) for name, values in figures.items()}
        by_method.setdefault(run["method"], []).append(figures)
    baselines = baseline_figures(records)
    summary["baseline_rates"] = {name: {f: rate(v) for f, v in figs.items() if v}
                                 for name, figs in baselines.items()}
    means = {m: {f: mean_over_seeds([figs[f] for figs in runs]) for f in runs[0]} for m, runs in by_method.items()}
    methods = {}
    for method, runs in by_method.items():
        entry = {}
        for figure in runs[0]:
            per_episode = means[method][figure]
            tests = {}
            for name, figs in {**baselines, **{m: v for m, v in means.items() if m != method}}.items():
                other = figs.get(figure)
                if other and len(other) == len(per_episode):
                    tests[name] = {"p": paired_test(per_episode, other),
                                   "diff": sum(per_episode) / len(per_episode) - sum(other) / len(other)}
            entry[figure] = {"seeds": spread([sum(figs[figure]) / len(figs[figure]) for figs in runs]),
                             "pooled": rate(per_episode), "per_level": per_level(_levels_for(figure, records),
                                                                                 per_episode),
                             "paired": tests}
        methods[method] = entry
    summary["methods"] = methods
    return summary
