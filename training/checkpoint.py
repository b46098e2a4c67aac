"""Safe loading of weight files: safetensors, or torch files with weights_only=True."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from .safetensors or a torch file (weights only, never pickled code).

    A torch file whose tensors sit under "model" or "state_dict" is unwrapped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weight file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:
            raise ValueError(f"{path} is not a readable safetensors file: {exc}") from exc
    data = load_torch_file(path)
    for key in ("model", "state_dict"):
        if isinstance(data, dict) and isinstance(data.get(key), dict):
            data = data[key]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    return data


def load_torch_file(path: str | Path) -> Any:
    """torch.load with weights_only=True; a corrupt or unsafe file gives a ValueError naming it."""
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"cannot load {path} safely (corrupt, truncated, or not a weights-only file): {exc}") from exc
