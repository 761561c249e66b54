"""BabyAI evaluation of PRM checkpoints through the HTTP service: Best-of-N and step-level beam search.

Contract:
- Episodes are capped at a horizon (`DataConfig.horizon`, default 24 steps; the levels' own limits are 50-64,
  the expert needs 5-6 and at most 20): `CappedBabyAIEnv`. Without the cap a failing noisy episode runs 64
  steps (~2,600 tokens), which puts Best-of-64 over four checkpoints far beyond a 2-core CPU; with it,
  failing means "not done in 24 steps", so a wasted step has a cost a PRM can see. Training data,
  MC-labelling rollouts (`--mc-env envs.evaluate:env_from_meta`), held-out samples and beam search all use
  the same cap (recorded in meta.horizon).
- Sampling policy (training data and Best-of-N): the noisy expert with epsilon 0.7, which under the cap
  succeeds about 65% of the time, so outcomes are mixed (a PRM can only help when the sampler fails
  sometimes) and a perfect verifier would reach ~100% by N = 4-8. Beam-search candidates come from the same
  policy's `propose(k)` (the expert's action first, then the others in a seeded random order); `propose`
  allows k <= 6 (the valid actions), so "8x8" runs as 8 beams x 6 candidates and is labelled 8x6.
- Held-out episodes use seeds from another base seed than the training rollouts, and any (level, seed)
  that occurs in the training file is skipped, so test seeds are disjoint from training seeds.
- Best-of-N: `n_max` trajectories are sampled per held-out episode once (sample j re-seeds the policy with
  (episode seed, j)); every checkpoint scores the same samples. Default: one /v1/rerank over all n_max
  candidates per episode, and Best-of-N picks the best-ranked among the first N (the server's ranking is
  stable and a candidate's score does not depend on the others, so this is the answer /v1/rerank gives for
  the first N; `rerank_per_n=True` sends one /v1/rerank per N instead, and the tests check both agree).
- Baselines: random choice (uniform among the N, seeded), oracle (success if any of the N succeeds: the
  ceiling of any verifier) and the expert (the ceiling of the policy). Success rates carry 95% Wilson
  intervals.
- `run_pipeline` runs the stages data -> train (one `agentprm train` per method, or a given checkpoint
  after checking it was trained on the same file) -> sample -> evaluate (one `agentprm serve` subprocess
  per checkpoint on 127.0.0.1, a free port, stopped afterwards) -> report, timing each stage.
"""

from __future__ import annotations

import json
import math
import os
import random
import shlex
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace

from envs.babyai import ACTIONS, DEFAULT_LEVELS, BabyAITextEnv
from envs.base import Policy, derive_seed, run_episode
from envs.policies import make_policy
from envs.rollout import episode_seed
from model_store.manifest import sha256_file

REPO = Path(__file__).resolve().parents[1]
METHODS = ("agentprm", "pvm", "orm", "mc")
BON_NS = (1, 2, 4, 8, 16, 32, 64)
BEAMS = ((2, 2), (4, 4), (8, 8))
DEFAULT_NAME = "agentprm-babyai-small"


# -- environment and data ------------------------------------------------------------------------------------

class CappedBabyAIEnv(BabyAITextEnv):
    """A BabyAI level whose episodes end after min(level limit, horizon) actions."""

    def __init__(self, level: str, horizon: int | None = None) -> None:
        super().__init__(level)
        self.horizon = int(horizon) if horizon else None

    def _reset(self, seed: int) -> tuple[str, str, int]:
        task, observation, limit = super()._reset(seed)
        return task, observation, min(limit, self.horizon) if self.horizon else limit

    def meta(self) -> dict:
        return {**super().meta(), "horizon": self.horizon}


def env_from_meta(meta: dict) -> CappedBabyAIEnv:
    """The environment of a trajectory's meta (for `agentprm train --mc-env envs.evaluate:env_from_meta`)."""
    return CappedBabyAIEnv(meta["level"], meta.get("horizon"))


