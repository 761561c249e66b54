"""The PRM module: a transformers backbone plus a linear value head read at readout positions only.

`PRMModel` is the one definition shared by serving (service.engine.runner) and training (training/):
promise = activation(value_head(h[readout])). The head never sees non-readout positions (gather first,
then project). `load_prm` builds it from a verified checkpoint: safetensors only, shapes checked,
`trust_remote_code` never set.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from model_store.manifest import Manifest
from model_store.store import CheckpointError, verify_checkpoint
from service.engine.kernels import value_head_readout

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_backbone(config_dict: dict, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A randomly initialised transformers base model (no LM head) from a config dict."""
    from transformers import AutoConfig, AutoModel

    config_dict = dict(config_dict)
    model_type = config_dict.pop("model_type", "qwen2")
    for key in ("architectures", "transformers_version", "torch_dtype", "dtype"):
        config_dict.pop(key, None)
    config = AutoConfig.for_model(model_type, **config_dict)
    return AutoModel.from_config(config, attn_implementation="sdpa", dtype=dtype)


class PRMModel(nn.Module):
    def __init__(self, backbone: nn.Module, activation: str = "sigmoid"):
        super().__init__()
        self.backbone = backbone
        hidden = backbone.config.hidden_size
        self.value_head = nn.Linear(hidden, 1, dtype=next(backbone.parameters()).dtype)
        self.activation = activation

    @property
    def hidden_size(self) -> int:
        return self.value_head.in_features

    def hidden_states(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None):
        """Last hidden states [B, T, H] (and the KV cache when one is passed in or asked for)."""
        out = self.backbone(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=past_key_values is not None,
        )
        return out.last_hidden_state, out.past_key_values

    def readout(self, hidden: torch.Tensor, flat_index: torch.Tensor) -> torch.Tensor:
        """Promises [N] at `flat_index` (indices into the flattened [B*T] positions) of hidden [B, T, H]."""
        logits = value_head_readout(hidden.reshape(-1, hidden.shape[-1]), flat_index, self.value_head.weight,
                                    self.value_head.bias)
        return torch.sigmoid(logits) if self.activation == "sigmoid" else logits

    def forward(self, input_ids, attention_mask, flat_index):
        hidden, _ = self.hidden_states(input_ids, attention_mask)  # [B, T, H]
        return self.readout(hidden, flat_index)  # [N]


@dataclass
class LoadedPRM:
    manifest: Manifest
    model: PRMModel
    tokenizer: "object"  # tokenizers.Tokenizer
    path: Path


def load_tokenizer(path: Path, manifest: Manifest):
    from tokenizers import Tokenizer

    tok_file = path / "tokenizer" / "tokenizer.json"
    try:
        tokenizer = Tokenizer.from_file(str(tok_file))
    except Exception as exc:  # tokenizers raises plain Exception subclasses
        raise CheckpointError(f"{tok_file}: cannot be read as a tokenizers file ({exc})") from None
    for marker in manifest.template.markers():
        if tokenizer.token_to_id(marker) is None:
            raise CheckpointError(f"{tok_file}: template marker {marker!r} is not a token of this tokenizer")
    return tokenizer


def _load_tensors(file: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(file))
    except Exception as exc:
        raise CheckpointError(f"{file}: not a readable safetensors file ({exc})") from None


def _assign(module: nn.Module, tensors: dict[str, torch.Tensor], source: Path) -> None:
    expected = module.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{source}: tensor names do not match the config (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]})")
    for name, tensor in tensors.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise CheckpointError(f"{source}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                                  f"the config needs {tuple(expected[name].shape)}")
    module.load_state_dict(tensors, strict=True)


def load_prm(path: Path | str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> LoadedPRM:
    """Verify a checkpoint (checksums, schema, shapes) and build the PRM on `device`. All or nothing."""
    path = Path(path)
    manifest = verify_checkpoint(path)
    dtype = dtype or DTYPES[manifest.dtype]
    import json

    config_file = path / "backbone" / "config.json"
    try:
        config_dict = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{config_file}: not valid JSON ({exc})") from None
    try:
        backbone = build_backbone(config_dict, dtype=torch.float32)
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{config_file}: cannot build the backbone ({exc})") from None
    weights: dict[str, torch.Tensor] = {}
    weight_files = sorted(rel for rel in manifest.files if rel.startswith("backbone/") and rel.endswith(".safetensors"))
    for rel in weight_files:
        weights.update(_load_tensors(path / rel))
    _assign(backbone, weights, path / (weight_files[0] if len(weight_files) == 1 else "backbone"))
    model = PRMModel(backbone, activation=manifest.value_head.activation)
    head_file = path / "value_head.safetensors"
    head = _load_tensors(head_file)
    if manifest.value_head.in_features != model.hidden_size:
        raise CheckpointError(f"{path / 'manifest.json'}: value_head.in_features={manifest.value_head.in_features} "
                              f"but the backbone hidden size is {model.hidden_size}")
    _assign(model.value_head, head, head_file)
    model = model.to(device=device, dtype=dtype).eval()
    tokenizer = load_tokenizer(path, manifest)
    return LoadedPRM(manifest=manifest, model=model, tokenizer=tokenizer, path=path)
