"""The shipped default checkpoint (model_store/checkpoints/agentprm-babyai-small/1, made by
`make default-checkpoint`): small, verified, says how it was made, and ranks BabyAI outcomes it never saw."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

pytest.importorskip("minigrid", reason="needs the envs extra (minigrid)")

from envs.evaluate import DataConfig, heldout_episodes, sample_heldout  # noqa: E402
from model_store.store import resolve_checkpoint  # noqa: E402
from service.engine.engine import EngineConfig, PRMEngine  # noqa: E402
from model_store.modeling import load_prm  # noqa: E402
from service.engine.types import Step, Trajectory  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
DEFAULT = REPO / "model_store" / "checkpoints" / "agentprm-babyai-small" / "1"


def test_default_checkpoint_is_small_verified_and_records_its_recipe():
    assert resolve_checkpoint("agentprm-babyai-small", None).resolve() == DEFAULT.resolve()  # what `serve` loads
    loaded = load_prm(DEFAULT)  # checks every file's sha256
    size = sum(p.stat().st_size for p in DEFAULT.rglob("*") if p.is_file())
    assert size <= 20 * 1024 * 1024
    training = loaded.manifest.training
    assert training.method == "agentprm"
    assert training.command.startswith("agentprm train --data ") and "--method agentprm" in training.command
    assert training.data["n_trajectories"] == 600 and len(training.data["sha256"]) == 64
    assert training.metrics["auc"] > 0.8  # validation AUC of the final-step promise, as the trainer measured it


def test_default_checkpoint_ranks_successes_above_failures_on_unseen_episodes():
    config = DataConfig()
    episodes = heldout_episodes(config, 3, test_seed=7, train_file=None)
    heldout = sample_heldout(config, episodes, 4, progress=False)
    trajectories = [t for samples in heldout["samples"] for t in samples]
    engine = PRMEngine.from_checkpoint(DEFAULT, EngineConfig(device="cpu"))

    async def score():
        await engine.start()
        try:
            jobs = [Trajectory(t["task"], tuple(Step(s["observation"], s["action"]) for s in t["steps"]))
                    for t in trajectories]
            return (await engine.score("default", jobs)).results
        finally:
            await engine.shutdown()

    scores = [r.score for r in asyncio.run(score())]
    wins = [s for s, t in zip(scores, trajectories) if t["reward"] > 0]
    losses = [s for s, t in zip(scores, trajectories) if t["reward"] == 0]
    assert wins and losses
    pairs = [(w > f) + 0.5 * (w == f) for w in wins for f in losses]
    assert sum(pairs) / len(pairs) > 0.75  # AUC over (success, failure) pairs; 0.5 is chance
