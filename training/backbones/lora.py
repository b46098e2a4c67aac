"""LoRA on a backbone through peft, and merging it back for export."""

from __future__ import annotations

from dataclasses import dataclass, field

from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from torch import nn


@dataclass
class LoraSettings:
    """LoRA hyper-parameters (the paper: r=32, alpha=32, dropout 0.1 on qkv).

    Empty ``targets`` means the backbone's attention input projections (qkv, or q/k/v for EVA02).
    """

    r: int = 32
    alpha: int = 32
    dropout: float = 0.1
    targets: list[str] = field(default_factory=list)


def add_lora(model: nn.Module, settings: LoraSettings) -> nn.Module:
    """Inject LoRA adapters into the modules named by ``settings.targets`` (in place)."""
    if not settings.targets:
        raise ValueError("LoRA needs target module names (build_vfmnet fills in the backbone's own)")
    config = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=list(settings.targets), bias="none")
    return inject_adapter_in_model(config, model)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (W' = W + scale·B·A) and unwrap it to a plain layer."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.get_base_layer())
    return model
