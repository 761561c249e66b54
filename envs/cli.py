"""`agentprm rollout`: collect trajectories from BabyAI levels into a JSONL file.

`register(subparsers)` adds the subcommand to the `agentprm` parser (service/cli.py calls it); this module
is also runnable on its own: `python -m envs.cli rollout --levels ... --out FILE.jsonl`.
Importing it is cheap (minigrid is imported only when the command runs). Bad input (unknown level, policy,
epsilon out of range) prints one line and exits 2.
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="agentprm", description="AgentPRM environment tools")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
