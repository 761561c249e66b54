"""Training at scale on one process: LoRA, checkpoint/resume, streaming data, token-budget batches, the CLI.

Tiny random models of two architectures (Qwen2, Llama) built from configs; the fork data of synthetic.py.
The 2-process FSDP tests are in test_scale_distributed.py.
"""

from __future__ import annotations

import json

import pytest
import torch

from model_store.store import verify_checkpoint
from model_store.modeling import load_prm
from model_store.render import Renderer
from tests.training.scale_setup import MAX_SEQ_LEN, config_file, fork_file, setup, trainer
from training.cli import main
from training.data import write_jsonl
from training.sharding import ScaleConfig
from training.streaming import DataIndex, StreamingExamples, plan_batches


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("scale")
    fork_file(folder)
    return folder


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_lora_trains_only_adapters_marker_rows_and_head_and_merges_exactly(folder, arch):
    init, train_ex, val_ex = setup(arch, folder)
    before = weights(init.model)
    markers = [init.tokenizer.token_to_id(m) for m in init.template.markers()]
    t = trainer(init, scale=ScaleConfig(lora_rank=4, lora_token_ids=markers), epochs=1, eval_every=0)
    trainable = {n for n, p in t.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "trainable_tokens" in n or n.startswith("value_head.")
                             for n in trainable), sorted(trainable)[:5]
    assert {"value_head.weight", "value_head.bias"} <= trainable
    # every target projection of every layer carries an adapter
    assert sum("lora_A" in n for n in trainable) == 7 * init.model.backbone.config.num_hidden_layers

    result = t.fit(train_ex, val_ex)
    assert result.steps == 5
    got_grad = {n for n, p in t.model.named_parameters() if p.grad is not None}
    assert got_grad <= trainable  # a frozen weight never received a gradient
    base = t.model.backbone.get_base_model().state_dict()
    for name, tensor in before.items():
        if name.startswith("backbone."):
            key = name.removeprefix("backbone.")
            frozen = base.get(key, base.get(key.replace("embed_tokens.", "embed_tokens.token_adapter.base_layer.")))
            if frozen is None:  # peft renames a wrapped projection's weight to base_layer.weight
                frozen = base[key.rsplit(".", 1)[0] + ".base_layer." + key.rsplit(".", 1)[1]]
            assert torch.equal(frozen, tensor), name  # the base model did not move
    assert not torch.equal(t.model.value_head.weight, before["value_head.weight"])

    unmerged = t.predict(val_ex)
    merged_model = t.export_model()
    assert type(merged_model.backbone).__name__ == type(init.model.backbone).__name__
    assert set(merged_model.backbone.state_dict()) == {k.removeprefix("backbone.") for k in before
                                                       if k.startswith("backbone.")}
    merged = t.predict(val_ex)  # the trainer's model is now the merged one
    for a, b in zip(unmerged, merged):
        assert abs(a - b).max() <= 1e-5
    # the adapters did change the backbone (merged != base)
    assert any(not torch.equal(merged_model.backbone.state_dict()[k.removeprefix("backbone.")], v)
               for k, v in before.items() if k.startswith("backbone.") and "proj" in k)


@pytest.mark.parametrize("arch, scale", [("llama", {}), ("qwen2", {"lora_rank": 4, "activation_checkpointing": True})])
def test_resume_after_a_stop_ends_with_the_uninterrupted_weights(folder, tmp_path, arch, scale):
    init, train_ex, val_ex = setup(arch, folder)
    straight = trainer(init, scale=ScaleConfig(**scale))
    straight_result = straight.fit(train_ex, val_ex)
    assert straight_result.steps == 10

    ckpt = str(tmp_path / "ckpt")
    init, _, _ = setup(arch, folder)
    first = trainer(init, scale=ScaleConfig(**scale, checkpoint_dir=ckpt, checkpoint_every=2, stop_after=5))
    stopped = first.fit(train_ex, val_ex)
    assert stopped.interrupted and stopped.steps == 5
    assert sorted(p.name for p in (tmp_path / "ckpt").glob("step-*")) == ["step-000004", "step-000005"]

    init, _, _ = setup(arch, folder)  # a fresh process: same --init and seed, then the checkpoint
    resumed = trainer(init, scale=ScaleConfig(**scale, checkpoint_dir=ckpt, resume=True))
    result = resumed.fit(train_ex, val_ex)
    assert [h["loss"] for h in result.history] == [h["loss"] for h in straight_result.history]
    assert json.dumps(result.evals) == json.dumps(straight_result.evals)  # (an AUC of one class is NaN)
    assert json.dumps(result.best) == json.dumps(straight_result.best)
    a, b = straight.export_model().state_dict(), resumed.export_model().state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_resume_refuses_a_checkpoint_of_another_run(folder, tmp_path):
    init, train_ex, val_ex = setup("llama", folder)
    ckpt = str(tmp_path / "ckpt")
    trainer(init, scale=ScaleConfig(checkpoint_dir=ckpt, stop_after=2)).fit(train_ex, val_ex)
    init, _, _ = setup("llama", folder)
    with pytest.raises(ValueError, match="different run.*lr"):
        trainer(init, scale=ScaleConfig(checkpoint_dir=ckpt, resume=True), lr=1e-3).fit(train_ex, val_ex)
    init, _, _ = setup("llama", folder)
    with pytest.raises(ValueError, match="no training checkpoint"):
        trainer(init, scale=ScaleConfig(checkpoint_dir=str(tmp_path / "none"), resume=True)).fit(train_ex, val_ex)


