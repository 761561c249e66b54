"""AgentPRM learns a task decided by one visible choice, and the exported checkpoint serves what it learned.

A tiny Qwen2 (2 layers, 64 wide) trains with the default method (TD + GAE targets, L_Q + L_A, lambda 0.95)
on random-policy walks of the synthetic fork task for a few CPU seconds, then is judged on walks from
initial states it never saw.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from service.engine.engine import EngineConfig, PRMEngine
from model_store.render import Renderer
from tests.training.synthetic import make_dataset
from training.backbone import initialize
from training.data import corpus_text, data_summary, initial_value_targets, load_jsonl, split_by_group, write_jsonl
from training.export import export_checkpoint, training_info
from training.trainer import TrainConfig, Trainer, make_examples, roc_auc

MAX_SEQ_LEN = 512


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("synthetic")
    records = load_jsonl(write_jsonl(make_dataset(90, 4), tmp / "train.jsonl"))
    held_out = load_jsonl(write_jsonl(make_dataset(60, 2, first_seed=10_000), tmp / "test.jsonl"))
    init = initialize(None, corpus_text(records), MAX_SEQ_LEN, base_rate=data_summary(records)["success_rate"],
                      seed=0, layers=2, hidden=64, vocab=512)
    renderer = Renderer(init.tokenizer, init.template)
    train, val = split_by_group(records, 0.1, seed=0)
    train_ex, skipped = make_examples(train, renderer, MAX_SEQ_LEN, initial_value_targets(train))
    val_ex, _ = make_examples(val, renderer, MAX_SEQ_LEN, initial_value_targets(val))
    test_ex, skipped_test = make_examples(held_out, renderer, MAX_SEQ_LEN, initial_value_targets(held_out))
    assert not skipped and not skipped_test
    config = TrainConfig(method="agentprm", epochs=4, lr=1e-3, batch_size=8, seed=0, progress=False)
    trainer = Trainer(init.model, config, init.model.backbone.config.pad_token_id)
    result = trainer.fit(train_ex, val_ex)
    return {"trainer": trainer, "result": result, "init": init, "held_out": held_out, "test_ex": test_ex,
            "predictions": trainer.predict(test_ex), "tmp": tmp}


def test_ranks_successes_above_failures_on_unseen_walks(trained):
    final = [float(p[-1]) for p in trained["predictions"]]
    success = [r.reward > 0 for r in trained["held_out"]]
    assert 0 < sum(success) < len(success)
    assert roc_auc(final, success) > 0.9
    assert trained["result"].best["auc"] > 0.9  # the trainer's own validation metric agrees


def test_promise_jumps_at_the_deciding_step(trained):
    up, down, elsewhere, largest_at_fork = [], [], [], 0
    for record, promises in zip(trained["held_out"], trained["predictions"]):
        changes = np.diff(promises)  # changes[t] = Q_t - Q_{t-1}, with Q_{-1} = V_0
        fork = record.meta["fork"]
        (up if record.reward > 0 else down).append(changes[fork])
        elsewhere.extend(abs(c) for t, c in enumerate(changes) if t != fork)
        largest_at_fork += int(np.argmax(np.abs(changes)) == fork)
    assert np.mean(up) > 0.2 and np.mean(down) < -0.2
    assert np.mean(elsewhere) < 0.1
    assert largest_at_fork >= 0.9 * len(trained["held_out"])


def test_exported_checkpoint_serves_the_trainers_promises(trained):
    init, trainer = trained["init"], trained["trainer"]
    out = trained["tmp"] / "ckpt"
    info = training_info(trainer.config, trained["result"], {"path": "train.jsonl"}, {"env_steps": 0}, "test",
                         "default")
    export_checkpoint(out, trainer.model, init.tokenizer, init.template, name="fork-prm", version="1",
                      max_seq_len=MAX_SEQ_LEN, training=info)
    engine = PRMEngine.from_checkpoint(out, EngineConfig(device="cpu"))

    async def score():
        await engine.start()
        try:
            return await engine.score("default", [r.trajectory() for r in trained["held_out"][:40]])
        finally:
            await engine.shutdown()

    served = asyncio.run(score())
    assert engine.info.method == "agentprm"
    for result, expected in zip(served.results, trained["predictions"][:40]):
        got = np.array([result.initial_value, *(s.promise for s in result.steps)])
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
