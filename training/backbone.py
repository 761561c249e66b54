"""The PRM to train, its tokenizer and template, from one of four starting points (`--init`):

- nothing: a small default Qwen2 config (`DEFAULT_SIZE`, `--layers/--hidden` override) and a byte-level BPE
  trained on the data's own text (tasks, observations, actions) with the template markers as special tokens;
- a config JSON file: the backbone built from scratch from that config (model_type defaults to qwen2), the
  tokenizer trained on the data as above (vocab_size taken from the config, capped by what BPE learns);
- a Hugging Face model folder (config.json, *.safetensors, tokenizer.json): the base model's weights are
  loaded from safetensors only (pickle weights are refused, trust_remote_code is never set), a causal LM's
  "model." prefix is stripped and its LM head dropped; the template markers are added to its tokenizer as
  special tokens and the embeddings grown if needed;
- an AgentPRM checkpoint folder (manifest.json): verified and loaded as served, value head and template
  included (continued training).

The model is the serving `PRMModel` (one code path). A new value head starts near zero with its bias at the
logit of the data's mean outcome, so the first promises are the base rate rather than noise.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from model_store.export import PAD_TOKEN, train_tokenizer
from model_store.manifest import MANIFEST_FILE, Template
from model_store.modeling import (PRMModel, build_backbone, load_prm, load_weights, read_hf_config_and_tokenizer,
                                  read_safetensors_folder)
from model_store.store import CheckpointError
from training.defaults import DEFAULT_SIZE


class InitError(ValueError):
    """The --init source cannot be used; the message names the file."""


@dataclass
class Initialized:
    model: PRMModel
    tokenizer: object  # tokenizers.Tokenizer
    template: Template
    source: str  # what the model started from, recorded in the manifest
    trained_head: bool = False  # True when the value head came with the init (checkpoint)


def qwen2_config(vocab_size: int, pad_id: int, layers: int, hidden: int, max_seq_len: int,
                 heads: int | None = None, kv_heads: int | None = None) -> dict:
    heads = heads or max(1, hidden // 32)
    kv_heads = kv_heads or max(1, heads // 2)
    if hidden % heads or heads % kv_heads:
        raise InitError(f"--hidden {hidden} must be divisible by {heads} heads and heads by {kv_heads} kv heads")
    # Weights start at std 1/sqrt(hidden), not transformers' 0.02: at 0.02 a 64-128 wide model's attention
    # logits start near zero (uniform attention) and their gradients are second order, so training sits on a
    # plateau that only some seeds leave (on the door-matching task: validation AUC 0.5 for 2 of 3 seeds after
    # 544 steps at 0.02; see training/README or the issue note for the measurement).
    return {"model_type": "qwen2", "vocab_size": vocab_size, "hidden_size": hidden, "intermediate_size": 4 * hidden,
            "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
            "max_position_embeddings": max_seq_len, "rope_theta": 10000.0, "tie_word_embeddings": False,
            "pad_token_id": pad_id, "initializer_range": round(hidden ** -0.5, 6)}


def init_value_head(model: PRMModel, base_rate: float) -> None:
    rate = min(max(base_rate, 0.05), 0.95)
    with torch.no_grad():
        model.value_head.weight.normal_(0.0, 0.02)
        model.value_head.bias.fill_(math.log(rate / (1 - rate)))


def _data_tokenizer(template: Template, corpus: str, vocab: int):
    return train_tokenizer(template.markers(), vocab_size=vocab, corpus=corpus)


def _from_scratch(config: dict, corpus: str, vocab: int, template: Template, max_seq_len: int, source: str
                  ) -> Initialized:
    tokenizer = _data_tokenizer(template, corpus, vocab)
    config = dict(config)
    config["vocab_size"] = tokenizer.get_vocab_size()
    config["pad_token_id"] = tokenizer.token_to_id(PAD_TOKEN)
    config["max_position_embeddings"] = max(int(config.get("max_position_embeddings", 0)), max_seq_len)
    try:
        backbone = build_backbone(config)
    except (ValueError, KeyError, TypeError) as exc:
        raise InitError(f"{source}: cannot build a backbone from this config ({exc})") from None
    return Initialized(PRMModel(backbone), tokenizer, template, source)


def _hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    try:
        return read_safetensors_folder(folder)
    except CheckpointError as exc:
        raise InitError(str(exc)) from None


def _from_hf_folder(folder: Path, template: Template, max_seq_len: int) -> Initialized:
    from tokenizers import AddedToken

    try:
        config, tokenizer = read_hf_config_and_tokenizer(folder)
    except CheckpointError as exc:
        raise InitError(str(exc)) from None
    new = [m for m in (PAD_TOKEN, *template.markers()) if tokenizer.token_to_id(m) is None]
    tokenizer.add_special_tokens([AddedToken(m, special=True, normalized=False) for m in new])
    try:
        backbone = build_backbone(config)
    except (ValueError, KeyError, TypeError) as exc:
        raise InitError(f"{folder / 'config.json'}: cannot build the backbone ({exc})") from None
    expected = backbone.state_dict()
    weights = {}
    for name, tensor in _hf_weights(folder).items():
        for key in (name, name.removeprefix("model.")):
            if key in expected:
                weights[key] = tensor
                break
    missing = sorted(set(expected) - set(weights))
    if missing:
        raise InitError(f"{folder}: the safetensors weights lack {len(missing)} backbone tensors "
                        f"(first: {missing[:3]}); is this a {config.get('model_type')} base or causal-LM model?")
    try:
        load_weights(backbone, {k: v.float() for k, v in weights.items()}, folder)
    except CheckpointError as exc:
        raise InitError(str(exc)) from None
    if tokenizer.get_vocab_size() > backbone.get_input_embeddings().num_embeddings:
        backbone.resize_token_embeddings(tokenizer.get_vocab_size())
    if backbone.config.pad_token_id is None:
        backbone.config.pad_token_id = tokenizer.token_to_id(PAD_TOKEN)
    if getattr(backbone.config, "max_position_embeddings", max_seq_len) < max_seq_len:
        raise InitError(f"{folder}: the model supports {backbone.config.max_position_embeddings} positions, "
                        f"fewer than --max-seq-len {max_seq_len}")
    return Initialized(PRMModel(backbone), tokenizer, template, f"hf:{folder}")


def initialize(init: str | None, corpus: str, max_seq_len: int, base_rate: float, seed: int = 0,
               layers: int | None = None, hidden: int | None = None, vocab: int | None = None) -> Initialized:
    """The model, tokenizer and template to train (module docstring). Deterministic for a seed."""
    torch.manual_seed(seed)
    template = Template()
    if init is None:
        config = qwen2_config(0, 0, layers or DEFAULT_SIZE["layers"], hidden or DEFAULT_SIZE["hidden"], max_seq_len)
        out = _from_scratch(config, corpus, vocab or DEFAULT_SIZE["vocab"], template, max_seq_len, "default-qwen2")
    else:
        path = Path(init).expanduser()
        if path.is_file():
            try:
                config = json.loads(path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise InitError(f"{path}: not a JSON config ({exc})") from None
            if not isinstance(config, dict):
                raise InitError(f"{path}: expected a JSON object (a transformers config)")
            if layers:
                config["num_hidden_layers"] = layers
            if hidden:
                config["hidden_size"] = hidden
            size = vocab or int(config.get("vocab_size") or DEFAULT_SIZE["vocab"])
            out = _from_scratch(config, corpus, size, template, max_seq_len, f"config:{path}")
        elif (path / MANIFEST_FILE).is_file():
            loaded = load_prm(path, device="cpu", dtype=torch.float32)
            head, tpl = loaded.manifest.value_head.kind, loaded.manifest.template.kind
            if head != "linear" or tpl != "marker":  # an imported public PRM (README, "Serving public PRMs")
                raise InitError(f"{path}: a {head} head with a {tpl} template is served as imported; training "
                                "continues linear heads on marker templates only")
            if loaded.manifest.max_seq_len < max_seq_len:
                raise InitError(f"{path}: the checkpoint's max_seq_len is {loaded.manifest.max_seq_len}, "
                                f"below --max-seq-len {max_seq_len}")
            out = Initialized(loaded.model.train(), loaded.tokenizer, loaded.manifest.template,
                              f"checkpoint:{loaded.manifest.ref}", trained_head=True)
        elif (path / "config.json").is_file():
            out = _from_hf_folder(path, template, max_seq_len)
        else:
            raise InitError(f"{path}: not a config JSON file, a Hugging Face model folder (config.json) "
                            f"or an AgentPRM checkpoint ({MANIFEST_FILE})")
    if not out.trained_head:
        init_value_head(out.model, base_rate)
    return out
