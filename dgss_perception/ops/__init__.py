"""PyTorch operators of the model families that exported programs (``.pt2``) carry.

The MFuser family's selective scan is one operator, ``dgss::selective_scan`` (a fused Triton kernel on
CUDA, the exact chunked PyTorch scan elsewhere), so that a torch.export program keeps it as one node
and AOTInductor / torch.compile on the car compile its kernel. A program naming it loads only where the
operator is registered: :func:`register` does that, and the PyTorch backends call it before loading.
Nothing here is imported by the ONNX Runtime path (these modules need torch).
"""

from __future__ import annotations


def register() -> bool:
    """Register the ``dgss::`` operators with torch; returns whether they are (False without Triton)."""
    from .selective_scan_triton import TRITON_AVAILABLE

    return TRITON_AVAILABLE
