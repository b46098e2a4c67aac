"""Running a frozen timm ViT (VisionTransformer or Eva) one block at a time.

Encoders that interleave their own work between the blocks of one or two towers (MFuser's fusers,
Rein's tokens) need the tower's embedding and each block separately; timm's ``forward_features`` runs
them all at once.
"""

from __future__ import annotations

from typing import Optional

import torch
from timm.models.eva import Eva
from torch import nn


def check_tower(owner: str, name: str, tower: nn.Module) -> None:
    """ValueError unless ``tower`` is a fixed-size timm ViT/Eva whose token grid can be relied on.

    Args:
        owner: the class using the tower (for the message).
        name: the tower's role (for the message).
        tower: the timm model.
    """
    for attr in ("patch_embed", "blocks", "norm", "num_prefix_tokens", "embed_dim"):
        if not hasattr(tower, attr):
            raise ValueError(f"{owner}: {name} tower {type(tower).__name__} has no {attr!r} "
                             "(expected a timm VisionTransformer or Eva)")
    if getattr(tower, "dynamic_img_size", False):
        raise ValueError(f"{owner}: {name} tower must be built at a fixed image size (dynamic_img_size=False)")
    if getattr(tower, "rope_mixed", False):
        raise ValueError(f"{owner}: {name} tower uses depth-dependent (mixed) RoPE, which is not supported")
    drop = getattr(tower, "patch_drop", None)
    if drop is not None and not isinstance(drop, nn.Identity):
        # Dropping patches would desynchronise token sequences that are aligned by position.
        raise ValueError(f"{owner}: {name} tower has patch dropout; build it with patch_drop_rate=0")


def embed_tokens(tower: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Pixels (N, 3, H, W) → tokens (N, P + h·w, D) ready for block 0, and EVA's rotary embedding (else None)."""
    tokens = tower.patch_embed(x)
    rope = None
    if isinstance(tower, Eva):
        tokens, rope = tower._pos_embed(tokens)  # Eva's also applies its (absent) patch dropout
    else:
        tokens = tower.patch_drop(tower._pos_embed(tokens))
    return tower.norm_pre(tokens), rope


def run_block(tower: nn.Module, i: int, tokens: torch.Tensor, rope: Optional[torch.Tensor]) -> torch.Tensor:
    """Block ``i`` of ``tower`` on tokens (N, L, D) → (N, L, D)."""
    block = tower.blocks[i]
    return block(tokens, rope=rope) if isinstance(tower, Eva) else block(tokens)
