"""`agentprm serve` with a fault injected into the model runner (a test helper, run as a script).

    python -m tests.reliability.faulty_serve MODE serve-args...

MODE `device-error`: every batch raises the RuntimeError a sticky CUDA fault raises (the engine can never
recover). MODE `slow`: every batch takes SLOW_BATCH_S longer (as on a loaded device), so a test can
hold work in flight for a known time without burning CPU. Everything else is the real server: the real
CLI, settings, app, uvicorn and drain logic.
"""

from __future__ import annotations

import sys
import time

import service.cli as cli

SLOW_BATCH_S = 0.05

MESSAGES = {"device-error": "CUDA error: an illegal memory access was encountered (injected by the test)"}


def main() -> int:
    mode, argv = sys.argv[1], sys.argv[2:]
    real_build = cli.build_engine

    def build_engine(settings):
        engine = real_build(settings)

        real_run = engine.scheduler.run_batch

        def broken(jobs):
            raise RuntimeError(MESSAGES[mode])

        def slow(jobs):
            time.sleep(SLOW_BATCH_S)
            return real_run(jobs)

        engine.scheduler.run_batch = slow if mode == "slow" else broken
        return engine

    cli.build_engine = build_engine
    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main())
