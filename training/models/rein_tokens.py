"""Rein's learnable tokens and DepthForge's depth-aware variant: the only trainable part of their encoders.

After every frozen block i, with f (N, L, D) the block's patch tokens (class token excluded) and
T_i = A_i · B_i (M, D) the layer's low-rank tokens (A_i (M, r), B_i (r, D)):

    S = softmax((f · T_iᵀ + d · T_iᵀ) / √D)       over the M tokens; d = depth tokens (DepthForge) or 0 (Rein)
    Δ = mlp_delta_f(S[..., 1:] · mlp_token2feat(T_i[1:]) + f)
    f ← f + scale · Δ

Token 0 takes part in the softmax but not in the sum; ``mlp_token2feat`` and ``mlp_delta_f`` are one
Linear(D, D) each, shared by all layers; ``scale`` is one learnable scalar (1e-3 at the start). The depth
tokens only steer the attention: the update is built from the visual tokens alone.

The decoder's queries come from the tokens, not the image: every layer's tokens go through
``transform`` (D → C); the maximum and the mean over the layers and the last layer's, interleaved per
channel (M, 3C), are merged to (M, C). Being image-independent they are computed once for an exported graph.

Parameter names follow the released checkpoints (``learnable_tokens_a``/``_b``, ``scale``,
``mlp_token2feat``, ``mlp_delta_f``, ``transform``, ``merge``) after their ``backbone.reins.`` /
``backbone.depthforge.`` prefix.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# At ViT-L (D 1024, 24 layers, 100 tokens of rank 16, 256-wide queries):
#   learnable_tokens_a 24·100·16 = 38,400; learnable_tokens_b 24·16·1024 = 393,216
#   mlp_token2feat, mlp_delta_f 2 × (1024·1024 + 1024) = 2,099,200; scale 1
#   transform 1024·256 + 256 = 262,400; merge 768·256 + 256 = 196,864          → 2,990,081 (the reported 2.99M)
FULL_SIZE_PARAMS = 2_990_081


class ReinTokens(nn.Module):
    """Low-rank learnable tokens refining a frozen ViT's features layer by layer (Rein's ``LoRAReins``).

    Args:
        num_layers: blocks of the ViT (one token set each).
        embed_dim: token width D of the ViT.
        patch_size: the ViT's patch size (only enters the initialisation range, as the official code).
        token_length: tokens M per layer.
        rank: r of the factorisation T_i = A_i · B_i.
        query_dim: width of the decoder queries derived from the tokens.
        scale_init: initial value of the learnable scale of the update.
    """

    def __init__(self, num_layers: int, embed_dim: int, patch_size: int = 16, token_length: int = 100,
                 rank: int = 16, query_dim: int = 256, scale_init: float = 1e-3) -> None:
        super().__init__()
        if token_length < 2:
            raise ValueError(f"ReinTokens: token_length must be at least 2 (token 0 is left out of the sum), "
                             f"got {token_length}")
        self.num_layers = num_layers
        self.embed_dim = embed_dim
        self.patch_size = patch_size
        self.token_length = token_length
        self.rank = rank
        self.query_dim = query_dim
        self.learnable_tokens_a = nn.Parameter(torch.empty(num_layers, token_length, rank))
        self.learnable_tokens_b = nn.Parameter(torch.empty(num_layers, rank, embed_dim))
        self.scale = nn.Parameter(torch.tensor(float(scale_init)))
        self.mlp_token2feat = nn.Linear(embed_dim, embed_dim)
        self.mlp_delta_f = nn.Linear(embed_dim, embed_dim)
        self.transform = nn.Linear(embed_dim, query_dim)
        self.merge = nn.Linear(3 * query_dim, query_dim)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The official init: both factors U(±√(6 / (3p² + √(D·r)))); the shared MLPs kaiming-uniform(a=√5)."""
        bound = math.sqrt(6.0 / (3 * self.patch_size ** 2 + math.sqrt(self.embed_dim * self.rank)))
        nn.init.uniform_(self.learnable_tokens_a, -bound, bound)
        nn.init.uniform_(self.learnable_tokens_b, -bound, bound)
        # Already torch's Linear default; kept explicit because the official code states it.
        nn.init.kaiming_uniform_(self.mlp_token2feat.weight, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.mlp_delta_f.weight, a=math.sqrt(5))

    def tokens(self, layer: int | None = None) -> torch.Tensor:
        """T_layer (M, D), or every layer's (layers, M, D) when ``layer`` is None."""
        if layer is None:
            return self.learnable_tokens_a @ self.learnable_tokens_b
        return self.learnable_tokens_a[layer] @ self.learnable_tokens_b[layer]

    def delta(self, feats: torch.Tensor, layer: int, depth: torch.Tensor | None = None) -> torch.Tensor:
        """The unscaled update Δ (N, L, D) of patch tokens ``feats`` (N, L, D), steered by ``depth`` (N, L, D)."""
        tokens = self.tokens(layer).to(feats.dtype)
        # (f + d)·Tᵀ is f·Tᵀ + d·Tᵀ: one product instead of two.
        steer = feats if depth is None else feats + depth
        attn = torch.softmax(steer @ tokens.t() * self.embed_dim ** -0.5, dim=-1)  # (N, L, M)
        delta = attn[..., 1:] @ self.mlp_token2feat(tokens[1:])
        return self.mlp_delta_f(delta + feats)

    def forward(self, x: torch.Tensor, layer: int, depth: torch.Tensor | None = None,
                num_prefix: int = 1) -> torch.Tensor:
        """Refine one block's output.

        Args:
            x: (N, prefix + L, D) tokens after block ``layer``; the ``num_prefix`` leading ones (the class
                token) pass unchanged.
            layer: block index.
            depth: (N, L, D) the depth encoder's patch tokens after the same block (DepthForge), or None (Rein).
            num_prefix: prefix tokens of ``x``.

        Returns:
            (N, prefix + L, D).
        """
        prefix, feats = x[:, :num_prefix], x[:, num_prefix:]
        if depth is not None and depth.shape != feats.shape:
            raise ValueError(f"ReinTokens: depth tokens {tuple(depth.shape)} do not match the visual patch tokens "
                             f"{tuple(feats.shape)}; both encoders must run at the same token grid")
        feats = feats + self.scale * self.delta(feats, layer, depth)
        return torch.cat([prefix, feats], dim=1)

    def queries(self) -> torch.Tensor:
        """Decoder queries of shape (M, query_dim), a function of the tokens only."""
        t = self.transform(self.tokens())  # (layers, M, C)
        # Interleaved per channel (max, mean, last), the order of the released ``merge`` weights.
        pooled = torch.stack([t.amax(dim=0), t.mean(dim=0), t[-1]], dim=-1).flatten(-2)  # (M, 3C)
        return self.merge(pooled)


def reference_delta(tokens: ReinTokens, feats: torch.Tensor, layer: int,
                    depth: torch.Tensor | None = None) -> torch.Tensor:
    """Δ written term by term as the official code does (two separate logits, einsums); for tests."""
    t = tokens.tokens(layer)
    logits = torch.einsum("nlc,mc->nlm", feats, t) * tokens.embed_dim ** -0.5
    if depth is not None:
        logits = logits + torch.einsum("nlc,mc->nlm", depth, t) * tokens.embed_dim ** -0.5
    attn = F.softmax(logits, dim=-1)
    delta = torch.einsum("nlm,mc->nlc", attn[..., 1:], tokens.mlp_token2feat(t[1:]))
    return tokens.mlp_delta_f(delta + feats)