@dataclass(frozen=True)
class DataConfig:
    levels: tuple[str, ...] = DEFAULT_LEVELS
    episodes: int = 100  # per level
    policy: str = "noisy"
    epsilon: float = 0.7
    horizon: int = 24
    seed: int = 0


def play(env: CappedBabyAIEnv, policy: Policy, seed: int, policy_seed: int, extra: dict | None = None) -> dict:
    """One episode of `seed` with the policy re-seeded by `policy_seed`; a trajectory in the JSONL format."""
    return run_episode(env, policy, seed, policy_seed, extra)


def _write_jsonl(rows, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "w") as handle:
        for row in rows:
            handle.write(json.dumps(row, separators=(",", ":")) + "\n")
    os.replace(tmp, path)


def read_jsonl(path: Path | str) -> list[dict]:
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def collect(config: DataConfig, out: Path | str, progress: bool = True) -> dict:
    """Training rollouts: episode i of each level from `episode_seed(config.seed, i)` (as `agentprm rollout`
    does), capped at the horizon, written to `out`; a summary."""
    from tqdm import tqdm

    policy = make_policy(config.policy, config.epsilon, config.seed)
    start = time.perf_counter()
    rows = []
    with tqdm(total=config.episodes * len(config.levels), unit="ep", desc="rollout", disable=not progress) as bar:
        for level in config.levels:
            env = CappedBabyAIEnv(level, config.horizon)
            for i in range(config.episodes):
                seed = episode_seed(config.seed, i)
                rows.append(play(env, policy, seed, seed))
                bar.update(1)
    _write_jsonl(rows, Path(out))
    return {"out": str(out), "episodes": len(rows), "seconds": round(time.perf_counter() - start, 2),
            "env_steps": sum(len(r["steps"]) for r in rows), "success_rate": round(_mean(r["reward"] for r in rows), 4),
            "mean_length": round(_mean(len(r["steps"]) for r in rows), 2)}


def heldout_episodes(config: DataConfig, per_level: int, test_seed: int, train_file: Path | str | None
                     ) -> list[tuple[str, int]]:
    """(level, seed) pairs for evaluation: `per_level` per level from `test_seed`, none of them in the
    training file."""
    taken = set()
    if train_file is not None:
        taken = {(r["meta"].get("level"), r["meta"].get("seed")) for r in read_jsonl(train_file)}
    out = []
    for level in config.levels:
        index, chosen = 0, 0
        while chosen < per_level:  # bounded: at most len(taken) seeds are skipped
            seed = episode_seed(test_seed, index)
            index += 1
            if (level, seed) not in taken:
                out.append((level, seed))
                chosen += 1
    return out


def sample_heldout(config: DataConfig, episodes: list[tuple[str, int]], n_max: int, progress: bool = True
                   ) -> dict:
    """{"samples": n_max noisy trajectories per episode, "expert": one expert trajectory per episode}."""
    from tqdm import tqdm

    policy = make_policy(config.policy, config.epsilon, config.seed)
    expert = make_policy("expert")
    envs: dict[str, CappedBabyAIEnv] = {}
    samples, experts = [], []
    for level, seed in tqdm(episodes, unit="ep", desc=f"sample x{n_max}", disable=not progress):
        env = envs.setdefault(level, CappedBabyAIEnv(level, config.horizon))
        samples.append([play(env, policy, seed, derive_seed("sample", seed, j), {"sample": j})
                        for j in range(n_max)])
        experts.append(play(env, expert, seed, seed))
    return {"episodes": episodes, "samples": samples, "expert": experts}


# -- statistics ----------------------------------------------------------------------------------------------

