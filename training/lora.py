"""LoRA fine-tuning of a PRM's backbone through peft, and the merge that makes the export an ordinary checkpoint.

`add_lora(model, rank)` puts rank-`rank` adapters on the attention and MLP projections of every decoder layer
(q/k/v/o, gate/up/down: the names shared by the Qwen2, Llama and Mistral families), freezes every other
backbone weight, and leaves the value head fully trainable (it starts from scratch, so it must move). The
rows of the template's marker tokens in the input embeddings are trained too (peft's
`trainable_token_indices`): a pretrained model has never seen them, and the promise is read at one of them.

`merge_lora(model)` folds the adapters into the base weights (W + B A * alpha / r) and removes peft's
wrappers, so the exported backbone has exactly the names and shapes of the base model and `agentprm serve`
loads it like any other verified checkpoint.
"""

from __future__ import annotations

from torch import nn

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoraError(ValueError):
    """The backbone cannot take LoRA adapters as asked."""


def add_lora(model: nn.Module, rank: int, alpha: float | None = None, dropout: float = 0.0,
             trainable_token_ids: list[int] | None = None) -> nn.Module:
    """Wrap `model.backbone` with peft LoRA adapters in place; returns the model. `alpha` defaults to 2 * rank."""
    from peft import LoraConfig, get_peft_model

    if rank <= 0:
        raise LoraError(f"--lora-rank must be positive, got {rank}")
    present = {name.rsplit(".", 1)[-1] for name, _ in model.backbone.named_modules()}
    targets = [t for t in LORA_TARGETS if t in present]
    if not targets:
        raise LoraError(f"{type(model.backbone).__name__}: none of the projections {LORA_TARGETS} exist; "
                        "LoRA needs a Qwen2/Llama-style decoder")
    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else 2 * rank, lora_dropout=dropout,
                        target_modules=targets, bias="none",
                        trainable_token_indices={"embed_tokens": sorted(trainable_token_ids)}
                        if trainable_token_ids else None)
    model.backbone = get_peft_model(model.backbone, config)
    for p in model.value_head.parameters():
        p.requires_grad_(True)
    return model


def has_lora(model: nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(getattr(model, "backbone", None), PeftModel)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold the adapters into the base weights and drop peft's wrappers, in place; returns the model."""
    if has_lora(model):
        model.backbone = model.backbone.merge_and_unload()
        for p in model.parameters():
            p.requires_grad_(True)
    return model


def trainable_summary(model: nn.Module) -> dict:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"parameters": total, "trainable": trainable}
