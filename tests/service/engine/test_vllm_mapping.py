"""The vllm backend's mapping of score jobs onto vLLM pooling prompts (service/engine/backends/vllm.py), in the
default suite: no vLLM needed.

- `plan_prompts`: which prompts, in which round, each once;
- the runner against a stand-in for vLLM's /pooling endpoint that computes with our own model (LAST: the promise
  at a prompt's last token, ALL: at every token), so the engine's answers must equal the packed backend's
  (<= 1e-5) on every route and pooling mode. What vLLM itself computes is checked by test_vllm_backend.py
  (marker `vllm`);
- one-line start-up failures from vLLM's log (`failure_reason`), and the command line the settings make.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time

import numpy as np
import pytest
import torch

from model_store.modeling import load_prm
from model_store.vllm_export import VllmExport
from service.engine.backends.vllm import MIN_SHARED_PREFIX, VllmRunner, plan_prompts
from service.engine.engine import EngineConfig, PRMEngine
from service.engine.scheduler import Scheduler
from service.engine.types import Beam, ScoreJob
from service.engine.vllm_server import VllmConfig, failure_reason, server_command
from service.settings import ServerSettings
from tests.conftest import make_trajectory


def test_beam_candidates_share_the_warmed_history_and_one_baseline():
    history = tuple(range(100, 140))  # 40 tokens: the beam's history and observation
    jobs = [ScoreJob(history + (7, c), (30, 41), len(history)) for c in range(3)]
    plan = plan_prompts(jobs, "last")
    assert plan.last_jobs == [0, 1, 2] and plan.all_jobs == []
    assert plan.rounds[0] == [history]  # computed once, before anything that reads it
    assert sorted(plan.rounds[1]) == sorted([history[:31]] + [j.ids for j in jobs])  # the baseline once, not 3x
    assert len(plan.rounds) == 2


def test_a_trajectory_is_one_all_prompt_or_its_longest_last_prompt_first():
    long = ScoreJob(tuple(range(60)), (10, 20, 30, 59))
    short = ScoreJob(tuple(range(12)), (5, 11))
    plan = plan_prompts([long, short, long], "all")
    assert plan.all_jobs == [0, 1, 2] and plan.rounds == [[long.ids, short.ids]]
    plan = plan_prompts([long], "last")  # the whole sequence first, then the readouts inside it hit the cache
    assert plan.rounds == [[long.ids], [long.ids[:11], long.ids[:21], long.ids[:31]]]
    tiny_prefix = ScoreJob(tuple(range(20)), (3, 19), MIN_SHARED_PREFIX - 1)  # below one vLLM block: not warmed
    assert plan_prompts([tiny_prefix], "last").rounds == [[tiny_prefix.ids], [tiny_prefix.ids[:4]]]


# -- the runner against a stand-in for vLLM's /pooling ---------------------------------------------------------
class _StandIn:
    """vLLM's /pooling and /health on a Unix socket, computed by our own PRM (fp32, one prompt at a time)."""

    def __init__(self, model, socket_path):
        import uvicorn
        from fastapi import FastAPI
        from fastapi.responses import PlainTextResponse

        self.model, self.socket_path, self.requests = model, socket_path, []
        app = FastAPI()

        @app.get("/health")
        def health():
            return {}

        @app.get("/metrics", response_class=PlainTextResponse)
        def metrics():  # this stand-in caches nothing
            return 'vllm:prefix_cache_hits_total{engine="0"} 0.0\n'

        @app.post("/pooling")
        def pooling(body: dict):
            self.requests.append((body["task"], [tuple(p) for p in body["input"]]))
            data = []
            with torch.inference_mode():
                for i, ids in enumerate(body["input"]):
                    hidden, _ = model.hidden_states(torch.tensor([ids]))  # [1, T, H]
                    promises = model.readout(hidden, torch.arange(len(ids))).tolist()
                    rows = [[p] for p in promises] if body["task"] == "token_classify" else [promises[-1]]
                    data.append({"index": i, "data": rows})
            return {"data": data, "usage": {"prompt_tokens": sum(map(len, body["input"]))}}

        self.server = uvicorn.Server(uvicorn.Config(app, uds=str(socket_path), log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)


class _Process:
    """What VllmRunner needs of a VllmProcess: the socket, the config, liveness."""

    def __init__(self, socket_path):
        self.socket_path, self.config, self.stopped = socket_path, VllmConfig(), False

    def alive(self):
        return not self.stopped

    def stop(self):
        self.stopped = True

    def exit_reason(self):
        return "vLLM exited"


@pytest.fixture(scope="module")
def engines(tiny_checkpoint, tmp_path_factory):
    loaded = load_prm(tiny_checkpoint, device="cpu", dtype=torch.float32)
    socket_path = tmp_path_factory.mktemp("standin") / "vllm.sock"
    export = VllmExport(path=tiny_checkpoint, arch="seq_cls", architecture="Qwen2ForSequenceClassification",
                        end_id=0, state_id=0, hidden_size=64, max_seq_len=loaded.manifest.max_seq_len)
    with _StandIn(loaded.model, socket_path) as stand_in:
        runner = VllmRunner(_Process(socket_path), export, None)
        packed = PRMEngine(loaded, EngineConfig(device="cpu", backend="packed"))
        mapped = PRMEngine(loaded, EngineConfig(device="cpu"), device=torch.device("cpu"), runner=runner)
        yield packed, mapped, stand_in
        runner.close()


async def _all_routes(engine):
    task = "go to the red ball behind the door"
    trajs = [make_trajectory(task, n, seed=n) for n in (1, 3, 5)]
    score = await engine.score("default", trajs + [make_trajectory("open it", 2)], "mean")
    rerank = await engine.rerank("default", task, [t.steps for t in trajs], "last")
    beams = [Beam(trajs[1], "a ball ahead", ("move forward", "turn left", "pick up")),
             Beam(make_trajectory(task, 0), "a wall", ("turn left", "turn right"))]
    expand = await engine.expand("default", beams, 2)
    return score, rerank, expand


def _flat(output):
    if hasattr(output, "candidates"):
        return [x for beam in output.candidates for s in beam for x in (s.promise, s.progress)]
    return [x for r in output.results for x in (r.score, r.initial_value, *(v for s in r.steps
                                                                           for v in (s.promise, s.progress)))]


def run(engine, fn):
    """fn(engine) inside a started scheduler (a fresh one each time: a stopped scheduler does not restart)."""
    async def main():
        engine.scheduler = Scheduler(engine.runner.run_batch, engine.config.scheduler_config(),
                                     on_batch=engine._record_batch)
        await engine.start()
        try:
            return await fn(engine)
        finally:
            await engine.scheduler.stop()
    return asyncio.run(main())


@pytest.mark.parametrize("pooling", ["last", "all"])
def test_mapped_engine_equals_the_packed_backend(engines, pooling):
    packed, mapped, stand_in = engines
    mapped.runner.pooling = pooling
    stand_in.requests.clear()
    want, got = run(packed, _all_routes), run(mapped, _all_routes)
    for w, g in zip(want, got):
        assert np.allclose(_flat(w), _flat(g), atol=1e-5, rtol=0)
        assert len({round(x, 4) for x in _flat(g)}) > 5  # promises vary: a match is no accident
    assert [r.index for r in want[1].results] == [r.index for r in got[1].results]
    assert [(s.beam, s.candidate) for s in want[2].selected] == [(s.beam, s.candidate) for s in got[2].selected]
    tasks = {task for task, _ in stand_in.requests}
    assert tasks == {"last": {"classify"}, "all": {"token_classify"}}[pooling]


def test_a_dead_vllm_makes_the_engine_unhealthy(engines):
    _, mapped, _ = engines

    async def check(engine):
        assert (await engine.check_health()).ready
        engine.runner.process.stopped = True
        try:
            return await engine.check_health()
        finally:
            engine.runner.process.stopped = False

    health = run(mapped, check)
    assert not health.live and not health.ready and health.detail == "vLLM exited"


# -- start-up: one line from vLLM's log, the command line from the settings ----------------------------------
CHAINED = """\
(APIServer pid=1) INFO 12-02 03:25:18 [api_utils.py:286] non-default args: {'model': '/x'}
(EngineCore pid=2) ERROR 12-02 03:26:00 [core.py:1] EngineCore failed to start.
(EngineCore pid=2) Traceback (most recent call last):
(EngineCore pid=2)   File "core.py", line 3, in run
(EngineCore pid=2) ValueError: To serve at least one request with the model's max seq len (1024), (3.0 GiB KV cache is needed, which is larger than the available KV cache memory (1.0 GiB).
Traceback (most recent call last):
RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {}
"""


def test_failure_reason_is_the_root_exception_in_one_line():
    reason = failure_reason(CHAINED, 1)
    assert reason.startswith("vLLM failed to start (exit code 1): ValueError: To serve at least one request")
    assert "\n" not in reason
    argparse_error = "usage: api_server.py [-h]\napi_server.py: error: argument --dtype: invalid choice: 'x'\n"
    assert failure_reason(argparse_error, 2) == ("vLLM failed to start (exit code 2): error: argument --dtype: "
                                                 "invalid choice: 'x'")
    assert failure_reason("", None) == "vLLM failed to start: no output"
    pydantic = ("(APIServer pid=3) WARNING ulimit: failed with error current limit exceeds maximum limit\n"
                "pydantic_core._pydantic_core.ValidationError: 1 validation error for ModelConfig\n"
                "  Value error, User-specified max_model_len (999999) is greater than the derived max_model_len\n"
                "    For further information visit https://errors.pydantic.dev/2.14/v/value_error\n")
    assert failure_reason(pydantic, 1) == ("vLLM failed to start (exit code 1): ValidationError: 1 validation error "
                                           "for ModelConfig: User-specified max_model_len (999999) is greater than "
                                           "the derived max_model_len")


def test_settings_pass_through_to_the_vllm_command(tmp_path):
    settings = ServerSettings(backend="vllm", vllm_python=sys.executable, vllm_tensor_parallel_size=4,
                              vllm_pipeline_parallel_size=2, vllm_gpu_memory_utilization=0.8,
                              vllm_max_model_len=4096, vllm_extra_args="--distributed-executor-backend ray")
    config = settings.engine_config().vllm
    export = VllmExport(path=tmp_path, arch="seq_cls", architecture="x", end_id=1, state_id=2, hidden_size=8,
                        max_seq_len=8192)
    cmd = server_command(export, config, tmp_path / "s.sock", "cuda")
    assert cmd[0] == sys.executable
    pairs = dict(zip(cmd, cmd[1:]))
    assert pairs["--tensor-parallel-size"] == "4" and pairs["--pipeline-parallel-size"] == "2"
    assert pairs["--dtype"] == "bfloat16" and pairs["--gpu-memory-utilization"] == "0.8"
    assert pairs["--max-model-len"] == "4096" and pairs["--uds"] == str(tmp_path / "s.sock")
    assert cmd[-2:] == ["--distributed-executor-backend", "ray"]
    cpu_cmd = server_command(export, VllmConfig(), tmp_path / "s.sock", "cpu")
    assert "--gpu-memory-utilization" not in cpu_cmd and cpu_cmd[cpu_cmd.index("--dtype") + 1] == "float32"
    assert cpu_cmd[cpu_cmd.index("--max-model-len") + 1] == "8192"  # the checkpoint's own limit
