"""Tiny PRMs of two architectures (Qwen2, Llama) and the fork data, for the training-at-scale tests.

Used in the test process and in the 2-process FSDP worker (tests/training/fsdp_worker.py), so both build
the same model from the same seed.
"""

from __future__ import annotations

import os
from pathlib import Path

from model_store.render import Renderer
from tests.training.synthetic import make_dataset
from training.backbone import initialize, qwen2_config
from training.data import corpus_text, data_summary, initial_value_targets, split_by_group, write_jsonl
from training.sharding import ScaleConfig
from training.trainer import TrainConfig, Trainer, make_examples

MAX_SEQ_LEN = 512


def llama_config(layers: int = 2, hidden: int = 32) -> dict:
    return {"model_type": "llama", "vocab_size": 600, "hidden_size": hidden, "intermediate_size": 2 * hidden,
            "num_hidden_layers": layers, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": MAX_SEQ_LEN, "tie_word_embeddings": False}


def config_file(arch: str, folder: Path) -> Path:
    import json

    config = llama_config() if arch == "llama" else qwen2_config(600, 0, 2, 32, MAX_SEQ_LEN)
    path = Path(folder) / f"{arch}-{os.getpid()}.json"  # one per process: the FSDP workers share `folder`
    path.write_text(json.dumps(config))
    return path


def fork_file(folder: Path) -> Path:
    return write_jsonl(make_dataset(12, 4), Path(folder) / "fork.jsonl")


def setup(arch: str, folder: Path, seed: int = 0):
    """(init, train examples, validation examples) for `arch` on the fork data; deterministic."""
    from training.data import load_jsonl

    data = Path(folder) / "fork.jsonl"
    records = load_jsonl(data if data.exists() else fork_file(folder))
    train, val = split_by_group(records, 0.2, seed)
    init = initialize(str(config_file(arch, folder)), corpus_text(records), MAX_SEQ_LEN,
                      base_rate=data_summary(train)["success_rate"], seed=seed)
    renderer = Renderer(init.tokenizer, init.template)
    train_ex, _ = make_examples(train, renderer, MAX_SEQ_LEN, initial_value_targets(train))
    val_ex, _ = make_examples(val, renderer, MAX_SEQ_LEN, initial_value_targets(val))
    return init, train_ex, val_ex


def trainer(init, info=None, scale: ScaleConfig | None = None, **config) -> Trainer:
    from training.trainer import DistInfo

    settings = dict(method="agentprm", epochs=2, lr=3e-3, batch_size=8, max_batch_tokens=180, seed=0,
                    progress=False, eval_every=2, patience=100)
    settings.update(config)
    return Trainer(init.model, TrainConfig(**settings), init.model.backbone.config.pad_token_id, "cpu",
                   info or DistInfo(), scale)
