"""Tensors made inside a forward that a traced graph keeps on the device it runs on.

``torch.jit.trace`` records a factory's ``device=`` argument (``torch.arange(n, device=x.device)``) as a
literal of the tracing device, and a tensor built from Python data (``torch.tensor(...)``) as a constant
stored on that device: a graph traced on the CPU and loaded on a GPU then mixes devices. The ``Tensor.new_*``
factories take their device from a tensor at run time, so the helpers here build everything from them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def arange_like(ref: torch.Tensor, start: int, end: int | None = None,
                dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """``torch.arange(start, end, dtype=dtype)`` on ``ref``'s device: shape (end − start,).

    With one bound it counts from 0 to ``start``, as ``torch.arange``. The bounds may be sizes read
    from a traced tensor. Under ``torch.jit.trace`` the integers are counted in int64 from ``ref.new_ones``
    and converted once: the same values wherever ``dtype`` holds every integer of the range exactly
    (int64; float32 to 2²⁴; float16 to 2048; bfloat16 to 256), beyond which ``torch.arange`` rounds
    its own way; eager code and ``torch.export`` run ``torch.arange`` itself.
    """
    if end is None:
        start, end = 0, start
    if not torch.jit.is_tracing():
        return torch.arange(start, end, dtype=dtype, device=ref.device)
    return (ref.new_ones(end - start, dtype=torch.int64).cumsum(0) + (start - 1)).to(dtype)


def values_like(ref: torch.Tensor, rows: Sequence[Sequence[float]]) -> torch.Tensor:
    """A (R, C) tensor of ``ref``'s dtype and device holding ``rows`` (Python numbers, R rows of C).

    A traced graph holds each number as a literal rather than a tensor constant of the tracing device.
    """
    return torch.stack([torch.stack([ref.new_full((), float(v)) for v in row]) for row in rows])
