"""`agentprm rollout` (BabyAI trajectories to JSONL) and `agentprm eval` (the BabyAI evaluation).

`register(subparsers)` adds the subcommands to the `agentprm` parser (service/cli.py calls it); this module
is also runnable on its own: `python -m envs.cli rollout --levels ... --out FILE.jsonl`.
Importing it is cheap (minigrid is imported only when a command runs). Bad input (unknown level, policy,
epsilon out of range, a checkpoint trained on other data) prints one line and exits 2.

    agentprm eval rollout --out FILE.jsonl [--episodes --epsilon --horizon --seed --levels]
        rollouts capped at a horizon (the data the evaluation trains on)
    agentprm eval default-checkpoint --out model_store/checkpoints/agentprm-babyai-small/1
        those rollouts -> agentprm train --method agentprm -> the shipped checkpoint
    agentprm eval run [--checkpoint agentprm=DIR ...] [--out results/babyai] [--work .cache/babyai-eval]
        data -> train (pvm, orm, mc, and agentprm unless given) -> held-out samples -> serve each checkpoint
        -> Best-of-N and beam search -> results/babyai/README.md, bon.png, beam.png, summary.json
    agentprm eval steps --checkpoint DIR [--test-levels --test-episodes --test-seed --json FILE]
        the step-level check alone (top action optimal, the two turns ranked) for one checkpoint
    agentprm eval report [--out results/babyai]
        re-render README.md and the plots from summary.json (after editing analysis.md)
"""

from __future__ import annotations

import argparse
import json
import sys


def _levels(text: str) -> tuple[str, ...]:
    return tuple(level.strip() for level in text.split(",") if level.strip())


