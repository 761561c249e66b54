"""The PRM model at the bottom of the package graph: a transformers backbone plus a value head (linear, or an
imported kind: model_store/heads.py) read at readout positions only.

`PRMModel` is the one definition shared by serving (service.engine), training (training/) and the store's
importers (model_store.importers): promise = activation(value_head(h[readout])). The head never sees
non-readout positions (gather first, then project). Weights come in through one shape-checked door:
`read_safetensors` (safetensors only, pickle refused) and `load_weights` (names and shapes must match the
config). `load_prm` builds the PRM from a verified checkpoint; `trust_remote_code` is never set.
This module imports nothing from service/ or training/ (docs/ARCHITECTURE.md, "Layers").
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from model_store.heads import build_head, head_readout
from model_store.kernels import value_head_readout
from model_store.manifest import Manifest, ValueHeadSpec
from model_store.store import PICKLE_SUFFIXES, CheckpointError, verify_checkpoint

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(device: str) -> torch.device:
    """`auto` -> cuda when available, else cpu; an explicit cuda device without CUDA is a clear error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    return torch.device(device)


def default_dtype(device: torch.device) -> torch.dtype:
    # bf16 on a GPU; fp32 on a CPU, where bf16 without hardware support is ~100x slower.
    return torch.bfloat16 if device.type == "cuda" else torch.float32


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
    def __init__(self, backbone: nn.Module, activation: str = "sigmoid", head: ValueHeadSpec | None = None):
        super().__init__()
        self.backbone = backbone
        hidden = backbone.config.hidden_size
        # `head`: an imported checkpoint's head kind (model_store/heads.py); training builds the linear default.
        self.head_spec = head or ValueHeadSpec(in_features=hidden, activation=activation)
        self.value_head = build_head(self.head_spec, hidden, dtype=next(backbone.parameters()).dtype)
        self.activation = self.head_spec.activation

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
        if self.head_spec.kind != "linear" or self.head_spec.normalisation is not None:
            return head_readout(self.value_head, self.head_spec, hidden.reshape(-1, hidden.shape[-1]), flat_index)
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


def read_safetensors(files: list[Path]) -> dict[str, torch.Tensor]:
    """The tensors of safetensors files, merged; an unreadable file is a CheckpointError naming it."""
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            tensors.update(load_file(str(file)))
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(f"{file}: not a readable safetensors file ({exc})") from None
    return tensors


def read_safetensors_folder(folder: Path) -> dict[str, torch.Tensor]:
    """Every *.safetensors file of a (Hugging Face) model folder; pickle weights are never loaded."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickled = sorted(p.name for p in folder.iterdir() if p.name.endswith(PICKLE_SUFFIXES))
        hint = (f" (found {', '.join(pickled)}: pickle weights are never loaded; convert them to safetensors)"
                if pickled else "")
        raise CheckpointError(f"{folder}: no *.safetensors weights{hint}")
    return read_safetensors(files)


def load_weights(module: nn.Module, tensors: dict[str, torch.Tensor], source: Path) -> None:
    """Assign `tensors` to `module` when the names and every shape match its config, else CheckpointError
    naming `source` (load_state_dict alone would fail with a traceback-sized RuntimeError)."""
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

    config_file = path / "backbone" / "config.json"
    try:
        config_dict = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{config_file}: not valid JSON ({exc})") from None
    try:
        backbone = build_backbone(config_dict, dtype=torch.float32)
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{config_file}: cannot build the backbone ({exc})") from None
    weight_files = sorted(rel for rel in manifest.files if rel.startswith("backbone/") and rel.endswith(".safetensors"))
    weights = read_safetensors([path / rel for rel in weight_files])
    load_weights(backbone, weights, path / (weight_files[0] if len(weight_files) == 1 else "backbone"))
    model = PRMModel(backbone, head=manifest.value_head)
    head_file = path / "value_head.safetensors"
    head = read_safetensors([head_file])
    if manifest.value_head.in_features != model.hidden_size:
        raise CheckpointError(f"{path / 'manifest.json'}: value_head.in_features={manifest.value_head.in_features} "
                              f"but the backbone hidden size is {model.hidden_size}")
    load_weights(model.value_head, head, head_file)
    model = model.to(device=device, dtype=dtype).eval()
    tokenizer = load_tokenizer(path, manifest)
    return LoadedPRM(manifest=manifest, model=model, tokenizer=tokenizer, path=path)
