"""An agent loop that keeps OpenAI-style chat messages and picks every action by Best-of-N with the PRM.

The conversation is what an agent framework (LangGraph, the OpenAI Agents SDK, smolagents) holds: the task as
the first user message, each action as an assistant message, each observation as a user (or tool) message.
At every step the candidate actions go to /v1/rerank as message continuations of the conversation so far;
the server maps messages to task / observations / actions (README: Chat messages), no glue needed.

    make serve            # the shipped BabyAI checkpoint on 127.0.0.1:8000
    .venv/bin/python examples/agent_best_of_n.py --seed 3
"""

from __future__ import annotations

import argparse
import json

from clients import PRMClient
from clients.search import best_of_n
from envs.babyai import BabyAITextEnv


def run(url: str, seed: int = 0, level: str = "BabyAI-GoToRedBall-v0", max_steps: int = 20) -> dict:
    env = BabyAITextEnv(level)
    observation = env.reset(seed)
    # No system message: it would join the task text, and this checkpoint was trained on bare BabyAI missions.
    messages = [{"role": "user", "content": env.task}, {"role": "user", "content": observation}]
    picks = []
    with PRMClient(url) as prm:
        for _ in range(max_steps):
            candidates = [[{"role": "assistant", "content": action}] for action in env.valid_actions]
            choice = best_of_n(prm, None, candidates, messages=messages)
            action = env.valid_actions[choice.index]
            picks.append({"action": action, "scores": dict(zip(env.valid_actions, choice.scores))})
            outcome = env.step(action)
            messages.append({"role": "assistant", "content": action})
            if outcome.done:
                break
            messages.append({"role": "user", "content": outcome.observation})
        final = prm.score([{"messages": messages}]).results[0]
    return {"task": env.task, "success": outcome.success, "steps": len(picks), "picks": picks,
            "final_promise": final.score, "message_indices": [s.message_index for s in final.steps],
            "messages": messages}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--level", default="BabyAI-GoToRedBall-v0")
    args = parser.parse_args()
    result = run(args.url, args.seed, args.level)
    for pick in result["picks"]:
        print(f"{pick['action']:<13} " + " ".join(f"{a}={s:.3f}" for a, s in pick["scores"].items()))
    print(json.dumps({k: result[k] for k in ("task", "success", "steps", "final_promise", "message_indices",
                                             "picks")}))


if __name__ == "__main__":
    main()
