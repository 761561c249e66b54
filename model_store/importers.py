"""Import value-head models from the ecosystem into the AgentPRM checkpoint format.

Sources are Hugging Face folders (config.json, *.safetensors, tokenizer.json) holding a decoder backbone and
a scalar head, recognised by their tensor names:

| kind       | head tensors                              | produced by                              | activation |
| ---------- | ----------------------------------------- | ---------------------------------------- | ---------- |
| `seq-cls`  | `score.weight` [1, H]                     | AutoModelForSequenceClassification (1 label) | sigmoid |
| `openrlhf` | `value_head.weight` [1, H] (+ bias)       | OpenRLHF reward / critic models          | sigmoid    |
| `trl`      | `v_head.summary.weight` [1, H], `.bias`   | TRL AutoModelForCausalLMWithValueHead    | identity   |

Backbone tensors lose their wrapper prefix (`model.`, `pretrained_model.model.`, ...); LM heads are dropped.
Template markers missing from the tokenizer are added as special tokens and their embedding rows are set to
the mean embedding (the imported head has never seen our template: fine-tune before trusting its scores).
Pickle weights are refused; nothing is downloaded; `trust_remote_code` is never used.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from model_store.export import save_checkpoint
from model_store.manifest import Template, TrainingInfo
from model_store.modeling import build_backbone, load_weights, read_safetensors_folder
from model_store.store import CheckpointError

HEADS = {
    "seq-cls": ("score.weight", None, "sigmoid"),
    "openrlhf": ("value_head.weight", "value_head.bias", "sigmoid"),
    "trl": ("v_head.summary.weight", "v_head.summary.bias", "identity"),
}
BACKBONE_PREFIXES = ("pretrained_model.model.", "pretrained_model.", "model.", "transformer.")
DROPPED_PREFIXES = ("lm_head.", "pretrained_model.lm_head.", "v_head.", "score.", "value_head.")


def read_source(src: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    config_file = src / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{config_file}: missing (an importer needs a Hugging Face model folder)")
    tensors = read_safetensors_folder(src)
    try:
        return json.loads(config_file.read_text()), tensors
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{config_file}: not valid JSON ({exc})") from None


def detect_kind(tensors: dict[str, torch.Tensor]) -> str:
    for kind, (weight, _, _) in HEADS.items():
        if weight in tensors:
            return kind
    raise CheckpointError("no value head found (expected one of "
                          + ", ".join(w for w, _, _ in HEADS.values()) + ")")


def split_backbone(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    backbone = {}
    for name, tensor in tensors.items():
        if name.startswith(DROPPED_PREFIXES):
            continue
        for prefix in BACKBONE_PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix):]
                break
        backbone[name] = tensor
    return backbone


def import_value_model(src: Path | str, out: Path | str, *, name: str, version: str = "1", kind: str = "auto",
                       activation: str | None = None, max_seq_len: int | None = None, overwrite: bool = False):
    from tokenizers import Tokenizer

    src = Path(src)
    config, tensors = read_source(src)
    kind = detect_kind(tensors) if kind == "auto" else kind
    if kind not in HEADS:
        raise CheckpointError(f"unknown importer kind {kind!r}; expected auto or one of {', '.join(HEADS)}")
    weight_name, bias_name, default_activation = HEADS[kind]
    if weight_name not in tensors:
        raise CheckpointError(f"{src}: kind {kind!r} needs tensor {weight_name!r}, which is missing")
    weight = tensors[weight_name].float()
    if weight.ndim != 2 or weight.shape[0] != 1:
        raise CheckpointError(f"{src}: {weight_name} has shape {tuple(weight.shape)}; only a single output "
                              "(one label) can be a promise")
    bias = tensors[bias_name].float().reshape(1) if bias_name and bias_name in tensors else torch.zeros(1)

    tok_file = src / "tokenizer.json"
    if not tok_file.is_file():
        raise CheckpointError(f"{tok_file}: missing (a tokenizers-format tokenizer is required)")
    tokenizer = Tokenizer.from_file(str(tok_file))
    template = Template()
    missing = [m for m in template.markers() if tokenizer.token_to_id(m) is None]
    if missing:
        tokenizer.add_special_tokens(missing)

    try:
        backbone = build_backbone(config)
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{src / 'config.json'}: cannot build the backbone ({exc})") from None
    state = split_backbone(tensors)
    # Tensors the backbone does not use (a wrapper's extras) are dropped; missing ones or wrong shapes refuse.
    expected = backbone.state_dict()
    load_weights(backbone, {k: v for k, v in state.items() if k in expected}, src)
    vocab = tokenizer.get_vocab_size()
    embeddings = backbone.get_input_embeddings()
    if vocab > embeddings.weight.shape[0]:
        old = embeddings.weight.data
        backbone.resize_token_embeddings(vocab)
        with torch.no_grad():
            backbone.get_input_embeddings().weight[old.shape[0]:] = old.mean(dim=0)
    head = torch.nn.Linear(weight.shape[1], 1)
    with torch.no_grad():
        head.weight.copy_(weight)
        head.bias.copy_(bias)
    training = TrainingInfo(method=f"imported:{kind}", data={"source": str(src.resolve())})
    return save_checkpoint(out, name=name, version=version, backbone=backbone, value_head=head, tokenizer=tokenizer,
                           template=template, training=training, activation=activation or default_activation,
                           max_seq_len=max_seq_len or int(config.get("max_position_embeddings", 2048)),
                           overwrite=overwrite)