def cmd_rollout(args) -> int:
    from envs.rollout import RolloutConfig, collect

    config = RolloutConfig(
        env=args.env, levels=args.levels, episodes=args.episodes, policy=args.policy, epsilon=args.epsilon,
        seed=args.seed, workers=args.workers, progress=not args.quiet,
    )
    try:
        summary = collect(config, args.out)
    except ValueError as exc:
        print(f"agentprm: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x.strip())


def _data_config(args):
    from envs.evaluate import DataConfig

    return DataConfig(levels=args.levels, episodes=args.episodes, policy=args.policy, epsilons=args.epsilons,
                      horizon=args.horizon, seed=args.seed, policy_seed=args.policy_seed,
                      samples_per_start=args.samples_per_start, branch_fraction=args.branch_fraction)


def _train_config(args):
    from envs.pipeline import TrainConfig

    return TrainConfig(layers=args.layers, hidden=args.hidden, epochs=args.epochs, lr=args.lr,
                       batch_size=args.batch_size, max_seq_len=args.max_seq_len, gamma=args.gamma,
                       seeds=args.train_seeds, mc_rollouts=args.mc_rollouts, workers=args.workers,
                       threads=args.threads)


def _test_config(args):
    from envs.evaluate import HeldoutConfig

    return HeldoutConfig(levels=args.test_levels, episodes=args.test_episodes, seeds=args.test_seeds,
                         seed_base=args.test_seed, n_max=max(args.ns), sample_epsilon=args.sample_epsilon,
                         hard_epsilon=args.hard_epsilon, horizon=args.horizon)


def _pairs(text: str) -> tuple[tuple[int, int], ...]:
    out = []
    for part in text.split(","):
        beams, _, cands = part.strip().partition("x")
        out.append((int(beams), int(cands)))
    return tuple(out)


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def _command_line() -> str:
    import shlex
    from pathlib import Path

    prog = "agentprm" if Path(sys.argv[0]).name == "agentprm" else "python -m envs.cli"
    return f"{prog} {shlex.join(sys.argv[1:])}"


def cmd_eval_rollout(args) -> int:
    from envs.evaluate import collect

    try:
        summary = collect(_data_config(args), args.out, progress=not args.quiet)
    except ValueError as exc:
        print(f"agentprm: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


def cmd_eval_default(args) -> int:
    from envs.pipeline import default_checkpoint

    try:
        summary = default_checkpoint(args.out, _data_config(args), _train_config(args), args.work,
                                     progress=not args.quiet)
    except ValueError as exc:
        print(f"agentprm: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2, default=str))
    return 0


def cmd_eval_run(args) -> int:
    from envs.pipeline import METHODS, EvalConfig, run_pipeline

    checkpoints = {}
    for item in args.checkpoint:
        method, sep, path = item.partition("=")
        if not sep or method not in METHODS:
            print(f"agentprm: error: --checkpoint wants METHOD=DIR with METHOD in {', '.join(METHODS)}, "
                  f"got {item!r}", file=sys.stderr)
            return 2
        checkpoints[method] = path
    methods = tuple(m for m in args.methods.split(",") if m)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        print(f"agentprm: error: unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}",
              file=sys.stderr)
        return 2
    overlap = sorted(set(args.levels) & set(args.test_levels))
    if overlap and not args.allow_seen_levels:
        print(f"agentprm: error: test level(s) {', '.join(overlap)} are also training levels; the evaluation is on "
              "levels the PRM never trained on (pass --allow-seen-levels to test on them anyway)", file=sys.stderr)
        return 2
    config = EvalConfig(data=_data_config(args), train=_train_config(args), test=_test_config(args),
                        methods=methods, checkpoints=checkpoints, ns=args.ns, beams=args.beams, work=args.work,
                        out=args.out, progress=not args.quiet, retrain=args.retrain)
    try:
        summary = run_pipeline(config, _command_line())
    except ValueError as exc:
        print(f"agentprm: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}/README.md, bon.png, beam.png, summary.json; stages (s): "
          + json.dumps(summary["stages_s"]))
    return 0


def cmd_eval_steps(args) -> int:
    from pathlib import Path

    from envs.evaluate import HeldoutConfig
    from envs.pipeline import step_check

    if not (Path(args.checkpoint) / "manifest.json").is_file():
        print(f"agentprm: error: {args.checkpoint} is not a checkpoint (no manifest.json)", file=sys.stderr)
        return 2
    test = HeldoutConfig(levels=args.test_levels, episodes=args.test_episodes, seeds=args.test_seeds,
                         seed_base=args.test_seed, horizon=args.horizon)
    try:
        result = step_check(args.checkpoint, test, args.threads)
    except ValueError as exc:
        print(f"agentprm: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    names = {"top_optimal": "top action is optimal", "top_expert": "top action is the expert's",
             "turn_direction": "the optimal turn above the other", "turn_cued": "the same, target in view"}
    print(f"{result['checkpoint']}: {result['states']} states ({result['turn_states']} with one optimal turn, "
          f"{result['cued_states']} of them with the target in view) on {', '.join(result['levels'])}")
    for figure, label in names.items():
        r = result["rates"][figure]
        others = "; ".join(f"{name} {values[figure]:.2f}" for name, values in result["baselines"].items()
                           if figure in values)
        print(f"  {label:34s} {r['rate']:.3f} [{r['ci95'][0]:.2f}, {r['ci95'][1]:.2f}] (n={r['n']})   {others}")
    return 0


def cmd_eval_report(args) -> int:
    from pathlib import Path

    from envs.report import write_report

    summary_file = Path(args.out) / "summary.json"
    if not summary_file.is_file():
        print(f"agentprm: error: {summary_file}: no such file (run `agentprm eval run` first)", file=sys.stderr)
        return 2
    write_report(json.loads(summary_file.read_text()), args.out)
    print(f"wrote {args.out}/README.md, bon.png, beam.png from {summary_file}")
    return 0


def _add_data_flags(p) -> None:
    from envs.evaluate import DataConfig

    d = DataConfig()
    p.add_argument("--levels", type=_levels, default=d.levels,
                   help=f"comma-separated BabyAI training levels [default: {','.join(d.levels)}]")
    p.add_argument("--episodes", type=int, default=d.episodes, help=f"training episodes per level [default: {d.episodes}]")
    p.add_argument("--policy", default=d.policy, choices=["expert", "noisy", "random"])
    p.add_argument("--epsilons", type=_floats, default=d.epsilons, help="random-action probabilities of the noisy "
                   f"sampler, cycled episode by episode [default: {','.join(map(str, d.epsilons))}]")
    p.add_argument("--horizon", type=int, default=d.horizon, help=f"episode step cap [default: {d.horizon}]")
    p.add_argument("--seed", type=int, default=d.seed, help="base seed of the training episodes")
    p.add_argument("--policy-seed", type=int, default=d.policy_seed, help="seed of the sampler's own randomness")
    p.add_argument("--samples-per-start", type=int, default=d.samples_per_start,
                   help=f"episodes sampled from each initial state [default: {d.samples_per_start}]")
    p.add_argument("--branch-fraction", type=float, default=d.branch_fraction,
                   help="share of episodes that get a branch point, where every other action is taken and the "
                   f"sampler plays on (equal contrast between actions in one state) [default: {d.branch_fraction}]")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_train_flags(p) -> None:
    from envs.pipeline import TrainConfig

    t = TrainConfig()
    p.add_argument("--layers", type=int, default=t.layers)
    p.add_argument("--hidden", type=int, default=t.hidden)
    p.add_argument("--epochs", type=int, default=t.epochs)
    p.add_argument("--lr", type=float, default=t.lr, help="peak learning rate [default: the trainer's]")
    p.add_argument("--batch-size", type=int, default=t.batch_size)
    p.add_argument("--max-seq-len", type=int, default=t.max_seq_len)
    p.add_argument("--gamma", type=float, default=t.gamma, help=f"discount of the outcome [default: {t.gamma}]")
    p.add_argument("--train-seeds", type=_ints, default=t.seeds, help="training seeds of every method "
                   f"[default: {','.join(map(str, t.seeds))}]")
    p.add_argument("--mc-rollouts", type=int, default=t.mc_rollouts, help="K rollouts per step of the MC labels")
    p.add_argument("--workers", type=int, default=t.workers, help="processes for MC labelling")
    p.add_argument("--threads", type=int, default=t.threads, help="OMP_NUM_THREADS of the train and serve "
                   f"subprocesses [default: {t.threads}: fastest on a shared 2-core CPU]")
    p.add_argument("--work", default=".cache/babyai-eval", help="folder for rollouts, checkpoints, server logs")


def register(subparsers) -> None:
    from envs.babyai import DEFAULT_LEVELS  # plain module constant; minigrid itself is imported lazily

    p = subparsers.add_parser("rollout", help="collect trajectories from BabyAI levels into JSONL",
                              description="Play N episodes per level with a policy and write one trajectory "
                                          "per line: {task, steps: [{observation, action}], reward, meta}.")
    p.add_argument("--env", default="babyai", choices=["babyai"])
    p.add_argument("--levels", type=_levels, default=DEFAULT_LEVELS,
                   help=f"comma-separated BabyAI level ids [default: {','.join(DEFAULT_LEVELS)}]")
    p.add_argument("--episodes", type=int, default=100, help="episodes per level [default: 100]")
    p.add_argument("--policy", default="noisy", choices=["expert", "noisy", "random"],
                   help="expert = minigrid's BabyAIBot; noisy = expert with epsilon-random actions [default: noisy]")
    p.add_argument("--epsilon", type=float, default=0.2, help="random-action probability of --policy noisy")
    p.add_argument("--seed", type=int, default=0, help="base seed: episode seeds and policy randomness")
    p.add_argument("--workers", type=int, default=1, help="processes [default: 1]")
    p.add_argument("--out", required=True, help="output JSONL file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_rollout)

    from envs.evaluate import HeldoutConfig  # cheap: minigrid is imported when an env is built
    from envs.pipeline import BEAMS, BON_NS

    ev = subparsers.add_parser("eval", help="BabyAI evaluation: Best-of-N and beam search through the service",
                               description="Rollouts, training of every method, held-out Best-of-N and beam search "
                                           "through `agentprm serve`, and the results table and plots.")
    sub = ev.add_subparsers(dest="eval_command", required=True)
    p = sub.add_parser("rollout", help="training rollouts capped at a horizon, to JSONL")
    _add_data_flags(p)
    p.add_argument("--out", required=True, help="output JSONL file")
    p.set_defaults(func=cmd_eval_rollout)
    p = sub.add_parser("default-checkpoint", help="rollouts -> agentprm train --method agentprm -> checkpoint")
    _add_data_flags(p)
    _add_train_flags(p)
    p.add_argument("--out", required=True, help="checkpoint directory, e.g. "
                   "model_store/checkpoints/agentprm-babyai-small/1")
    p.set_defaults(func=cmd_eval_default)
    p = sub.add_parser("run", help="the whole evaluation; writes --out/README.md and plots")
    _add_data_flags(p)
    _add_train_flags(p)
    h = HeldoutConfig()
    p.add_argument("--methods", default="agentprm,pvm,orm,mc", help="PRM methods to train and evaluate")
    p.add_argument("--checkpoint", action="append", default=[], metavar="METHOD=DIR",
                   help="reuse a checkpoint for METHOD's first seed (trained on the same rollouts); repeatable")
    p.add_argument("--test-levels", type=_levels, default=h.levels,
                   help=f"comma-separated test levels, none of them a training level [default: {','.join(h.levels)}]")
    p.add_argument("--allow-seen-levels", action="store_true", help="allow test levels that are also training levels")
    p.add_argument("--retrain", action="store_true", help="train every checkpoint again, even one in --work that the "
                   "same command trained on the same data (reused by default: an interrupted run picks up)")
    p.add_argument("--test-episodes", type=int, default=h.episodes, help=f"test episodes per level [default: {h.episodes}]")
    p.add_argument("--test-seeds", type=_ints, default=(), help="exact test seeds, used on every test level "
                   "(overrides --test-episodes and --test-seed)")
    p.add_argument("--test-seed", type=int, default=h.seed_base, help="base seed of the test episodes")
    p.add_argument("--sample-epsilon", type=float, default=h.sample_epsilon,
                   help=f"epsilon of the sampling policy (Best-of-N samples, beam candidates) [default: {h.sample_epsilon}]")
    p.add_argument("--hard-epsilon", type=float, default=h.hard_epsilon,
                   help=f"epsilon of the harder Best-of-N sampler [default: {h.hard_epsilon}]")
    p.add_argument("--ns", type=_ints, default=BON_NS, help=f"Best-of-N values [default: {','.join(map(str, BON_NS))}]")
    p.add_argument("--beams", type=_pairs, default=BEAMS, help="beam settings BxK (K samples per beam) "
                   f"[default: {','.join(f'{b}x{k}' for b, k in BEAMS)}]")
    p.add_argument("--out", default="results/babyai", help="results folder")
    p.set_defaults(func=cmd_eval_run)
    p = sub.add_parser("steps", help="the step-level check alone for one checkpoint: does its top action match "
                                     "the optimal one, does it rank the two turns, on held-out levels")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory")
    p.add_argument("--test-levels", type=_levels, default=h.levels, help="comma-separated levels "
                   f"[default: {','.join(h.levels)}]")
    p.add_argument("--test-episodes", type=int, default=h.episodes, help=f"episodes per level [default: {h.episodes}]")
    p.add_argument("--test-seeds", type=_ints, default=(), help="exact seeds, used on every level")
    p.add_argument("--test-seed", type=int, default=h.seed_base, help="base seed of the episodes")
    p.add_argument("--horizon", type=int, default=h.horizon)
    p.add_argument("--threads", type=int, default=2, help="threads of the server [default: 2]")
    p.add_argument("--json", help="also write the figures to this JSON file")
    p.set_defaults(func=cmd_eval_steps)
    p = sub.add_parser("report", help="re-render README.md and the plots from --out/summary.json "
                                      "(and --out/analysis.md, the written interpretation, if present)")
    p.add_argument("--out", default="results/babyai", help="results folder")
    p.set_defaults(func=cmd_eval_report)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="agentprm", description="AgentPRM environment tools")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
