"""Quick figures against a running server: latency of one 3-step score request, tokens/s of a batch of 32.

    python -m bench.quick --url http://127.0.0.1:8000 [--repeats 50]

Figures for the record, not comparisons: peers are compared only by the full bench (one run, same model).
"""

from __future__ import annotations

import argparse
import statistics
import time

import httpx


def trajectory(n_steps: int, seed: int) -> dict:
    objects = ["red ball", "blue key", "yellow door", "green box", "grey wall", "purple ball"]
    actions = ["turn left", "turn right", "move forward", "pick up", "toggle"]
    return {"task": f"go to the {objects[seed % 6]}",
            "steps": [{"observation": f"You see a {objects[(seed + i) % 6]} {i % 4 + 1} steps ahead and "
                                      f"{(seed + i) % 3} steps to the left. You carry nothing.",
                       "action": actions[(seed * 3 + i) % 5]} for i in range(n_steps)]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--batch-steps", type=int, default=10, help="steps per trajectory in the batch of 32")
    args = parser.parse_args()
    with httpx.Client(base_url=args.url, timeout=120) as client:
        model = client.get("/v1/models").json()["data"][0]["id"]
        single = {"trajectories": [trajectory(3, 0)]}
        for _ in range(5):
            client.post("/v1/score", json=single).raise_for_status()
        latencies = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            client.post("/v1/score", json=single).raise_for_status()
            latencies.append(time.perf_counter() - start)
        batch = {"trajectories": [trajectory(args.batch_steps, s) for s in range(32)]}
        client.post("/v1/score", json=batch).raise_for_status()
        rates = []
        for _ in range(max(3, args.repeats // 10)):
            start = time.perf_counter()
            body = client.post("/v1/score", json=batch).json()
            rates.append(body["usage"]["computed_tokens"] / (time.perf_counter() - start))
        tokens = body["usage"]["computed_tokens"]
    print(f"model {model}")
    print(f"single 3-step score: p50 {statistics.median(latencies) * 1000:.1f} ms, "
          f"min {min(latencies) * 1000:.1f} ms over {args.repeats} requests")
    print(f"batch of 32 x {args.batch_steps}-step trajectories ({tokens} tokens): "
          f"{statistics.median(rates):,.0f} tokens/s (median of {len(rates)})")


if __name__ == "__main__":
    main()