def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def wilson(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def rate(outcomes: list[bool]) -> dict:
    k, n = sum(bool(o) for o in outcomes), len(outcomes)
    low, high = wilson(k, n)
    return {"successes": k, "n": n, "rate": k / n if n else float("nan"), "ci95": [low, high]}


# -- choosers: the PRM service, or uniform random choice with the same interface ---------------------------------

class RandomChooser:
    """Stands in for `PRMClient` in the search drivers: every candidate gets a uniform random promise."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def rerank(self, task, candidates, aggregate="last", top_n=None, episode_id=None):
        order = list(range(len(candidates)))
        self.rng.shuffle(order)
        return SimpleNamespace(results=[SimpleNamespace(index=i, score=0.0) for i in order[:top_n]])

    def beam_expand(self, beams, beam_width, episode_id=None):  # episode_id: the SDK's routing header, unused here
        flat = [SimpleNamespace(beam=b, candidate=c, promise=self.rng.random(), progress=0.0)
                for b, beam in enumerate(beams) for c in range(len(beam["candidates"]))]
        flat.sort(key=lambda s: -s.promise)
        return SimpleNamespace(selected=flat[:beam_width])


def bon_picks(prm, task: str, candidates: list[list[dict]], ns: tuple[int, ...], per_n: bool) -> dict[int, int]:
    """For each N, the index (among the first N candidates) that the chooser ranks best."""
    from clients.search import best_of_n

    if per_n:
        return {n: best_of_n(prm, task, candidates[:n]) for n in ns}
    ranked = prm.rerank(task, candidates, aggregate="last").results
    position = {r.index: p for p, r in enumerate(ranked)}
    return {n: min(range(min(n, len(candidates))), key=position.__getitem__) for n in ns}


def evaluate_bon(prm, heldout: dict, ns: tuple[int, ...], per_n: bool = False, desc: str = "best-of-n",
                 progress: bool = True) -> dict:
    from tqdm import tqdm

    outcomes: dict[int, list[bool]] = {n: [] for n in ns}
    for samples in tqdm(heldout["samples"], unit="ep", desc=desc, disable=not progress):
        task = samples[0]["task"]
        picks = bon_picks(prm, task, [s["steps"] for s in samples], ns, per_n)
        for n in ns:
            outcomes[n].append(samples[picks[n]]["reward"] > 0)
    return {str(n): rate(outcomes[n]) for n in ns}


def oracle_bon(heldout: dict, ns: tuple[int, ...]) -> dict:
    return {str(n): rate([any(s["reward"] > 0 for s in samples[:n]) for samples in heldout["samples"]]) for n in ns}


def shortest_bon(heldout: dict, ns: tuple[int, ...]) -> dict:
    """Pick the trajectory with the fewest steps (first on ties): a verifier that reads only the length.
    Under a horizon, success ends an episode early, so this heuristic is a strong, cheap baseline."""
    def pick(samples, n):
        return samples[min(range(min(n, len(samples))), key=lambda i: len(samples[i]["steps"]))]

    return {str(n): rate([pick(samples, n)["reward"] > 0 for samples in heldout["samples"]]) for n in ns}


def expert_agreement(prm, heldout: dict) -> dict:
    """Step-level diagnostic: at every state of the held-out expert trajectories, does the PRM give the expert's
    action the highest promise among all 6 actions? (Uniform guessing: 1/6; some states have two equally
    good actions, so 1.0 is not expected.) One /v1/beam-expand per episode, one beam per state."""
    hits = []
    for trajectory in heldout["expert"]:
        steps = trajectory["steps"]
        beams = [{"trajectory": {"task": trajectory["task"], "steps": steps[:t]}, "observation": step["observation"],
                  "candidates": list(ACTIONS)} for t, step in enumerate(steps)]
        scored = prm.beam_expand(beams, beam_width=1).candidates
        for step, promises in zip(steps, scored):
            best = max(range(len(ACTIONS)), key=lambda i: promises[i].promise)
            hits.append(ACTIONS[best] == step["action"])
    return rate(hits)


def evaluate_beam(prm_for_episode, config: DataConfig, episodes: list[tuple[str, int]],
                  settings: tuple[tuple[int, int], ...], desc: str = "beam", progress: bool = True) -> dict:
    """Beam search on every episode for every (beams, candidates) setting; candidates capped at 6."""
    from tqdm import tqdm

    from clients.search import beam_search

    policy = make_policy(config.policy, config.epsilon, config.seed)
    out = {}
    for beams, cands in settings:
        k = min(cands, len(ACTIONS))
        outcomes, env_steps, calls = [], 0, 0
        for level, seed in tqdm(episodes, unit="ep", desc=f"{desc} {beams}x{k}", disable=not progress):
            policy.reset(derive_seed("beam", seed, beams, k))
            result = beam_search(prm_for_episode(seed), lambda: CappedBabyAIEnv(level, config.horizon), seed,
                                 policy.propose, beams, k)
            outcomes.append(result.success)
            env_steps += result.env_steps
            calls += result.prm_calls
        out[f"{beams}x{k}"] = {**rate(outcomes), "mean_env_steps": env_steps / len(episodes),
                               "mean_prm_calls": calls / len(episodes)}
    return out


# -- the service: one `agentprm serve` per checkpoint ---------------------------------------------------------

def child_env(threads: int) -> dict:
    """Environment of the train and serve subprocesses: `threads` OpenMP/torch threads. On this shared 2-core
    CPU one thread is several times faster than two for these small models (measured: training 17.9k vs
    2.7k tokens/s; a 64-candidate rerank 0.7 s vs 2-6 s): two spinning OpenMP threads stall whenever another
    process holds a core."""
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def agentprm_command() -> list[str]:
    script = Path(sys.executable).parent / "agentprm"
    return [str(script)] if script.exists() else [sys.executable, "-m", "service.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`agentprm serve --model CKPT` on 127.0.0.1 and a free port, for the duration of a `with` block."""

    def __init__(self, checkpoint: Path | str, ready_timeout_s: float = 180.0, log: Path | None = None,
                 threads: int = 1) -> None:
        self.checkpoint, self.ready_timeout_s, self.log = str(checkpoint), ready_timeout_s, log
        self.threads = threads
        self.url = ""
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "Server":
        import httpx

        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        cmd = [*agentprm_command(), "serve", "--model", self.checkpoint, "--host", "127.0.0.1", "--port", str(port),
               "--device", "cpu", "--log-level", "warning"]
        self._out = open(self.log, "w") if self.log else subprocess.DEVNULL
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=self._out, stderr=subprocess.STDOUT,
                                     env=child_env(self.threads))
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.__exit__()
                raise RuntimeError(f"agentprm serve exited with code {self.proc.returncode}"
                                   + (f"; see {self.log}" if self.log else ""))
            try:
                if httpx.get(f"{self.url}/ready", timeout=1.0).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.__exit__()
        raise TimeoutError(f"agentprm serve for {self.checkpoint} not ready after {self.ready_timeout_s:.0f}s")

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._out is not subprocess.DEVNULL:
            self._out.close()