def test_streaming_gives_the_in_memory_examples_batches_and_weights(folder, tmp_path):
    init, train_ex, val_ex = setup("qwen2", folder)
    renderer = Renderer(init.tokenizer, init.template)
    # the same data as 3 shards in a directory
    rows = [json.loads(line) for line in (folder / "fork.jsonl").read_text().splitlines()]
    shards = tmp_path / "shards"
    for k in range(3):
        write_jsonl(rows[k * 16: (k + 1) * 16], shards / f"part-{k:02d}.jsonl")
    for source in (folder / "fork.jsonl", shards):
        index = DataIndex.scan(source)
        train_idx, val_idx = index.split(0.2, seed=0)
        streamed = StreamingExamples(index, train_idx, renderer, MAX_SEQ_LEN)
        assert len(streamed) == len(train_ex)
        for a, b in zip(streamed, train_ex):
            assert (a.ids, a.readouts, a.outcome, a.initial_target) == (b.ids, b.readouts, b.outcome, b.initial_target)
        val = StreamingExamples(index, val_idx, renderer, MAX_SEQ_LEN).materialize()
        assert [e.ids for e in val] == [e.ids for e in val_ex]
        for epoch in range(2):
            assert plan_batches(streamed.lengths, 8, 0, 0, epoch) == \
                plan_batches([len(e.ids) for e in train_ex], 8, 0, 0, epoch)

    in_memory = trainer(init)
    in_memory.fit(train_ex, val_ex)
    init2, _, _ = setup("qwen2", folder)
    index = DataIndex.scan(shards)
    train_idx, _ = index.split(0.2, seed=0)
    from_disk = trainer(init2)
    from_disk.fit(StreamingExamples(index, train_idx, Renderer(init2.tokenizer, init2.template), MAX_SEQ_LEN), val_ex)
    for (name, a), b in zip(in_memory.model.state_dict().items(), from_disk.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_token_budget_batches_cover_the_epoch_once_and_meet_the_budget():
    lengths = [50 + (i * 37) % 400 for i in range(101)]
    for world in (1, 2):
        batches = plan_batches(lengths, 8, 1000, seed=3, epoch=1, world=world)
        flat = [i for b in batches for i in b]
        assert len(flat) == len(set(flat)) and set(flat) <= set(range(101))
        assert all(sum(lengths[i] for i in b) >= 1000 and len(b) >= world for b in batches[:-1])
        assert len(set(range(101)) - set(flat)) <= (world - 1)  # only a final batch too small for the world
        # a batch stops as soon as it reaches the budget
        assert all(sum(lengths[i] for i in b[:-1]) < 1000 or len(b) <= world for b in batches[:-1])
    assert plan_batches(lengths, 8, 1000, 3, 1) != plan_batches(lengths, 8, 1000, 3, 2)  # reshuffled each epoch


def test_cli_lora_streaming_stop_resume_exports_a_verified_merged_checkpoint(folder, tmp_path, capsys):
    out, ckpt = tmp_path / "ckpt", tmp_path / "train-ckpt"
    argv = ["train", "--data", str(folder / "fork.jsonl"), "--method", "agentprm", "--out", str(out),
            "--init", str(config_file("llama", folder)), "--epochs", "1", "--batch-size", "8", "--lr", "3e-3",
            "--max-seq-len", str(MAX_SEQ_LEN), "--no-progress", "--val-fraction", "0.2", "--stream",
            "--lora-rank", "4", "--checkpoint-dir", str(ckpt), "--batch-tokens", "700"]
    assert main([*argv, "--stop-after", "2"]) == 0
    assert "continue with --resume" in capsys.readouterr().out and not out.exists()
    assert main([*argv, "--resume"]) == 0
    manifest = verify_checkpoint(out)
    assert manifest.training.model_extra["scale"]["lora_rank"] == 4
    assert manifest.training.model_extra["scale"]["batch_tokens"] == 700
    loaded = load_prm(out)
    assert type(loaded.model.backbone).__name__ == "LlamaModel"
    # LoRA with FSDP is refused with one line and exit 2, not a traceback
    assert main([*argv[:-6], "--lora-rank", "4", "--parallel", "fsdp", "--out", str(tmp_path / "x"),
                 "--checkpoint-dir", str(ckpt)]) == 2
    assert "not supported" in capsys.readouterr().err
