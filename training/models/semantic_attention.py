"""Feature-to-semantics attention, MGRNet's decoder block (VFMSeg, Fig. 3c–d).

Image-feature tokens are the queries; they attend to each other, then to the mask-embedding
tokens (keys and values), then pass a GEGLU feed-forward, each step pre-LayerNorm with a
residual. There is no positional encoding: the tokens carry position only through the
features themselves.

Attention runs through ``F.scaled_dot_product_attention`` (fused kernels on the GPU, and it
exports to ONNX opset 18 and TorchScript). The explicit ``softmax(QKᵀ/√d)·V`` is kept as a
reference (``reference_attention``; switch a model over with ``set_reference_attention``) so
tests can hold the fused path to the textbook formula.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Plain attention: q (N,H,Lq,d), k and v (N,H,Lk,d) → softmax(q·kᵀ/√d)·v (N,H,Lq,d)."""
    weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)
    return weights @ v


class Attention(nn.Module):
    """Multi-head attention of query tokens over context tokens (self-attention without a context).

    Args:
        dim: width of the query tokens (and of the output).
        heads: number of heads.
        head_dim: width per head; the projections are dim → heads·head_dim (paper: 8 × 64 = 512).
        dropout: dropout after the output projection (no dropout on the attention weights).
        context_dim: width of the context tokens; None means ``dim``.

    Attributes:
        reference: run :func:`reference_attention` instead of the fused kernel.
    """

    def __init__(self, dim: int, heads: int = 8, head_dim: int = 64, dropout: float = 0.0,
                 context_dim: int | None = None) -> None:
        super().__init__()
        inner = heads * head_dim
        context_dim = dim if context_dim is None else context_dim
        self.heads = heads
        self.head_dim = head_dim
        self.reference = False
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(dropout))

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        """(N,L,heads·head_dim) → (N,heads,L,head_dim)."""
        return t.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """x (N,Lq,dim), context (N,Lk,context_dim) or None (self-attention) → (N,Lq,dim)."""
        context = x if context is None else context
        q, k, v = self._split(self.to_q(x)), self._split(self.to_k(context)), self._split(self.to_v(context))
        if self.reference:
            out = reference_attention(q, k, v)
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).flatten(2))


class GEGLUFeedForward(nn.Module):
    """Linear dim → 2·ffn_dim, split into (x, gate), x·GELU(gate), Dropout, Linear ffn_dim → dim.

    Args:
        dim: token width.
        ffn_dim: inner width after the gate (paper: 1024, i.e. 4 × dim).
        dropout: dropout after the gate.
    """

    def __init__(self, dim: int, ffn_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.proj_in = nn.Linear(dim, 2 * ffn_dim)
        self.dropout = nn.Dropout(dropout)
        self.proj_out = nn.Linear(ffn_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (N,L,dim) → (N,L,dim)."""
        value, gate = self.proj_in(x).chunk(2, dim=-1)
        return self.proj_out(self.dropout(value * F.gelu(gate)))


class SemanticAttentionBlock(nn.Module):
    """Pre-LN block: self-attention → cross-attention to the mask tokens → GEGLU FFN, each residual.

    Args:
        dim: token width of queries and mask tokens (paper: 256).
        heads, head_dim: attention heads and their width (paper: 8, 64).
        ffn_dim: GEGLU inner width (paper: 1024).
        dropout: dropout in the attention outputs and the feed-forward.
    """

    def __init__(self, dim: int, heads: int = 8, head_dim: int = 64, ffn_dim: int = 1024,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.self_attn = Attention(dim, heads, head_dim, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.cross_attn = Attention(dim, heads, head_dim, dropout, context_dim=dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ffn = GEGLUFeedForward(dim, ffn_dim, dropout)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """x image tokens (N,L,dim), context mask tokens (N,Lc,dim) → (N,L,dim).

        The mask tokens are not normalised here: the mask embedding ends in a GroupNorm.
        """
        x = x + self.self_attn(self.norm1(x))
        x = x + self.cross_attn(self.norm2(x), context)
        return x + self.ffn(self.norm3(x))


def set_reference_attention(module: nn.Module, enabled: bool = True) -> None:
    """Switch every :class:`Attention` inside ``module`` to the plain formula (or back to the fused kernel)."""
    for m in module.modules():
        if isinstance(m, Attention):
            m.reference = enabled
