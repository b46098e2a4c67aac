"""MTEnhancer (the official ``ContextDecoder``): refines the class text embeddings with the image's tokens.

Inputs: text embeddings t (N, K, D) and visual tokens v = [global; patches] (N, 1 + hw, D), D = visual_dim
(768 for the L-size variants). Forward:

1. memory = LN → Linear(D → width) → LN of v; x = LN → Linear(D → width) of t.
2. Per layer (MFuser uses one):
   x = x + SelfAttn(LN1(x))                 (inter-class relations; q/k/v without bias, output with bias)
   s = MVFuser(cat[LN2(x), memory, LN2(x)]) (one forward scan; the text copy before the image tokens sees
                                             only the text, the copy after sees the text and the image)
   x = x + s[:, :K] + s[:, -K:]             (both text slots are added)
   x = x + Dropout(MLP(LN3(x)))             (width → 4·width, GELU, dropout, → width)
3. out = LN → Linear(width → D).

The refinement that uses it is t' = t + gamma ⊙ ContextDecoder(t, v) with a learnable gamma (D,), in
:class:`training.models.mfuser.MFuser`. Module names follow the official checkpoints (``memory_proj``,
``text_proj``, ``decoder.N.{self_attn.{q,k,v}_proj, self_attn.proj, cross_attn.*, norm1..3, mlp.{0,3}}``,
``out_proj``), so official ``context_decoder.*`` entries load by name into the model's ``context_decoder``.
"""

from __future__ import annotations

import torch
from torch import nn

from training.models.mvfuser import MVFuser


class TextSelfAttention(nn.Module):
    """Multi-head self-attention over the K class queries, (N, K, C) → (N, K, C).

    Separate q/k/v projections without bias and an output projection with bias, as the official; written
    out as matmul + softmax (no fused kernel), which exports as plain ops.

    Args:
        dim: query width C (divisible by ``heads``).
        heads: attention heads.
        proj_drop: dropout after the output projection.
    """

    def __init__(self, dim: int, heads: int, proj_drop: float = 0.0) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Attend every query to all queries.

        Args:
            x: (N, K, C).

        Returns:
            (N, K, C).
        """
        n, k, c = x.shape
        q, key, v = (p(x).reshape(n, k, self.heads, c // self.heads).transpose(1, 2)
                     for p in (self.q_proj, self.k_proj, self.v_proj))  # (N, heads, K, C/heads)
        attn = ((q * self.scale) @ key.transpose(-2, -1)).softmax(dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(n, k, c)
        return self.proj_drop(self.proj(out))


class MTEnhancerLayer(nn.Module):
    """One hybrid attention–Mamba layer: self-attention, MVFuser conditioned on the image, MLP.

    Args:
        width: token width.
        heads: self-attention heads.
        dropout: after the attention projection, inside and after the MLP, and after the MVFuser's output
            projection (the official fixes the last at 0.1, which is also its default here).
        d_state: MVFuser state size.
        dt_rank: MVFuser Δ rank.
    """

    def __init__(self, width: int, heads: int, dropout: float = 0.1, d_state: int = 16, dt_rank: int = 16) -> None:
        super().__init__()
        self.self_attn = TextSelfAttention(width, heads, proj_drop=dropout)
        self.cross_attn = MVFuser(width, d_state=d_state, dt_rank=dt_rank, proj_drop=dropout)
        self.norm1 = nn.LayerNorm(width)
        self.norm2 = nn.LayerNorm(width)
        self.norm3 = nn.LayerNorm(width)
        self.dropout = nn.Dropout(dropout)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """Refine the queries with each other and with the image tokens.

        Args:
            x: queries (N, K, width).
            memory: projected image tokens (N, M, width).

        Returns:
            (N, K, width).
        """
        x = x + self.self_attn(self.norm1(x))
        k = x.shape[1]
        q = self.norm2(x)
        # A forward scan only lets later tokens read earlier ones: the copy placed after the image tokens is
        # what carries the image into the text; the leading copy gives the text-only path.
        s = self.cross_attn(torch.cat([q, memory, q], dim=1))  # (N, K + M + K, width)
        x = x + s[:, :k] + s[:, -k:]
        return x + self.dropout(self.mlp(self.norm3(x)))


class ContextDecoder(nn.Module):
    """MTEnhancer: text embeddings conditioned on the image's global and patch tokens.

    Init as the official: every nn.Linear — the MVFuser's in/x/dt/out projections included — is re-drawn
    trunc_normal(std 0.02) with zero bias, and every LayerNorm reset to (1, 0). That replaces the MVFuser's
    Mamba Δ init, so its dt_proj bias starts at 0 (Δ = softplus(dt_proj(x) + 0 + 0) ≈ 0.69 for small inputs)
    instead of softplus⁻¹ of U[1e-3, 1e-1]; it is reproduced because the released weights were trained from it.

    Args:
        visual_dim: width D of the text embeddings and the visual tokens.
        width: internal width.
        heads: self-attention heads.
        layers: MTEnhancer layers (MFuser: 1).
        dropout: dropout of the layers.
        d_state: MVFuser state size.
        dt_rank: MVFuser Δ rank (the official's "auto" = ceil(width / 16) = 16 at width 256).
    """

    def __init__(self, visual_dim: int = 768, width: int = 256, heads: int = 4, layers: int = 1,
                 dropout: float = 0.1, d_state: int = 16, dt_rank: int = 16) -> None:
        super().__init__()
        self.visual_dim = visual_dim
        self.width = width
        self.memory_proj = nn.Sequential(nn.LayerNorm(visual_dim), nn.Linear(visual_dim, width), nn.LayerNorm(width))
        self.text_proj = nn.Sequential(nn.LayerNorm(visual_dim), nn.Linear(visual_dim, width))
        self.decoder = nn.ModuleList(MTEnhancerLayer(width, heads, dropout, d_state, dt_rank) for _ in range(layers))
        self.out_proj = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, visual_dim))
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            # torch's bounds are absolute (±2), as timm's trunc_normal_ in the official: no truncation at std 0.02.
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def forward(self, text: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        """Text update from the image.

        Args:
            text: (N, K, visual_dim) class text embeddings.
            visual: (N, 1 + hw, visual_dim) image tokens, global token first.

        Returns:
            (N, K, visual_dim): the update (not yet scaled by gamma nor added to ``text``).
        """
        if text.ndim != 3 or visual.ndim != 3:
            raise ValueError(f"ContextDecoder expects text (N, K, D) and visual (N, M, D), got {tuple(text.shape)} "
                             f"and {tuple(visual.shape)}")
        memory = self.memory_proj(visual)
        x = self.text_proj(text)
        for layer in self.decoder:
            x = layer(x, memory)
        return self.out_proj(x)
