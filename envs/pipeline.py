"""The BabyAI evaluation pipeline: rollouts -> training (every method, several seeds) -> held-out test set ->
one `agentprm serve` per checkpoint -> Best-of-N, beam search and the step-level check -> summary and report.

Contract:
- Everything a verifier is judged on goes through the HTTP service and the SDK (`served` runs
  `python -m service.cli serve` of this source tree on 127.0.0.1 and a free port through
  `clients.local_server`; without a model it serves the shipped default).
- `TrainConfig` holds the `agentprm train` settings every method shares (the comparison is fair); each method
  is trained once per seed in `seeds`. A given checkpoint (`--checkpoint METHOD=DIR`) replaces the first
  seed's training after checking it was trained on the same rollouts. A checkpoint already in the work folder
  that the same command trained on the same data (`trained_before`) is reused, so an interrupted run or one
  that adds methods or seeds picks up where the last one stopped (`--retrain` trains everything again).
- The summary keeps per-episode outcomes of every run, so per-level tables, means and spreads over seeds,
  and paired tests against every baseline are all computed from the same records (`envs.summary`).
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from envs.evaluate import (CappedBabyAIEnv, DataConfig, HeldoutConfig, collect, expert_test_states, heldout_episodes,
                           heldout_set)
from model_store.manifest import sha256_file

REPO = Path(__file__).resolve().parents[1]
METHODS = ("agentprm", "pvm", "orm", "mc")
BON_NS = (1, 2, 4, 8, 16)
BEAMS = ((2, 4), (4, 4), (8, 8))
DEFAULT_NAME = "agentprm-babyai-small"


def thread_env(threads: int) -> dict[str, str]:
    """OpenMP/torch threads of the train and serve subprocesses (one is fastest for these small models on a
    shared 2-core CPU: two spinning OpenMP threads stall whenever another process holds a core)."""
    return {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def served(checkpoint: Path | str | None = None, log: Path | None = None, threads: int = 1):
    """`agentprm serve [--model CKPT]` of this tree on 127.0.0.1 (the shipped default without a checkpoint),
    for a `with` block; `.url` is its address."""
    from clients.local_server import local_server

    return local_server(checkpoint, env=thread_env(threads), log_path=log, ready_timeout_s=300.0)


# -- training ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TrainConfig:
    """The `agentprm train` settings shared by every method (so the comparison is fair)."""

    layers: int = 2
    hidden: int = 64
    epochs: int = 8
    lr: float | None = None  # None: the trainer's default
    batch_size: int = 32
    max_seq_len: int = 2048
    gamma: float = 0.9
    seeds: tuple[int, ...] = (0, 1, 2)
    mc_rollouts: int = 4
    workers: int = 1
    threads: int = 1  # OMP_NUM_THREADS of the train and serve subprocesses (see thread_env)

    def command(self, method: str, data: Path | str, out: Path | str, seed: int, name: str | None = None
                ) -> list[str]:
        cmd = ["agentprm", "train", "--data", str(data), "--method", method, "--out", str(out),
               "--layers", str(self.layers), "--hidden", str(self.hidden), "--epochs", str(self.epochs),
               "--batch-size", str(self.batch_size), "--max-seq-len", str(self.max_seq_len),
               "--gamma", str(self.gamma), "--seed", str(seed), "--overwrite"]
        if self.lr is not None:
            cmd += ["--lr", str(self.lr)]
        if name:
            cmd += ["--name", name]
        if method == "mc":
            cmd += ["--mc-rollouts", str(self.mc_rollouts), "--mc-env", "envs.evaluate:env_from_meta",
                    "--mc-policy", "data", "--workers", str(self.workers)]
        return cmd


def train(method: str, data: Path | str, out: Path | str, config: TrainConfig, seed: int, name: str | None = None,
          progress: bool = True) -> str:
    """Run `agentprm train` (this tree's `python -m service.cli train`); the command line as a user types it."""
    cmd = config.command(method, data, out, seed, name)
    run = [sys.executable, "-m", "service.cli", *cmd[1:]] + ([] if progress else ["--no-progress"])
    subprocess.run(run, cwd=REPO, check=True, env={**os.environ, **thread_env(config.threads)})
    return shlex.join(cmd)


def manifest_of(checkpoint: Path | str) -> dict:
    return json.loads((Path(checkpoint) / "manifest.json").read_text())


def check_trained_on(checkpoint: Path | str, data: Path | str) -> None:
    """ValueError unless `checkpoint` was trained on exactly the file `data` (sha256 in its manifest)."""
    recorded = manifest_of(checkpoint).get("training", {}).get("data", {}).get("sha256")
    actual = sha256_file(Path(data))
    if recorded != actual:
        raise ValueError(f"{checkpoint} was trained on data with sha256 {recorded}, not on {data} ({actual}); "
                         "rebuild it from the same rollouts (make default-checkpoint) or leave it out")


def trained_before(checkpoint: Path | str, data: Path | str, command: list[str]) -> bool:
    """True if `checkpoint` is a complete, verified checkpoint that `command` trained on exactly `data`: an
    interrupted or extended evaluation reuses it instead of training it again."""
    from model_store.store import verify_checkpoint

    if not (Path(checkpoint) / "manifest.json").is_file():
        return False
    recorded = manifest_of(checkpoint).get("training", {}).get("command") or ""
    if [t for t in shlex.split(recorded) if t != "--no-progress"] != command:
        return False
    try:
        check_trained_on(checkpoint, data)
        verify_checkpoint(checkpoint)
    except Exception:  # any doubt (other data, a damaged file): train again
        return False
    return True


def checkpoint_facts(checkpoint: Path | str) -> dict:
    """What the report needs from a manifest: method, labelling cost, validation metrics, size."""
    m = manifest_of(checkpoint)
    training = m.get("training", {})
    labelling = training.get("labelling") or {}
    data = training.get("data") or {}
    metrics = training.get("metrics") or {}
    config = m.get("backbone", {}).get("config", {})
    size = sum(p.stat().st_size for p in Path(checkpoint).rglob("*") if p.is_file())
    return {"checkpoint": str(checkpoint), "ref": f"{m.get('name')}:{m.get('version')}",
            "method": training.get("method"), "command": training.get("command"), "gamma": training.get("gamma"),
            "labelling_env_steps": labelling.get("env_steps", 0), "data_env_steps": data.get("n_steps"),
            "data_sha256": data.get("sha256"),
            "val": {k: metrics.get(k) for k in ("auc", "brier", "loss") if k in metrics},
            "train_steps": metrics.get("train_steps"), "best_step": metrics.get("step"),
            "tokens_per_s": metrics.get("tokens_per_s"), "train_tokens": metrics.get("train_tokens"),
            "layers": config.get("num_hidden_layers"), "hidden": config.get("hidden_size"), "bytes": size}


# -- the pipeline ---------------------------------------------------------------------------------------------

@dataclass
class EvalConfig:
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    test: HeldoutConfig = field(default_factory=HeldoutConfig)
    methods: tuple[str, ...] = METHODS
    checkpoints: dict[str, str] = field(default_factory=dict)  # method -> existing checkpoint (its first seed)
    ns: tuple[int, ...] = BON_NS
    beams: tuple[tuple[int, int], ...] = BEAMS
    work: str = ".cache/babyai-eval"
    out: str = "results/babyai"
    progress: bool = True
    retrain: bool = False  # False: a checkpoint in work/ trained by the same command on the same data is reused


def evaluate_chooser(chooser, test: dict, config: EvalConfig, name: str, chooser_for_episode=None) -> dict:
    """Every per-episode record of one verifier (a served checkpoint or a baseline chooser)."""
    from envs.policies import NoisyExpertPolicy
    from envs.verifiers import evaluate_beam, evaluate_bon, step_discrimination

    ns = tuple(n for n in config.ns if n <= config.test.n_max)
    policy = NoisyExpertPolicy(config.test.sample_epsilon, 0)
    horizon = config.test.horizon
    return {
        "bon": evaluate_bon(chooser, test["samples"], ns, desc=f"{name} best-of-n", progress=config.progress),
        "bon_hard": evaluate_bon(chooser, test["hard"], ns, desc=f"{name} best-of-n hard", progress=config.progress),
        "beam": evaluate_beam(chooser_for_episode or (lambda seed: chooser), lambda level: CappedBabyAIEnv(level, horizon),
                              policy, test["episodes"], config.beams, desc=f"{name} beam", progress=config.progress),
        "steps": step_discrimination(chooser, test["states"]),
    }


def run_pipeline(config: EvalConfig, command: str = "") -> dict:
    """Every stage of the evaluation; writes the report to `config.out` and returns the summary."""
    from clients.sdk import PRMClient
    from envs.report import write_report
    from envs.summary import summarise
    from envs.verifiers import (ForwardChooser, RandomChooser, cue_rule_turns, cued_turn_states, oracle_bon,
                                 shortest_bon, turn_states)
    from envs.base import derive_seed

    work, out = Path(config.work), Path(config.out)
    work.mkdir(parents=True, exist_ok=True)
    stages: dict[str, float] = {}

    def timed(name: str, fn, *args, **kwargs):
        start = time.perf_counter()
        print(f"== {name}", flush=True)
        value = fn(*args, **kwargs)
        stages[name] = round(time.perf_counter() - start, 1)
        return value

    data_file = work / "train.jsonl"
    data_summary = timed("data: training rollouts", collect, config.data, data_file, config.progress)
    runs: list[dict] = []  # one per (method, seed)
    for method in config.methods:
        for i, seed in enumerate(config.train.seeds):
            given = config.checkpoints.get(method) if i == 0 else None
            if given:
                check_trained_on(given, data_file)
                runs.append({"method": method, "seed": seed, "checkpoint": given, "reused": True})
                continue
            ckpt = work / "checkpoints" / f"{method}-seed{seed}"
            if not config.retrain and trained_before(ckpt, data_file,
                                                     config.train.command(method, data_file, ckpt, seed)):
                print(f"== train: {method} seed {seed}: reusing {ckpt} (same command, same data; --retrain to "
                      "train again)", flush=True)
                runs.append({"method": method, "seed": seed, "checkpoint": str(ckpt), "reused": True})
                continue
            timed(f"train: {method} seed {seed}", train, method, data_file, ckpt, config.train, seed, None,
                  config.progress)
            runs.append({"method": method, "seed": seed, "checkpoint": str(ckpt), "reused": False})
    test = timed("test set: samples, expert, optimal actions", heldout_set, config.test, data_file, config.progress)
    for run in runs:
        def evaluate(run=run):
            with served(run["checkpoint"], work / f"serve-{run['method']}-{run['seed']}.log",
                        config.train.threads) as server, PRMClient(server.url, timeout=300.0) as prm:
                return evaluate_chooser(prm, test, config, f"{run['method']}/{run['seed']}")

        run.update(checkpoint_facts(run["checkpoint"]))
        run["records"] = timed(f"evaluate: {run['method']} seed {run['seed']}", evaluate)

    def baselines():
        ns = tuple(n for n in config.ns if n <= config.test.n_max)
        out_ = {}
        for name, cls in (("random", RandomChooser), ("forward", ForwardChooser)):
            chooser = cls(derive_seed(name, config.test.seed_base))
            out_[name] = evaluate_chooser(chooser, test, config, name,
                                          lambda seed, cls=cls, name=name: cls(derive_seed(name, "beam", seed)))
        out_["shortest"] = {"bon": shortest_bon(test["samples"], ns), "bon_hard": shortest_bon(test["hard"], ns)}
        out_["oracle"] = {"bon": oracle_bon(test["samples"], ns), "bon_hard": oracle_bon(test["hard"], ns)}
        out_["sampler"] = {"bon": {"1": [int(s[0]["reward"] > 0) for s in test["samples"]]},
                           "bon_hard": {"1": [int(s[0]["reward"] > 0) for s in test["hard"]]}}
        out_["expert"] = {"success": [int(t["reward"] > 0) for t in test["expert"]]}
        return out_

    baseline_records = timed("evaluate: baselines (random, forward, shortest, oracle, sampler, expert)", baselines)
    records = {
        "config": {"data": asdict(config.data), "train": asdict(config.train), "test": asdict(config.test),
                   "methods": list(config.methods), "ns": list(config.ns), "beams": [list(b) for b in config.beams]},
        "data": {**data_summary, "sha256": sha256_file(data_file)},
        "test": {"episodes": [list(e) for e in test["episodes"]],
                 "levels": [level for level, _ in test["episodes"]],
                 "state_levels": [s["level"] for s in test["states"]],
                 "turn_levels": [test["states"][i]["level"] for i in turn_states(test["states"])],
                 "cued_levels": [test["states"][i]["level"] for i in cued_turn_states(test["states"])],
                 "cue_rule": cue_rule_turns(test["states"]),
                 "states": len(test["states"]),
                 "optimal_sizes": [len(s["optimal"]) for s in test["states"]],
                 "forward_optimal": [int("move forward" in s["optimal"]) for s in test["states"]],
                 "forward_expert": [int(s["expert"] == "move forward") for s in test["states"]],
                 "sampler_success": _share(s[0]["reward"] > 0 for s in test["samples"]),
                 "hard_sampler_success": _share(s[0]["reward"] > 0 for s in test["hard"])},
        "runs": runs,
        "baselines": baseline_records,
        "commands": {"eval": [command] if command else [],
                     "train": sorted({r["command"] for r in runs if r.get("command")})},
        "stages_s": stages,
    }
    summary = summarise(records)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    write_report(summary, out)
    return summary


def step_check(checkpoint: Path | str, test: HeldoutConfig, threads: int = 2) -> dict:
    """The step-level check alone, for one checkpoint (`agentprm eval steps`): on the expert's states of the
    held-out episodes, each figure of `step_discrimination` as a rate with its 95% interval, beside the
    constant "move forward", a uniform pick (a coin flip between the turns) and the rule "turn toward the named
    object". Serves the checkpoint on 127.0.0.1 like `run_pipeline`; a minute or two on a 2-core CPU."""
    from clients.sdk import PRMClient
    from envs.stats import rate
    from envs.verifiers import cue_rule_turns, discrimination_baselines, step_discrimination, turn_states

    _, states = expert_test_states(test, heldout_episodes(test, None))
    with served(checkpoint, None, threads) as server, PRMClient(server.url, timeout=300.0) as prm:
        found = step_discrimination(prm, states)
    base = discrimination_baselines(states)
    figures = ("top_optimal", "top_expert", "turn_direction", "turn_cued")
    return {
        "checkpoint": str(checkpoint), "levels": list(test.levels), "states": len(states),
        "turn_states": len(turn_states(states)), "cued_states": len(found["turn_cued"]),
        "rates": {f: rate(found[f]) for f in figures},
        "baselines": {'"move forward" first': {"top_optimal": base["forward_optimal"],
                                               "top_expert": base["forward_expert"]},
                      "uniform pick": {"top_optimal": base["uniform_optimal"], "top_expert": base["uniform_expert"],
                                       "turn_direction": 0.5, "turn_cued": 0.5},
                      "rule: turn toward the named object": {"turn_cued": rate(cue_rule_turns(states))["rate"]}},
    }


def _share(flags) -> float:
    flags = [bool(f) for f in flags]
    return sum(flags) / len(flags) if flags else float("nan")


def default_checkpoint(out: Path | str, data: DataConfig, train_config: TrainConfig, work: Path | str,
                       progress: bool = True) -> dict:
    """The shipped checkpoint: training rollouts -> `agentprm train --method agentprm` (first seed) -> `out`."""
    data_file = Path(work) / "train.jsonl"
    start = time.perf_counter()
    summary = collect(data, data_file, progress)
    rollout_s = time.perf_counter() - start
    start = time.perf_counter()
    command = train("agentprm", data_file, out, train_config, train_config.seeds[0], DEFAULT_NAME, progress)
    return {"data": summary, "train_command": command, "rollout_s": round(rollout_s, 1),
            "train_s": round(time.perf_counter() - start, 1), **checkpoint_facts(out)}
