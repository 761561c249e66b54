"""A TRL reward function call: `PRMRewardFunc` as GRPOTrainer calls a `reward_funcs` entry.

In a TRL script:

    from clients.rewards import PRMRewardFunc
    trainer = GRPOTrainer(model=..., reward_funcs=[PRMRewardFunc("http://127.0.0.1:8000")], ...)

GRPOTrainer calls it as `reward_func(prompts=..., completions=..., completion_ids=..., **dataset_columns)`
and wants one float per completion. Chat prompts (lists of messages) are scored as messages, one step per
assistant message; text prompts go through /v1/reward like OpenRLHF's queries. TRL is not needed to run this.

    .venv/bin/python examples/trl_reward.py
"""

from __future__ import annotations

import argparse
import asyncio
import json

from clients.rewards import AsyncPRMRewardFunc, PRMRewardFunc

PROMPT = [{"role": "user", "content": "go to the red ball"},
          {"role": "user", "content": "You see a red ball 2 steps ahead."}]
COMPLETIONS = [
    [{"role": "assistant", "content": "move forward"}, {"role": "user", "content": "You see a red ball 1 step ahead."},
     {"role": "assistant", "content": "move forward"}],
    [{"role": "assistant", "content": "turn left"}, {"role": "user", "content": "You see a wall 1 step ahead."},
     {"role": "assistant", "content": "toggle"}],
]


def run(url: str, aggregate: str = "last") -> dict:
    prompts = [PROMPT] * len(COMPLETIONS)
    reward = PRMRewardFunc(url, aggregate=aggregate)
    rewards = reward(prompts=prompts, completions=COMPLETIONS, completion_ids=[[0], [0]], trainer_state=None)
    async_reward = AsyncPRMRewardFunc(url, aggregate=aggregate)  # TRL gathers async reward functions concurrently
    async_rewards = asyncio.run(async_reward(prompts=prompts, completions=COMPLETIONS, completion_ids=[[0], [0]]))
    return {"rewards": rewards, "async_rewards": async_rewards}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--aggregate", default="last", choices=["last", "min", "sum_progress"])
    args = parser.parse_args()
    print(json.dumps(run(args.url, args.aggregate)))


if __name__ == "__main__":
    main()
