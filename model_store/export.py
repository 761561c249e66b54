"""Write checkpoints: `save_checkpoint` (used by training and `model init-random`) and `init_random`.

A checkpoint is written to a temporary sibling directory and renamed into place once the manifest with
every sha256 is written, so a crash never leaves a half-written checkpoint that looks complete.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from model_store.manifest import Manifest, Template, TrainingInfo, ValueHeadSpec, write_manifest

PAD_TOKEN = "<|pad|>"

# A small built-in text for the byte-level BPE of random checkpoints: agent-style vocabulary.
_CORPUS = """
go to the red ball. pick up the blue key. open the yellow door. put the green box next to the purple ball.
You see a wall 2 steps ahead. You see a red ball 1 step ahead and 2 steps to the left. You carry nothing.
You see a closed blue door 3 steps ahead. The door is locked. You carry a yellow key. Nothing in view.
turn left. turn right. move forward. pick up. drop. toggle. done. search the kitchen for an apple.
Observation: the drawer is open. In it you see a knife and a spoon. Action: take the knife from the drawer.
The agent reached the goal. The task failed. Step 1, step 2, step 3, step 4, step 5, step 6, step 7, step 8.
grey box, green key, purple door, red ball, blue box, yellow ball, 0 1 2 3 4 5 6 7 8 9 10 steps left right ahead.
"""


def train_tokenizer(markers: list[str], vocab_size: int = 512, corpus: str = _CORPUS):
    """A byte-level BPE (tokenizers) whose template markers are single special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD_TOKEN, *markers],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = [line for line in corpus.splitlines() if line.strip()]
    tokenizer.train_from_iterator(lines * 4, trainer=trainer)
    return tokenizer


def save_tokenizer(tokenizer, out: Path, template: Template, source_config: dict | None = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out / "tokenizer.json"))
    # Minimal Hugging Face sidecar so transformers' PreTrainedTokenizerFast can load the folder too. An imported
    # model keeps its own sidecar fields (bos/eos tokens, chat template) under ours.
    config = {**(source_config or {}),
              "tokenizer_class": "PreTrainedTokenizerFast",
              "model_max_length": 1_000_000}
    if template.kind == "marker":
        config.update(pad_token=PAD_TOKEN, additional_special_tokens=template.markers())
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def save_checkpoint(out: Path | str, *, name: str, version: str, backbone: torch.nn.Module,
                    value_head: torch.nn.Module, tokenizer, template: Template, max_seq_len: int,
                    training: TrainingInfo | dict | None = None, activation: str = "sigmoid",
                    overwrite: bool = False, head_spec: ValueHeadSpec | None = None,
                    tokenizer_config: dict | None = None) -> Manifest:
    """Write a complete checkpoint directory (weights in fp32 safetensors, manifest with checksums).

    `head_spec` describes a head other than the linear default (model_store/heads.py); its tensors are the
    head module's state dict."""
    out = Path(out)
    if out.exists():
        if not overwrite:
            raise FileExistsError(f"{out} already exists (pass overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        backbone_dir = tmp / "backbone"
        backbone_dir.mkdir()
        state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in backbone.state_dict().items()}
        save_file(state, str(backbone_dir / "model.safetensors"), metadata={"format": "pt"})
        config = backbone.config.to_dict()
        config["architectures"] = [type(backbone).__name__]
        config.pop("dtype", None)
        config.pop("torch_dtype", None)
        (backbone_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        head = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in value_head.state_dict().items()}
        save_file(head, str(tmp / "value_head.safetensors"))
        save_tokenizer(tokenizer, tmp / "tokenizer", template, tokenizer_config)
        if isinstance(training, dict):
            training = TrainingInfo.model_validate(training)
        manifest = Manifest(
            name=name,
            version=str(version),
            backbone={"architecture": type(backbone).__name__, "config": config},
            value_head=head_spec or ValueHeadSpec(in_features=backbone.config.hidden_size, activation=activation),
            template=template,
            dtype="float32",
            max_seq_len=max_seq_len,
            training=training or TrainingInfo(),
        )
        manifest = write_manifest(tmp, manifest)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
        return manifest
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def init_random(out: Path | str, *, name: str = "random-prm", version: str = "1", layers: int = 2,
                hidden: int = 64, heads: int = 4, kv_heads: int = 2, intermediate: int | None = None,
                vocab: int = 512, max_seq_len: int = 2048, seed: int = 0, overwrite: bool = False,
                command: str | None = None) -> Manifest:
    """A complete random checkpoint: Qwen2 backbone from a config, linear head, trained BPE tokenizer."""
    from transformers import Qwen2Config, Qwen2Model

    template = Template()
    tokenizer = train_tokenizer(template.markers(), vocab_size=vocab)
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=tokenizer.get_vocab_size(),
        hidden_size=hidden,
        intermediate_size=intermediate or hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_seq_len,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.token_to_id(PAD_TOKEN),
    )
    backbone = Qwen2Model(config).eval()
    head = torch.nn.Linear(hidden, 1)
    training = TrainingInfo(method="random-init", command=command)
    return save_checkpoint(out, name=name, version=version, backbone=backbone, value_head=head, tokenizer=tokenizer,
                           template=template, max_seq_len=max_seq_len, training=training, overwrite=overwrite)
