"""An OpenRLHF-format reward call: what OpenRLHF sends to `--reward.remote_url`, and what it reads back.

Point OpenRLHF at the server (the query string sets how a query becomes steps and steps one reward):

    python -m openrlhf.cli.train_ppo_ray ... \\
        --reward.remote_url 'http://127.0.0.1:8000/v1/reward?step_format=markers&aggregate=last'

OpenRLHF (0.11.2) posts one shard per server with aiohttp (180 s timeout, 5 tries), query = the decoded
prompt + response; it reads `rewards`, `scores` and `extra_logs`. This script makes the same call with httpx.

    .venv/bin/python examples/openrlhf_reward.py
"""

from __future__ import annotations

import argparse
import json

import httpx

PROMPT = "<|task|>go to the red ball<|obs|>You see a red ball 2 steps ahead."
RESPONSES = ["<|act|>move forward<|end|><|obs|>You see a red ball 1 step ahead.<|act|>move forward<|end|>",
             "<|act|>turn left<|end|><|obs|>You see a wall 1 step ahead.<|act|>toggle<|end|>"]


def run(url: str, step_format: str = "markers", aggregate: str = "last") -> dict:
    payload = {"query": [PROMPT + r for r in RESPONSES], "prompts": [PROMPT] * len(RESPONSES),
               "labels": [None] * len(RESPONSES)}
    # trust_env=False: a proxy variable must not capture a loopback call (OpenRLHF's aiohttp ignores them too).
    with httpx.Client(timeout=180, trust_env=False) as http:
        response = http.post(f"{url}/v1/reward", params={"step_format": step_format, "aggregate": aggregate},
                             json=payload)
        response.raise_for_status()
        body = response.json()
        empty = http.post(f"{url}/v1/reward", json={"query": [], "prompts": [], "labels": []}).json()
    return {"payload": payload, "response": body, "empty_shard_response": empty}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--aggregate", default="last", choices=["last", "min", "sum_progress"])
    args = parser.parse_args()
    result = run(args.url, aggregate=args.aggregate)
    print(json.dumps(result["response"], indent=1))


if __name__ == "__main__":
    main()
