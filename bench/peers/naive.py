"""Our own engine and HTTP API with every reuse switched off: the server behind the "naive" peer.

The naive baseline scores each step's prefix as its own sequence (the client sends every prefix as a
trajectory to /v1/score and reads its last promise). Served here by PRMEngine with the cross-request prefix
cache off (`prefix_cache_bytes=0`) and no prefix sharing within a request (`share_prefixes=False`), so
every prefix is computed in full; dynamic batching stays on. Limits on trajectories per request are raised
(a W2 request carries one trajectory per step of each of its 16 candidates), and so are the queue bounds
and the request deadline (900 s, the bench client's timeout).

Run: `python -m bench.peers.naive --checkpoint DIR --port N` (binds 127.0.0.1).
"""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    from service.api.app import ApiConfig, create_app
    from service.engine.engine import EngineConfig, PRMEngine

    parser = argparse.ArgumentParser(description="our engine with prefix sharing and caching off (benchmark peer)")
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    config = EngineConfig(device="cpu", prefix_cache_bytes=0, share_prefixes=False, max_trajectories=4096,
                          max_candidates=4096, max_queue_jobs=1 << 20, max_queue_tokens=1 << 30)
    engine = PRMEngine.from_checkpoint(args.checkpoint, config)
    # the deadline is the bench client's own timeout, as for `ours` (bench.systems.DEADLINE_FLAGS)
    app = create_app(engine, engine.metrics, ApiConfig(max_body_bytes=64 * 1024 * 1024, request_timeout_s=900.0,
                                                       max_request_timeout_s=900.0))
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
