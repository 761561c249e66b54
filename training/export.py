"""Export a trained PRM as a model_store checkpoint that `agentprm serve` loads as is.

The weights go through `model_store.export.save_checkpoint` (fp32 safetensors, sha256 of every file, atomic
rename). `manifest.training` records what a reader needs to reproduce or judge the model:
method, beta, gamma, lambda (null where the method does not use them: beta and lambda only matter to
agentprm, gamma to agentprm, pvm and orm), data {path, sha256, n_trajectories, n_train, n_val, skipped_lines, ...},
metrics (the validation metrics of the exported weights, plus training throughput), labelling
{env_steps, ...} (the environment steps spent on labels: 0 for agentprm, pvm and orm), the init source,
the hyperparameters, and the exact command.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from model_store.export import save_checkpoint
from model_store.manifest import Manifest, Template, TrainingInfo
from model_store.modeling import PRMModel
from training.trainer import TrainConfig, TrainResult


def _finite(value):
    """JSON has no NaN: metrics that are undefined (an AUC with one class) are written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def training_info(config: TrainConfig, result: TrainResult, data: dict, labelling: dict, command: str,
                  init_source: str) -> TrainingInfo:
    agentprm = config.method == "agentprm"
    metrics = {k: _finite(v) for k, v in result.best.items()}
    metrics.update(train_steps=result.steps, epochs_run=result.epochs_run, stopped_early=result.stopped_early,
                   train_tokens=result.tokens, tokens_per_s=round(result.tokens_per_s, 1),
                   final_train_loss=_finite(result.history[-1]["loss"]) if result.history else None)
    hyper = {k: v for k, v in dataclasses.asdict(config).items() if k not in ("progress", "log_path", "method")}
    return TrainingInfo.model_validate({
        "method": config.method,
        "beta": config.beta if agentprm else None,
        "gamma": config.gamma if config.method in ("agentprm", "pvm", "orm") else None,
        "lambda": config.lam if agentprm else None,
        "data": data,
        "metrics": metrics,
        "command": command,
        "labelling": labelling,
        "init": init_source,
        "hyperparameters": hyper,
    })


def export_checkpoint(out: Path | str, model: PRMModel, tokenizer, template: Template, *, name: str, version: str,
                      max_seq_len: int, training: TrainingInfo, overwrite: bool = False) -> Manifest:
    return save_checkpoint(out, name=name, version=version, backbone=model.backbone, value_head=model.value_head,
                           tokenizer=tokenizer, template=template, max_seq_len=max_seq_len, training=training,
                           activation=model.activation, overwrite=overwrite)
