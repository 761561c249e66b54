"""Importers: a model from the ecosystem, converted, scores exactly like the source model's own head."""

from __future__ import annotations

import asyncio

import pytest
import torch
from safetensors.torch import save_file
from transformers import Qwen2Config, Qwen2ForSequenceClassification

from model_store.export import train_tokenizer
from model_store.importers import import_value_model
from model_store.manifest import Template
from model_store.store import CheckpointError
from service.engine.engine import EngineConfig, PRMEngine
from tests.conftest import make_trajectory


def _seq_cls_source(path, with_markers=True):
    markers = Template().markers() if with_markers else []
    tokenizer = train_tokenizer(markers, vocab_size=300)
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=tokenizer.get_vocab_size(), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, num_labels=1,
                         max_position_embeddings=512, pad_token_id=0)
    model = Qwen2ForSequenceClassification(config).eval()
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save(str(path / "tokenizer.json"))
    return model


def _served_promises(checkpoint, trajectory):
    engine = PRMEngine.from_checkpoint(checkpoint, EngineConfig(device="cpu", prefix_cache_bytes=0))

    async def go():
        await engine.start()
        try:
            return (await engine.score("default", [trajectory])).results[0]
        finally:
            await engine.shutdown()
    return engine, asyncio.run(go())


def test_seq_cls_import_scores_like_the_source_head(tmp_path):
    src = tmp_path / "src"
    model = _seq_cls_source(src)
    manifest = import_value_model(src, tmp_path / "out", name="imported").manifest
    assert manifest.training.method == "imported:seq-cls" and manifest.value_head.activation == "sigmoid"
    trajectory = make_trajectory("go to the red ball", 4)
    engine, result = _served_promises(tmp_path / "out", trajectory)
    rendered = engine.renderer.render(trajectory)
    with torch.no_grad():
        hidden = model.model(torch.tensor([rendered.ids])).last_hidden_state[0]  # [T, H]
        expected = torch.sigmoid(model.score(hidden)[list(rendered.step_readouts), 0])
    served = torch.tensor([s.promise for s in result.steps])
    assert torch.allclose(served, expected, atol=1e-5)


def test_trl_and_openrlhf_heads_are_recognised(tmp_path):
    src = tmp_path / "src"
    model = _seq_cls_source(src)
    tensors = {f"pretrained_model.{k}": v for k, v in model.state_dict().items() if not k.startswith("score.")}
    tensors["v_head.summary.weight"] = model.score.weight.detach().clone()
    tensors["v_head.summary.bias"] = torch.tensor([0.5])
    (src / "model.safetensors").unlink()
    save_file(tensors, str(src / "model.safetensors"))
    trl = import_value_model(src, tmp_path / "trl", name="trl").manifest
    assert trl.training.method == "imported:trl" and trl.value_head.activation == "identity"

    openrlhf = {k: v for k, v in model.state_dict().items() if not k.startswith("score.")}
    openrlhf["value_head.weight"] = model.score.weight.detach().clone()
    save_file(openrlhf, str(src / "model.safetensors"))
    assert import_value_model(src, tmp_path / "orl", name="orl").manifest.training.method == "imported:openrlhf"
    # Same backbone and head weights, different activation: identity(logit) vs sigmoid(logit).
    trajectory = make_trajectory("t", 2)
    _, a = _served_promises(tmp_path / "trl", trajectory)
    _, b = _served_promises(tmp_path / "orl", trajectory)
    logit = b.steps[-1].promise
    assert a.steps[-1].promise - 0.5 == pytest.approx(torch.logit(torch.tensor(logit)).item(), abs=1e-4)


def test_missing_markers_are_added_without_touching_existing_embeddings(tmp_path):
    src = tmp_path / "src"
    model = _seq_cls_source(src, with_markers=False)
    import_value_model(src, tmp_path / "out", name="m")
    engine = PRMEngine.from_checkpoint(tmp_path / "out", EngineConfig(device="cpu"))
    old = model.model.embed_tokens.weight
    new = engine.loaded.model.backbone.get_input_embeddings().weight
    assert new.shape[0] == old.shape[0] + 5
    assert torch.equal(new[: old.shape[0]], old)
    assert torch.allclose(new[-1], old.mean(dim=0))


def test_pickle_only_sources_are_refused(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text("{}")
    (src / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin.*convert them to safetensors"):
        import_value_model(src, tmp_path / "out", name="x")
