"""Safe loading of weight files: safetensors, or torch files with weights_only=True."""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
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


def load_released_checkpoint(path: str | Path, expected: str) -> dict[str, torch.Tensor]:
    """Read a released (mmcv / mmengine) checkpoint safely and unwrap its ``state_dict``.

    Args:
        path: the file.
        expected: what the file should be, for the message (e.g. "a released MFuser checkpoint (mmcv 1.x: …)").

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: unreadable, or not a state dict of tensors (the message says what was expected and how a
            trusted file that only fails the weights-only check can be re-saved).
    """
    try:
        return load_state_dict_file(path)
    except ValueError as exc:
        raise ValueError(f"{exc}; expected {expected}. A trusted file that only fails the weights-only check can "
                         "be re-saved as its state dict alone, e.g. "
                         "torch.save(torch.load(src, weights_only=False)['state_dict'], dst)") from exc


def tensors_for_saving(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous tensors with no two sharing storage (safetensors refuses shared or strided tensors)."""
    seen: set[int] = set()
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        value = value.detach().contiguous()
        pointer = value.untyped_storage().data_ptr()
        if pointer in seen:
            value = value.clone()
        seen.add(pointer)
        out[key] = value
    return out


def strip_module_prefix(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove the ``module.`` prefix that a DistributedDataParallel save leaves on every key."""
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module."):]: v for k, v in state.items()}
    return dict(state)


def run_conversion(convert: Callable[[], list[str]], out: str | Path) -> int:
    """A converter's command-line ending: print its notes and ``wrote <out>`` (0), or its refusal (1)."""
    try:
        notes = convert()
    except (FileNotFoundError, FileExistsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for line in notes:
        print(line)
    print(f"wrote {out}")
    return 0
