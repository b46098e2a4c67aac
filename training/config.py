"""Training configuration: typed dataclasses read from one flat YAML file.

Each section maps one-to-one onto what it configures; unknown keys are
errors, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .backbones.lora import LoraSettings


@dataclass
class BackboneConfig:
    name: str = "vit_large_patch14_dinov2"
    weights: str = ""  # "" random init, "hub", or a local .safetensors/.pth file
    out_indices: list[int] | None = None  # None: blocks at 1/4, 1/2, 3/4 and full depth
    overrides: dict[str, Any] = field(default_factory=dict)  # timm kwargs for small variants
    lora: LoraSettings | None = field(default_factory=LoraSettings)
    # What trains in the backbone: "lora" (the paper), "full" (from scratch, when no
    # pretrained weights exist), or "frozen".
    finetune: str = "lora"


@dataclass
class HeadConfig:
    channels: list[int] = field(default_factory=lambda: [1024, 512, 256])
    dropout: float = 0.1


@dataclass
class ModelConfig:
    family: str = "vfmnet_mgrnet"
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    num_classes: int = 19
    img_size: list[int] = field(default_factory=lambda: [512, 512])  # (H, W) the network sees
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])


@dataclass
class DataConfig:
    layout: str = "cityscapes"  # cityscapes | acdc
    root: str = ""
    split: str = "train"
    conditions: list[str] = field(default_factory=list)  # ACDC conditions
    scale_range: list[float] = field(default_factory=lambda: [0.5, 2.0])
    flip: bool = True
    photometric: bool = True
    val_layout: str = ""
    val_root: str = ""
    val_split: str = "val"
    val_conditions: list[str] = field(default_factory=list)


@dataclass
class OptimConfig:
    iters: int = 40000
    batch_size: int = 2
    grad_accum: int = 1
    lr_backbone: float = 1e-5
    lr_head: float = 1e-4
    weight_decay: float = 0.01
    warmup_iters: int = 1500
    poly_power: float = 1.0


@dataclass
class TrainConfig:
    name: str = "vfmnet"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    seed: int = 0
    device: str = "auto"
    amp: str = "none"  # none | bf16
    num_workers: int = 2
    log_every: int = 10
    checkpoint_every: int = 1000
    threads: int = 0  # torch CPU threads, 0 = torch default


def _build(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown} (known: {sorted(names)})")
    kwargs = {}
    for key, value in data.items():
        hint = hints[key]
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = typing.get_origin(hint) in (typing.Union, types.UnionType)
        if dataclasses.is_dataclass(hint):
            target = hint
        elif optional and args and dataclasses.is_dataclass(args[0]):
            target = args[0]
        else:
            target = None
        kwargs[key] = _build(target, value, f"{where}.{key}") if target is not None and value is not None else value
    return cls(**kwargs)


def config_from_dict(data: dict[str, Any]) -> TrainConfig:
    return _build(TrainConfig, data, "config")


def load_config(path: str | Path) -> TrainConfig:
    """Read a YAML training config; relative data roots resolve against the working directory."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config not found: {path}")
    return config_from_dict(yaml.safe_load(path.read_text()) or {})


def config_to_dict(config: TrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)