# -- training ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TrainConfig:
    """The `agentprm train` settings shared by every method (so the comparison is fair)."""

    layers: int = 2
    hidden: int = 64
    epochs: int = 12
    lr: float = 2e-3
    batch_size: int = 16
    max_seq_len: int = 2048
    seed: int = 0
    mc_rollouts: int = 4
    workers: int = 1
    threads: int = 1  # OMP_NUM_THREADS of the training process (see child_env)

    def command(self, method: str, data: Path | str, out: Path | str, name: str | None = None) -> list[str]:
        cmd = ["agentprm", "train", "--data", str(data), "--method", method, "--out", str(out),
               "--layers", str(self.layers), "--hidden", str(self.hidden), "--epochs", str(self.epochs),
               "--lr", str(self.lr), "--batch-size", str(self.batch_size), "--max-seq-len", str(self.max_seq_len),
               "--seed", str(self.seed), "--overwrite"]
        if name:
            cmd += ["--name", name]
        if method == "mc":
            cmd += ["--mc-rollouts", str(self.mc_rollouts), "--mc-env", "envs.evaluate:env_from_meta",
                    "--mc-policy", "data", "--workers", str(self.workers)]
        return cmd


def train(method: str, data: Path | str, out: Path | str, config: TrainConfig, name: str | None = None,
          progress: bool = True) -> str:
    """Run `agentprm train` in a subprocess; the command line (as a user would type it)."""
    cmd = config.command(method, data, out, name)
    if not progress:
        cmd.append("--no-progress")
    subprocess.run([*agentprm_command(), *cmd[1:]], cwd=REPO, check=True, env=child_env(config.threads))
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
            "method": training.get("method"), "command": training.get("command"),
            "labelling_env_steps": labelling.get("env_steps", 0), "data_env_steps": data.get("n_steps"),
            "data_sha256": data.get("sha256"),
            "val": {k: metrics.get(k) for k in ("auc", "brier", "loss") if k in metrics},
            "train_steps": metrics.get("train_steps"), "tokens_per_s": metrics.get("tokens_per_s"),
            "layers": config.get("num_hidden_layers"), "hidden": config.get("hidden_size"), "bytes": size}


