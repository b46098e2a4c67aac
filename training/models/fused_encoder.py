"""MFuser's fused image encoder: DINOv2 and a CLIP-like vision tower, coupled by an MVFuser after every block.

Both towers are frozen and run block by block; only the fusers (and the FPN) learn.

For an image normalised with the VLM's statistics, x (N, 3, H, W):

1. DINOv2 gets the same pixels re-normalised to its own (ImageNet) statistics; both towers embed their input
   (patch embedding, prefix tokens, position embedding; EVA02 also returns its rotary embedding).
2. For every block i: v = vlm.blocks[i](v); d = dino.blocks[i](d); o = fusers[i](cat([d, v], dim=1)) over the
   token sequence [DINOv2 prefix + patches; VLM prefix + patches]; d += o[:, :Ld]; v += o[:, Ld:].
3. After the tapped blocks, the two patch grids are concatenated along channels, (N, Dd + Dv, h, w), and a
   simple FPN turns the four taps into a pyramid at 4h, 2h, h and h/2.
4. The global outputs come from the last block through the VLM's own head: head(vlm.norm(v) + dino.norm(d)) at
   the class token (global embedding) and at the patches (dense visual embedding for pixel-text alignment).

Variants, as in the official backbones:

* EVA02-CLIP-L/14 (default): 36×36 tokens at 512 (the stride-14 convs drop the last 8 pixels per side),
  sequence [DINOv2 CLS + 1296; EVA CLS + 1296], head Linear(1024 → 768).
* CLIP-L at stride 16 (both towers' patch kernels resized 14 → 16 when their weights load, 32×32 tokens at
  512): per-layer projections around each MVFuser (``FuserProjections``): the DINOv2 half enters through
  proj1[i] and its offset returns through proj2[i]; the VLM half is used as is. The global outputs are
  head(vlm.norm(v + proj3(d))), with no DINOv2 norm.
* SigLIP-L/16: no class token, so the sequence is [DINOv2 CLS + 1024; SigLIP 1024] and the DINOv2 class token
  is dropped from the sum. SigLIP's head is an attention pool: the global embedding is the pool's latent query
  over the patches, the dense embedding the same attention with every patch as its own query. (The official
  SigLIP backbone holds projections like CLIP's but never uses them; they are left out here. It also takes
  CLIP-normalised input and re-normalises it for SigLIP inside; taking SigLIP-normalised input is the same.)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..backbones.catalog import IMAGENET_MEAN, IMAGENET_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from ..backbones.vit import quarter_depth_indices
from .simple_fpn import SimpleFPN
from .tower_steps import check_tower, embed_tokens, run_block

# Taps of the official 24-block configs (after blocks 8, 12, 16 and 24, 1-based).
MFUSER_TAPS = (7, 11, 15, 23)

Stats = tuple[float, float, float]


class FusedFeatures(NamedTuple):
    """Outputs of ``FusedEncoder``.

    Attributes:
        maps: four maps (N, Dd + Dv, s·h, s·w) for s = 4, 2, 1, ½ (highest resolution first).
        global_embed: (N, E) image embedding in the VLM's joint image-text space.
        visual_embed: (N, E, h, w) per-patch embeddings in the same space.
    """

    maps: list[torch.Tensor]
    global_embed: torch.Tensor
    visual_embed: torch.Tensor


class FuserProjections(nn.Module):
    """Linear maps between DINOv2's width and the VLM's, for the variants that fuse at the VLM's width.

    Parameter names follow the official checkpoints' ``adapter_proj1`` / ``adapter_proj2`` /
    ``adapter_proj3`` as ``proj1`` / ``proj2`` / ``proj3``.

    Args:
        dino_dim: DINOv2 token width Dd.
        vlm_dim: VLM token width Dv (also the MVFusers' width).
        depth: number of blocks (one proj1 and one proj2 per block).
    """

    def __init__(self, dino_dim: int, vlm_dim: int, depth: int) -> None:
        super().__init__()
        self.dino_dim = dino_dim
        self.vlm_dim = vlm_dim
        # proj1[i]: DINOv2 tokens (Dd) → fuser input (Dv); proj2[i]: fuser output (Dv) → DINOv2 offset (Dd).
        self.proj1 = nn.ModuleList(nn.Linear(dino_dim, vlm_dim) for _ in range(depth))
        self.proj2 = nn.ModuleList(nn.Linear(vlm_dim, dino_dim) for _ in range(depth))
        # proj3: last DINOv2 tokens (Dd) → added to the VLM stream before its final norm and head.
        self.proj3 = nn.Linear(dino_dim, vlm_dim)

    def __len__(self) -> int:
        """Number of blocks served."""
        return len(self.proj1)


def dense_attention_pool(pool: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Run an attention-pool head with every token as its own query instead of the learned latent.

    This is how the official SigLIP backbone gets per-patch embeddings from a head that only pools: the same
    q/k/v, output projection and residual MLP as the pool, queried by the tokens themselves.

    Args:
        pool: a timm ``AttentionPoolLatent`` (no position embedding).
        tokens: (N, L, C).

    Returns:
        (N, L, pool.out_features).
    """
    n, length, channels = tokens.shape
    heads, head_dim = pool.num_heads, pool.head_dim
    q = pool.q(tokens).reshape(n, length, heads, head_dim).transpose(1, 2)
    k, v = pool.kv(tokens).reshape(n, length, 2, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = pool.q_norm(q), pool.k_norm(k)
    out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, length, heads * head_dim)
    out = pool.proj_drop(pool.proj(out))
    if pool.mlp is not None:
        out = out + pool.mlp(pool.norm(out))
    return out


class FusedEncoder(nn.Module):
    """DINOv2 + VLM vision towers fused block by block by MVFusers, with a simple FPN and the VLM's head.

    The towers are timm models built at the working image size (their position embeddings are not resampled
    in forward, which keeps the graph exportable); the input must have exactly that size.

    Args:
        dino: DINOv2 tower (timm VisionTransformer), width Dd, depth B, class token first (registers allowed).
        vlm: VLM vision tower (timm Eva for EVA02-CLIP, timm VisionTransformer for CLIP / SigLIP), width Dv,
            depth B, built with its image-text projection as ``head`` (or with an attention-pool head when it
            has no class token, as SigLIP). At most one prefix token (a class token).
        fusers: B token mixers (MVFuser), each (N, L, F) → (N, L, F) with F = Dv (= Dd without projections).
        fpn: pyramid on the taps; its ``channels`` must be Dd + Dv.
        out_indices: four increasing block indices to tap; default [7, 11, 15, 23] at depth 24, else blocks at
            quarter depth.
        vlm_mean, vlm_std: RGB statistics (0–1 scale) the input is normalised with (the VLM's).
        dino_mean, dino_std: statistics DINOv2 expects (ImageNet's); the input is re-normalised to them.
        projections: per-layer projections for the stride-16 CLIP variant; None fuses at the common width.
        freeze_towers: set requires_grad False on every tower parameter (heads and norms included), as MFuser
            trains only the fusers, the projections and the FPN.

    Raises:
        ValueError: depths, widths, image sizes or token grids that do not fit together; a VLM with more than
            one prefix token, or with no class token and no attention pool; bad ``out_indices``.
    """

    def __init__(
        self,
        dino: nn.Module,
        vlm: nn.Module,
        fusers: nn.ModuleList | Sequence[nn.Module],
        fpn: SimpleFPN,
        out_indices: Optional[Sequence[int]] = None,
        vlm_mean: Stats = OPENAI_CLIP_MEAN,
        vlm_std: Stats = OPENAI_CLIP_STD,
        dino_mean: Stats = IMAGENET_MEAN,
        dino_std: Stats = IMAGENET_STD,
        projections: Optional[FuserProjections] = None,
        freeze_towers: bool = True,
    ) -> None:
        super().__init__()
        check_tower("FusedEncoder", "DINOv2", dino)
        check_tower("FusedEncoder", "VLM", vlm)
        depth = len(dino.blocks)
        if len(vlm.blocks) != depth:
            raise ValueError(f"FusedEncoder: towers must have the same depth, DINOv2 {depth} vs VLM {len(vlm.blocks)}")
        fusers = fusers if isinstance(fusers, nn.ModuleList) else nn.ModuleList(fusers)
        if len(fusers) != depth:
            raise ValueError(f"FusedEncoder: one fuser per block needed, got {len(fusers)} for depth {depth}")

        dino_img, vlm_img = tuple(dino.patch_embed.img_size), tuple(vlm.patch_embed.img_size)
        if dino_img != vlm_img:
            raise ValueError(f"FusedEncoder: towers built at different image sizes, DINOv2 {dino_img} vs VLM {vlm_img}")
        dino_grid, vlm_grid = tuple(dino.patch_embed.grid_size), tuple(vlm.patch_embed.grid_size)
        if dino_grid != vlm_grid:
            raise ValueError(f"FusedEncoder: token grids differ at {dino_img}: DINOv2 {dino_grid} (patch "
                             f"{tuple(dino.patch_embed.patch_size)}) vs VLM {vlm_grid} (patch "
                             f"{tuple(vlm.patch_embed.patch_size)}); build both with the same patch size")

        self.dino_prefix = int(dino.num_prefix_tokens)
        self.vlm_prefix = int(vlm.num_prefix_tokens)
        if self.vlm_prefix > 1:
            raise ValueError(f"FusedEncoder: the VLM may have at most a class token, it has {self.vlm_prefix} "
                             "prefix tokens")
        if self.vlm_prefix == 1 and self.dino_prefix < 1:
            raise ValueError("FusedEncoder: DINOv2 needs a class token to add to the VLM's")
        pool = getattr(vlm, "attn_pool", None)
        if self.vlm_prefix == 0:
            if pool is None:
                raise ValueError("FusedEncoder: a VLM without class token needs an attention-pool head (SigLIP's)")
            if getattr(pool, "pos_embed", None) is not None:
                raise ValueError("FusedEncoder: attention pools with their own position embedding are not supported")

        dino_dim, vlm_dim = int(dino.embed_dim), int(vlm.embed_dim)
        if projections is None:
            if dino_dim != vlm_dim:
                raise ValueError(f"FusedEncoder: widths differ (DINOv2 {dino_dim}, VLM {vlm_dim}); pass "
                                 "FuserProjections to fuse at the VLM's width")
        elif (projections.dino_dim, projections.vlm_dim, len(projections)) != (dino_dim, vlm_dim, depth):
            raise ValueError(f"FusedEncoder: projections are for Dd {projections.dino_dim}, Dv {projections.vlm_dim}, "
                             f"{len(projections)} blocks; towers have Dd {dino_dim}, Dv {vlm_dim}, {depth} blocks")
        for i, fuser in enumerate(fusers):
            width = getattr(fuser, "d_model", vlm_dim)
            if width != vlm_dim:
                raise ValueError(f"FusedEncoder: fuser {i} has width {width}, the fused tokens have {vlm_dim}")

        if out_indices is None:
            out_indices = MFUSER_TAPS if depth == 24 else quarter_depth_indices(depth)
        out_indices = [int(i) for i in out_indices]
        if len(out_indices) != 4 or any(b <= a for a, b in zip(out_indices, out_indices[1:])) or \
                not 0 <= out_indices[0] or out_indices[-1] >= depth:
            raise ValueError(f"FusedEncoder: out_indices must be 4 increasing block indices in [0, {depth}), "
                             f"got {out_indices}")
        channels = getattr(fpn, "channels", dino_dim + vlm_dim)
        if channels != dino_dim + vlm_dim:
            raise ValueError(f"FusedEncoder: the FPN takes {channels} channels, the taps have "
                             f"{dino_dim} + {vlm_dim} = {dino_dim + vlm_dim}")

        self.dino = dino
        self.vlm = vlm
        self.fusers = fusers
        self.projections = projections
        self.fpn = fpn
        self.out_indices = out_indices
        self.dino_dim = dino_dim
        self.vlm_dim = vlm_dim
        self.img_size: tuple[int, int] = (int(dino_img[0]), int(dino_img[1]))
        self.grid_size: tuple[int, int] = (int(dino_grid[0]), int(dino_grid[1]))
        # Not persistent: constants of the architecture, not learned state; kept out of checkpoints.
        for name, stats in (("vlm_mean", vlm_mean), ("vlm_std", vlm_std), ("dino_mean", dino_mean),
                            ("dino_std", dino_std)):
            self.register_buffer(name, torch.tensor(stats, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        if freeze_towers:
            for p in (*dino.parameters(), *vlm.parameters()):
                p.requires_grad_(False)

    @property
    def depth(self) -> int:
        """Number of blocks B in each tower (and of fusers)."""
        return len(self.fusers)

    @property
    def channels(self) -> int:
        """Channels Dd + Dv of every tap and pyramid level."""
        return self.dino_dim + self.vlm_dim

    @property
    def joint_dim(self) -> int:
        """Width E of the global and visual embeddings (the VLM head's output)."""
        dim = self.vlm_dim
        if self.vlm_prefix == 0:
            dim = int(self.vlm.attn_pool.out_features)
        head = getattr(self.vlm, "head", None)
        return int(head.out_features) if isinstance(head, nn.Linear) else dim

    def dino_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """Re-normalise x from the VLM's statistics to DINOv2's: (x·σ_vlm + μ_vlm − μ_dino) / σ_dino, (N,3,H,W)."""
        return (x * self.vlm_std + self.vlm_mean - self.dino_mean) / self.dino_std

    def _grid(self, tokens: torch.Tensor, prefix: int) -> torch.Tensor:
        """(N, P + h·w, D) → patch grid (N, D, h, w)."""
        h, w = self.grid_size
        return tokens[:, prefix:].transpose(1, 2).reshape(tokens.shape[0], -1, h, w)

    def _like_vlm(self, d: torch.Tensor) -> torch.Tensor:
        """DINOv2 tokens laid out as the VLM's: class token (only if the VLM has one), then patches."""
        if self.dino_prefix == self.vlm_prefix:
            return d
        patches = d[:, self.dino_prefix:]
        return torch.cat([d[:, :1], patches], dim=1) if self.vlm_prefix else patches

    def _embeddings(self, d: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Last tokens of both streams → global (N, E) and visual (N, E, h, w) embeddings."""
        vlm = self.vlm
        if self.projections is not None:
            tokens = vlm.norm(v + self.projections.proj3(self._like_vlm(d)))
        else:
            tokens = vlm.norm(v) + self._like_vlm(self.dino.norm(d))
        if self.vlm_prefix:
            # Head on every token, as the official code: class token → global, patches → dense.
            tokens = vlm.head(vlm.fc_norm(tokens))
            global_embed, patches = tokens[:, 0], tokens[:, 1:]
        else:
            global_embed = vlm.head(vlm.fc_norm(vlm.attn_pool(tokens)))
            patches = vlm.head(vlm.fc_norm(dense_attention_pool(vlm.attn_pool, tokens)))
        return global_embed, self._grid(patches, 0)

    def fuse(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """The fused towers without the FPN.

        Args:
            x: (N, 3, H, W) normalised with the VLM's statistics, (H, W) = ``img_size``.

        Returns:
            (taps, global_embed, visual_embed): four maps (N, Dd + Dv, h, w) — channels [DINOv2; VLM], after the
            fusion of each tapped block —, (N, E) and (N, E, h, w).

        Raises:
            ValueError: x is not (N, 3, H, W) at the towers' image size.
        """
        if x.ndim != 4 or x.shape[1] != 3 or tuple(x.shape[-2:]) != self.img_size:
            raise ValueError(f"FusedEncoder: expected (N, 3, {self.img_size[0]}, {self.img_size[1]}) input (the "
                             f"towers are built at a fixed size), got {tuple(x.shape)}")
        d, dino_rope = embed_tokens(self.dino, self.dino_pixels(x))
        v, vlm_rope = embed_tokens(self.vlm, x)
        split = d.shape[1]
        taps = []
        for i in range(self.depth):
            v = run_block(self.vlm, i, v, vlm_rope)
            d = run_block(self.dino, i, d, dino_rope)
            if self.projections is None:
                offsets = self.fusers[i](torch.cat([d, v], dim=1))
                d = d + offsets[:, :split]
            else:
                offsets = self.fusers[i](torch.cat([self.projections.proj1[i](d), v], dim=1))
                d = d + self.projections.proj2[i](offsets[:, :split])
            v = v + offsets[:, split:]
            if i in self.out_indices:
                taps.append(torch.cat([self._grid(d, self.dino_prefix), self._grid(v, self.vlm_prefix)], dim=1))
        global_embed, visual_embed = self._embeddings(d, v)
        return taps, global_embed, visual_embed

    def forward(self, x: torch.Tensor) -> FusedFeatures:
        """Encode an image.

        Args:
            x: (N, 3, H, W) normalised with the VLM's statistics, (H, W) = ``img_size``.

        Returns:
            FusedFeatures: maps at (4h, 2h, h, h/2) with Dd + Dv channels, global (N, E), visual (N, E, h, w).
        """
        taps, global_embed, visual_embed = self.fuse(x)
        return FusedFeatures(self.fpn(taps), global_embed, visual_embed)
