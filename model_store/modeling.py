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

import contextlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from model_store.heads import build_head, head_readout
from model_store.kernels import value_head_readout
from model_store.manifest import Manifest, ValueHeadSpec
from model_store.store import PICKLE_SUFFIXES, CheckpointError, verify_checkpoint

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
HEAD_DTYPE = torch.float32  # the value head, whatever the backbone's dtype


def nvidia_driver_present() -> bool:
    """An NVIDIA kernel driver is loaded on this host (or passed into this container)."""
    return Path("/proc/driver/nvidia/version").exists() or Path("/dev/nvidiactl").exists()


def pick_device(device: str) -> torch.device:
    """`auto` -> cuda when available, else cpu; an explicit cuda device without CUDA is a clear error. `auto`
    on a host with an NVIDIA driver that torch cannot use (a driver older than this torch's CUDA needs) falls
    back to the CPU with an error-level log line: serving a GPU model on the CPU is 100x slower, never silent."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.version.cuda and nvidia_driver_present():
            log.error("device auto: an NVIDIA driver is present but torch (CUDA %s) cannot use it, SERVING ON THE "
                      "CPU; this torch needs a driver for CUDA %s (>= 580 for CUDA 13): update the driver, or pass "
                      "--device cuda to fail instead", torch.version.cuda, torch.version.cuda)
        return torch.device("cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    return torch.device(device)


def activate_device(device: torch.device) -> None:
    """Make `device` the current CUDA device. Graph capture, Triton launches and tensors made without an
    explicit device use the current device, which stays cuda:0 unless set: `--device cuda:1` would capture
    and launch on the wrong GPU. A no-op off CUDA."""
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)


def default_dtype(device: torch.device) -> torch.dtype:
    # bf16 on a GPU; fp32 on a CPU, where bf16 without hardware support is ~100x slower.
    return torch.bfloat16 if device.type == "cuda" else torch.float32


@contextlib.contextmanager
def parameters_on_meta():
    """Parameters registered inside go to the meta device: shapes without memory (gpt-fast's meta build).
    Buffers stay real: non-persistent ones (RoPE's inv_freq) are computed in __init__ and not in checkpoints.
    A layer's `torch.empty` weight is dropped before anything writes it, so it never becomes resident."""
    register = nn.Module.register_parameter

    def register_on_meta(module, name, param):
        register(module, name, param)
        if param is not None and not param.is_meta:
            module._parameters[name] = type(param)(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def build_backbone(config_dict: dict, dtype: torch.dtype = torch.float32, empty: bool = False) -> nn.Module:
    """A transformers base model (no LM head) from a config dict: randomly initialised, or with `empty` its
    parameters on the meta device, to be assigned from a checkpoint (load_weights)."""
    from transformers import AutoConfig, AutoModel

    config_dict = dict(config_dict)
    model_type = config_dict.pop("model_type", "qwen2")
    for key in ("architectures", "transformers_version", "torch_dtype", "dtype"):
        config_dict.pop(key, None)
    config = AutoConfig.for_model(model_type, **config_dict)
    with parameters_on_meta() if empty else contextlib.nullcontext():
        return AutoModel.from_config(config, attn_implementation="sdpa", dtype=dtype)


class PRMModel(nn.Module):
    def __init__(self, backbone: nn.Module, activation: str = "sigmoid", head: ValueHeadSpec | None = None):
        super().__init__()
        self.backbone = backbone
        hidden = backbone.config.hidden_size
        # `head`: an imported checkpoint's head kind (model_store/heads.py); training builds the linear default.
        # The head is fp32 whatever the backbone's dtype (see _apply).
        self.head_spec = head or ValueHeadSpec(in_features=hidden, activation=activation)
        self.value_head = build_head(self.head_spec, hidden, dtype=HEAD_DTYPE).to(next(backbone.parameters()).device)
        self.activation = self.head_spec.activation

    def _apply(self, fn, recurse=True):
        # `.to(dtype)`, `.half()`, `.bfloat16()` cast the backbone only: the head stays fp32 with its exact values
        # (DESIGN.md, section 6), so serving reads the logits training produced (a bf16 head moves them ~1e-3).
        # The head follows device moves; its few weights are restored after a cast rounded them.
        exact = {name: p.detach().clone() for name, p in self.value_head.named_parameters()}
        super()._apply(fn, recurse)
        self.value_head.to(dtype=HEAD_DTYPE)
        with torch.no_grad():
            for name, p in self.value_head.named_parameters():
                p.copy_(exact[name])
        return self

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


def read_safetensors_as(files: list[Path], device: torch.device | str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The tensors of safetensors files, read one at a time onto `device` and cast to `dtype` (floating ones):
    the host never holds more than one tensor in the file's dtype, so an fp32 checkpoint loads in bf16 without
    a full fp32 copy."""
    from safetensors import safe_open

    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt", device=str(device)) as handle:
                for name in handle.keys():
                    tensor = handle.get_tensor(name)
                    tensors[name] = tensor.to(dtype) if tensor.is_floating_point() else tensor
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(f"{file}: not a readable safetensors file ({exc})") from None
    return tensors


def read_hf_config_and_tokenizer(folder: Path):
    """config.json (a dict) and tokenizer.json (a `tokenizers.Tokenizer`) of a Hugging Face model folder;
    CheckpointError naming the file when either is missing or unreadable."""
    from tokenizers import Tokenizer

    config_file = folder / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{config_file}: missing (a Hugging Face model folder is needed)")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{config_file}: not valid JSON ({exc})") from None
    tok_file = folder / "tokenizer.json"
    if not tok_file.is_file():
        raise CheckpointError(f"{tok_file}: missing (a tokenizers-format tokenizer file is needed)")
    try:
        tokenizer = Tokenizer.from_file(str(tok_file))
    except Exception as exc:  # tokenizers raises plain Exception subclasses
        raise CheckpointError(f"{tok_file}: cannot be read as a tokenizers file ({exc})") from None
    return config, tokenizer


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
    # A module built on the meta device (build_backbone(empty=True)) takes the tensors themselves: no copy.
    module.load_state_dict(tensors, strict=True, assign=any(t.is_meta for t in expected.values()))


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
    # Built on the meta device and assigned the checkpoint's tensors, read onto `device` in `dtype`: a 7B model
    # in bf16 needs ~15 GB on the device and one tensor at a time on the host, not a 30 GB fp32 CPU copy.
    try:
        backbone = build_backbone(config_dict, dtype=dtype, empty=True)
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{config_file}: cannot build the backbone ({exc})") from None
    weight_files = sorted(rel for rel in manifest.files if rel.startswith("backbone/") and rel.endswith(".safetensors"))
    weights = read_safetensors_as([path / rel for rel in weight_files], device, dtype)
    load_weights(backbone, weights, path / (weight_files[0] if len(weight_files) == 1 else "backbone"))
    del weights
    meta = [name for name, t in [*backbone.named_parameters(), *backbone.named_buffers()] if t.is_meta]
    if meta:
        raise CheckpointError(f"{path / 'backbone'}: {meta[:3]} not set by the checkpoint")
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