# -- the pipeline ---------------------------------------------------------------------------------------------

@dataclass
class EvalConfig:
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    methods: tuple[str, ...] = METHODS
    checkpoints: dict[str, str] = field(default_factory=dict)  # method -> existing checkpoint to reuse
    test_episodes: int = 15  # per level
    test_seed: int = 1
    ns: tuple[int, ...] = BON_NS
    beams: tuple[tuple[int, int], ...] = BEAMS
    rerank_per_n: bool = False
    work: str = ".cache/babyai-eval"
    out: str = "results/babyai"
    progress: bool = True


def run_pipeline(config: EvalConfig, command: str = "") -> dict:
    """Every stage of the evaluation; writes the report to `config.out` and returns the summary."""
    from envs.plots import write_report

    work, out = Path(config.work), Path(config.out)
    work.mkdir(parents=True, exist_ok=True)
    stages: dict[str, float] = {}
    commands = [command] if command else []

    def timed(name: str, fn, *args, **kwargs):
        start = time.perf_counter()
        print(f"== {name}", flush=True)
        value = fn(*args, **kwargs)
        stages[name] = round(time.perf_counter() - start, 1)
        return value

    data_file = work / "train.jsonl"
    data_summary = timed("data: training rollouts", collect, config.data, data_file, config.progress)
    checkpoints, train_commands = {}, {}
    for method in config.methods:
        given = config.checkpoints.get(method)
        if given:
            check_trained_on(given, data_file)
            checkpoints[method] = given
            training = manifest_of(given).get("training", {})
            train_commands[method] = training.get("command")
            metrics = training.get("metrics") or {}
            if metrics.get("train_tokens") and metrics.get("tokens_per_s"):
                stages[f"train: {method} (reused {given}; optimizer time from its manifest)"] = round(
                    metrics["train_tokens"] / metrics["tokens_per_s"], 1)
            continue
        ckpt = work / "checkpoints" / method
        train_commands[method] = timed(f"train: {method}", train, method, data_file, ckpt, config.train,
                                       None, config.progress)
        checkpoints[method] = str(ckpt)
    episodes = heldout_episodes(config.data, config.test_episodes, config.test_seed, data_file)
    n_max = max(config.ns)
    heldout = timed(f"sample: {n_max} per held-out episode + expert", sample_heldout, config.data, episodes, n_max,
                    config.progress)
    results: dict[str, dict] = {}
    for method, ckpt in checkpoints.items():
        facts = checkpoint_facts(ckpt)

        def evaluate(ckpt=ckpt, method=method):
            from clients.sdk import PRMClient

            with Server(ckpt, log=work / f"serve-{method}.log", threads=config.train.threads) as server, \
                    PRMClient(server.url, timeout=300.0) as prm:
                bon = evaluate_bon(prm, heldout, config.ns, config.rerank_per_n, f"{method} best-of-n",
                                   config.progress)
                beam = evaluate_beam(lambda seed: prm, config.data, episodes, config.beams, f"{method} beam",
                                     config.progress)
                agreement = expert_agreement(prm, heldout)
            return bon, beam, agreement

        bon, beam, agreement = timed(f"evaluate: {method} (serve + best-of-n + beam)", evaluate)
        results[method] = {**facts, "bon": bon, "beam": beam, "expert_agreement": agreement}

    def baselines():
        rnd_bon = evaluate_bon(RandomChooser(derive_seed("random-choice", config.test_seed)), heldout, config.ns,
                               False, "random best-of-n", config.progress)
        rnd_beam = evaluate_beam(lambda seed: RandomChooser(derive_seed("random-beam", seed)), config.data,
                                 episodes, config.beams, "random beam", config.progress)
        expert = rate([t["reward"] > 0 for t in heldout["expert"]])
        return rnd_bon, rnd_beam, expert

    rnd_bon, rnd_beam, expert = timed("evaluate: random choice + expert", baselines)
    summary = {
        "config": {"data": asdict(config.data), "train": asdict(config.train), "test_episodes_per_level":
                   config.test_episodes, "test_seed": config.test_seed, "ns": list(config.ns),
                   "beams": [list(b) for b in config.beams], "rerank_per_n": config.rerank_per_n},
        "data": {**data_summary, "sha256": sha256_file(data_file)},
        "heldout": {"episodes": len(episodes), "levels": list(config.data.levels),
                    "seeds": [[level, seed] for level, seed in episodes],
                    "sampler_success": rate([s[0]["reward"] > 0 for s in heldout["samples"]]),
                    "seen_initial_states": seen_initial_states(data_file, heldout),
                    "expert_action_shares": action_shares(heldout["expert"])},
        "methods": results,
        "baselines": {"random": {"bon": rnd_bon, "beam": rnd_beam}, "oracle": {"bon": oracle_bon(heldout, config.ns)},
                      "shortest": {"bon": shortest_bon(heldout, config.ns)},
                      "expert": expert},
        "commands": {"eval": commands, "train": train_commands},
        "stages_s": stages,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    write_report(summary, out)
    return summary


def action_shares(trajectories: list[dict]) -> dict[str, float]:
    """Share of each action among the steps of `trajectories` (the expert's: a constant guess of the most
    frequent one is the baseline of the "top action = expert's" check)."""
    counts = {a: 0 for a in ACTIONS}
    for t in trajectories:
        for step in t["steps"]:
            counts[step["action"]] = counts.get(step["action"], 0) + 1
    total = sum(counts.values()) or 1
    return {a: round(c / total, 4) for a, c in counts.items()}


def seen_initial_states(train_file: Path, heldout: dict) -> int:
    """How many held-out episodes start from a (task, first observation) that also starts a training episode
    (different seeds can generate the same small room)."""
    starts = {(r["task"], r["steps"][0]["observation"]) for r in read_jsonl(train_file)}
    return sum((s[0]["task"], s[0]["steps"][0]["observation"]) in starts for s in heldout["samples"])


def default_checkpoint(out: Path | str, data: DataConfig, train_config: TrainConfig, work: Path | str,
                       progress: bool = True) -> dict:
    """The shipped checkpoint: training rollouts -> `agentprm train --method agentprm` -> `out`."""
    data_file = Path(work) / "train.jsonl"
    start = time.perf_counter()
    summary = collect(data, data_file, progress)
    rollout_s = time.perf_counter() - start
    start = time.perf_counter()
    command = train("agentprm", data_file, out, train_config, DEFAULT_NAME, progress)
    return {"data": summary, "train_command": command, "rollout_s": round(rollout_s, 1),
            "train_s": round(time.perf_counter() - start, 1), **checkpoint_facts(out)}
