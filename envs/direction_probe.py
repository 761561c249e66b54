"""A one-step synthetic probe: can a model of a given size learn to turn toward the task's object?

Each trajectory is one BabyAI-style step: the task names an object ("go to the red ball"), the observation
lists it purely to one side ("a red ball 2 steps right") among up to `distractors` other objects anywhere
in view, and the action is "turn left" or "turn right", drawn at random. The outcome is 1 if the action turns
toward the object, else 0. It isolates the one skill a BabyAI PRM needs to rank the two turns (bind the
task's object to its mention, read its side, compare with the action's side) from everything that makes
BabyAI's labels weak (a wrong turn there costs a few discounted steps, not the outcome). Used by
results/babyai/analysis.md:

    python -m envs.direction_probe --out probe.jsonl --distractors 3
    agentprm train --data probe.jsonl --method agentprm --layers 2 --hidden 64 --epochs 10 --out CKPT

and the validation AUC of the run answers the question (0.5: not learned).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

COLORS = ("red", "green", "blue", "purple", "yellow", "grey")
KINDS = ("ball", "box", "key")


def _steps(n: int, direction: str) -> str:
    return f"{n} step{'s' if n > 1 else ''} {direction}"


def _phrase(color: str, kind: str, ahead: int, side: str, across: int) -> str:
    parts = ([_steps(ahead, "ahead")] if ahead else []) + ([_steps(across, side)] if across else [])
    return f"a {color} {kind} " + " and ".join(parts)


HISTORY_ACTIONS = ("turn left", "turn right", "move forward", "pick up", "drop", "toggle")


def _observation(rng: random.Random, objects: list[tuple]) -> str:
    rng.shuffle(objects)
    return (f"You see {', '.join(_phrase(*o) for o in objects)}. Walls: {_steps(rng.randint(2, 6), 'ahead')}, "
            f"{_steps(rng.randint(1, 3), rng.choice(('left', 'right')))}.")


def _others(rng: random.Random, target: tuple[str, str], n: int) -> list[tuple]:
    out = []
    while len(out) < n:
        other = (rng.choice(COLORS), rng.choice(KINDS))
        if other != target:
            out.append((*other, rng.randint(0, 3), rng.choice(("left", "right")), rng.randint(1, 3)))
    return out


def probe_trajectory(rng: random.Random, distractors: int, history: int = 0) -> dict:
    """`history` earlier steps come first: random observations (the named object, when shown, on a random
    side) and random actions, which do not change the outcome; only the last step's turn does."""
    color, kind, side = rng.choice(COLORS), rng.choice(KINDS), rng.choice(("left", "right"))
    steps = []
    for _ in range(history):
        objects = _others(rng, (color, kind), rng.randint(0, distractors))
        if rng.random() < 0.5:
            objects.append((color, kind, rng.randint(0, 3), rng.choice(("left", "right")), rng.randint(1, 3)))
        steps.append({"observation": _observation(rng, objects) if objects else "You see no objects.",
                      "action": rng.choice(HISTORY_ACTIONS)})
    objects = [(color, kind, 0, side, rng.randint(1, 3)), *_others(rng, (color, kind), distractors)]
    action = rng.choice(("turn left", "turn right"))
    steps.append({"observation": _observation(rng, objects), "action": action})
    return {"task": f"go to the {color} {kind}", "steps": steps,
            "reward": float(action == f"turn {side}"), "meta": {"env": "direction-probe", "side": side}}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m envs.direction_probe", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="JSONL file to write")
    p.add_argument("--n", type=int, default=2000, help="trajectories [default: 2000]")
    p.add_argument("--distractors", type=int, default=3, help="at most this many other objects [default: 3]")
    p.add_argument("--history", type=int, default=0,
                   help="random earlier steps before the decisive one (up to this many) [default: 0]")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.n < 1 or args.distractors < 0 or args.history < 0:
        p.error("--n must be >= 1, --distractors and --history >= 0")
    rng = random.Random(args.seed)
    rows = [probe_trajectory(rng, rng.randint(0, args.distractors), rng.randint(0, args.history))
            for _ in range(args.n)]
    Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {len(rows)} probe trajectories to {args.out}")


if __name__ == "__main__":
    main()
