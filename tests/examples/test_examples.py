"""Every script under examples/ runs as `python examples/NAME.py --url URL` (its __main__, with those arguments,
in this process) against a real HTTP server of the shipped checkpoint (uvicorn on 127.0.0.1, in a thread)."""

from __future__ import annotations

import contextlib
import io
import json
import runpy
import sys

import pytest

from clients import PRMClient
from service.api.app import create_app
from service.engine.engine import EngineConfig, PRMEngine
from tests.conftest import REPO
from tests.reliability.helpers import ThreadedServer

SHIPPED = REPO / "model_store" / "checkpoints" / "agentprm-babyai-small" / "1"


@pytest.fixture(scope="module")
def shipped_server():
    engine = PRMEngine.from_checkpoint(SHIPPED, EngineConfig(device="cpu"))
    with ThreadedServer(create_app(engine)) as server:
        yield server.url


def run_example(name: str, url: str, *args: str) -> str:
    out = io.StringIO()
    argv = sys.argv
    sys.argv = [str(REPO / "examples" / name), "--url", url, *args]
    try:
        with contextlib.redirect_stdout(out):
            runpy.run_path(sys.argv[0], run_name="__main__")
    finally:
        sys.argv = argv
    return out.getvalue()


def test_agent_loop_with_messages_picks_every_action_by_best_of_n(shipped_server):
    result = json.loads(run_example("agent_best_of_n.py", shipped_server, "--seed", "1").splitlines()[-1])
    assert result["task"] and 1 <= result["steps"] <= 20 and isinstance(result["success"], bool)
    for pick in result["picks"]:
        assert pick["scores"][pick["action"]] == max(pick["scores"].values())  # the Best-of-N winner was taken
    # Step t's assistant message sits at 2 + 2t: task, observation, then action/observation pairs.
    assert result["message_indices"] == [2 + 2 * t for t in range(result["steps"])]
    assert 0.0 <= result["final_promise"] <= 1.0


def test_openrlhf_format_reward_call(shipped_server):
    body = json.loads(run_example("openrlhf_reward.py", shipped_server))
    assert set(body) == {"rewards", "scores", "extra_logs"} and body["scores"] == body["rewards"]
    assert body["extra_logs"]["prm_num_steps"] == [2, 2]
    toward, away = body["rewards"]
    assert toward > away  # the trained PRM prefers walking to the ball over turning away and toggling a wall


def test_trl_reward_function_call(shipped_server):
    sys.path.insert(0, str(REPO / "examples"))
    try:
        import trl_reward
    finally:
        sys.path.remove(str(REPO / "examples"))
    result = json.loads(run_example("trl_reward.py", shipped_server))
    with PRMClient(shipped_server) as client:
        scored = client.score([{"messages": trl_reward.PROMPT + c} for c in trl_reward.COMPLETIONS])
    assert result["rewards"] == pytest.approx([r.score for r in scored.results], abs=1e-6)
    assert result["async_rewards"] == pytest.approx(result["rewards"], abs=1e-6)
