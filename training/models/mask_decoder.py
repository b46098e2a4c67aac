"""Masked-attention transformer decoders of Mask2Former: the standard one and tqdm's text-query one (MFuser's).

``MaskedQueryDecoder`` takes its queries from outside: content queries (1 or N, Q, hidden) and positional
queries (1 or N, Q, hidden), Q independent of the number of classes C (the Rein / DepthForge heads: 100 queries
supplied by the backbone's adapters, 19 classes). ``TextQueryDecoder`` is tqdm's: one query per class, the
content part an MLP of the (refined) text embedding of class k, the positional part a learned embedding.
Every layer is, in the official post-norm order,

    q = LN(q + CrossAttn(q + pos_q, mem_l + pos_l, mem_l, mask))   masked attention to one pixel-decoder level
    q = LN(q + SelfAttn(q + pos_q, q + pos_q, q))
    q = LN(q + FFN(q))

with the levels visited lowest → highest resolution, cyclically (16², 32², 64², 16², … for a 512² window at
strides 32 … 8), and mem_l carrying a learned level embedding (keys and values) and the sine encoding (keys
only).

A prediction is made from the initial queries and after every layer (num_layers + 1 sets): a shared
LayerNorm, then a class head (num_classes + 1 logits, the last is "no object") and a mask embedding MLP
dotted with the pixel decoder's mask features. The mask of one prediction, resized to the next layer's
level, is that layer's attention mask: a pixel whose sigmoid is below 0.5 is not attended, and a query
that would attend nothing attends everything instead.

Parameter names follow the official checkpoints' ``decode_head.*`` keys of this part (``text_proj``,
``query_embed``, ``level_embed``, ``transformer_decoder.layers.{i}.attentions.{0,1}.attn``,
``….ffns.0.layers``, ``….norms.{0,1,2}``, ``transformer_decoder.post_norm``, ``cls_embed``,
``mask_embed``) so they load by name; attention 0 is the cross-attention, 1 the self-attention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .position_encoding import SinePositionEncoding

# Full-size parameter count (text_dim 768, hidden 256, 19 queries, 8 heads, 9 layers, FFN 2048, 3 levels):
#   text_proj    768·256 + 256 + 256·256 + 256                                 =    262,656
#   query_embed  19·256                                                        =      4,864
#   level_embed  3·256                                                         =        768
#   per layer    2 attentions × (in_proj 3·256·256 + 768, out_proj 256·256 + 256) = 526,336
#                FFN 256·2048 + 2048 + 2048·256 + 256                          =  1,050,880
#                3 LayerNorms × 512                                            =      1,536
#                                                                    → 1,578,752 × 9 = 14,208,768
#   post_norm    2·256                                                         =        512
#   cls_embed    256·20 + 20                                                   =      5,140
#   mask_embed   3 × (256·256 + 256)                                           =    197,376
#   total                                                                      = 14,680,084
FULL_SIZE_PARAMS = 14_680_084

# Full-size parameter count of the standard decoder (hidden 256, 100 queries, 19 classes, 8 heads, 9 layers,
# FFN 2048, 3 levels); the queries come from outside, so neither text_proj nor query_embed:
#   level_embed  3·256                                                         =        768
#   layers       9 × 1,578,752 (as above)                                      = 14,208,768
#   post_norm    2·256                                                         =        512
#   cls_embed    256·20 + 20 (19 classes + "no object"; the query count plays no part) =  5,140
#   mask_embed   3 × (256·256 + 256)                                           =    197,376
#   total                                                                      = 14,412,564
STANDARD_FULL_SIZE_PARAMS = 14_412_564


def segmentation_scores(class_logits: torch.Tensor, mask_logits: torch.Tensor) -> torch.Tensor:
    """Semantic scores of one prediction set: Σ_q softmax(cls)_qc · sigmoid(mask)_q (the official inference).

    Args:
        class_logits: (N, Q, C+1), the last class being "no object".
        mask_logits: (N, Q, H, W).

    Returns:
        (N, C, H, W), unnormalised per-class scores (each in [0, Q]).
    """
    probs = class_logits.softmax(dim=-1)[..., :-1]
    return torch.einsum("nqc,nqhw->nchw", probs, mask_logits.sigmoid())


def mask_logits_at(mask_logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, Q, h, w) mask logits resized bilinearly (align_corners False) to ``size`` = (H, W) where they differ."""
    if tuple(mask_logits.shape[-2:]) != tuple(size):
        mask_logits = F.interpolate(mask_logits, size=size, mode="bilinear", align_corners=False)
    return mask_logits


def attention_mask(mask_logits: torch.Tensor, size: tuple[int, int], num_heads: int) -> torch.Tensor:
    """Masked-attention mask from a prediction: True where a query may NOT attend.

    The logits are resized bilinearly (align_corners False) to ``size``; a pixel with sigmoid < 0.5
    is blocked, except in a row that would be blocked entirely, which is opened completely (a query
    attending nothing would give NaN). Built with tensor ops only, so it traces and exports.

    Args:
        mask_logits: (N, Q, h, w) mask logits of the previous prediction.
        size: (H, W) of the level attended next.
        num_heads: attention heads; the mask is repeated per head.

    Returns:
        (N·num_heads, Q, H·W) bool, batch-major then head (nn.MultiheadAttention's 3-D mask layout).
    """
    blocked = mask_logits_at(mask_logits, size).flatten(2).sigmoid() < 0.5
    blocked = blocked & ~blocked.all(dim=-1, keepdim=True)
    n, q, length = blocked.shape
    return blocked.detach()[:, None].expand(n, num_heads, q, length).reshape(n * num_heads, q, length)


class QueryAttention(nn.Module):
    """Multi-head attention with positional embeddings added to queries and keys (not values).

    Returns the attention output only; the caller adds the residual.

    Args:
        dim: token width.
        num_heads: attention heads.
        dropout: dropout on the attention weights and on the output projection.
    """

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.proj_drop = nn.Dropout(dropout)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, query_pos: torch.Tensor,
                key_pos: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Attend.

        Args:
            query: (N, Q, dim).
            key: (N, L, dim).
            value: (N, L, dim).
            query_pos: (N or 1, Q, dim), added to the query.
            key_pos: (N or 1, L, dim), added to the key.
            mask: (N·heads, Q, L) bool, True = not attended; None attends everywhere.

        Returns:
            (N, Q, dim).
        """
        out = self.attn(query + query_pos, key + key_pos, value, attn_mask=mask, need_weights=False)[0]
        return self.proj_drop(out)


class FeedForward(nn.Module):
    """Linear → ReLU → Dropout → Linear → Dropout (the residual is added by the caller).

    Args:
        dim: token width.
        hidden: inner width.
        dropout: dropout after each linear.
    """

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0) -> None:
        super().__init__()
        # Nested as in the checkpoints: layers.0.0 is the first linear, layers.1 the second.
        self.layers = nn.Sequential(nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout)),
                                    nn.Linear(hidden, dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(…, dim) → (…, dim)."""
        return self.layers(x)


class MaskedDecoderLayer(nn.Module):
    """Masked cross-attention → self-attention → FFN, each with a residual and a LayerNorm.

    Args:
        dim: token width.
        num_heads: attention heads.
        ffn_dim: FFN inner width.
        dropout: attention and FFN dropout.
        pre_norm: normalise before each block (x + f(LN(x))) instead of after (LN(x + f(x))).
    """

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, dropout: float = 0.0, pre_norm: bool = False) -> None:
        super().__init__()
        self.pre_norm = pre_norm
        self.attentions = nn.ModuleList([QueryAttention(dim, num_heads, dropout), QueryAttention(dim, num_heads,
                                                                                                 dropout)])
        self.ffns = nn.ModuleList([FeedForward(dim, ffn_dim, dropout)])
        self.norms = nn.ModuleList([nn.LayerNorm(dim) for _ in range(3)])

    def forward(self, query: torch.Tensor, query_pos: torch.Tensor, memory: torch.Tensor, memory_pos: torch.Tensor,
                mask: torch.Tensor | None) -> torch.Tensor:
        """Update the queries.

        Args:
            query: (N, Q, dim) content queries.
            query_pos: (N or 1, Q, dim) positional queries.
            memory: (N, L, dim) tokens of one level (level embedding included).
            memory_pos: (N or 1, L, dim) their positional encoding.
            mask: (N·heads, Q, L) bool cross-attention mask, True = not attended.

        Returns:
            (N, Q, dim).
        """
        cross, self_attn = self.attentions
        ffn = self.ffns[0]
        if self.pre_norm:
            h = self.norms[0](query)
            query = query + cross(h, memory, memory, query_pos, memory_pos, mask)
            h = self.norms[1](query)
            query = query + self_attn(h, h, h, query_pos, query_pos)
            return query + ffn(self.norms[2](query))
        query = self.norms[0](query + cross(query, memory, memory, query_pos, memory_pos, mask))
        query = self.norms[1](query + self_attn(query, query, query, query_pos, query_pos))
        return self.norms[2](query + ffn(query))


class MaskedTransformerDecoder(nn.Module):
    """The decoder layers and the LayerNorm shared by every prediction head (the checkpoints' post_norm).

    Args:
        dim: token width.
        num_heads: attention heads.
        num_layers: decoder layers.
        ffn_dim: FFN inner width.
        dropout: attention and FFN dropout.
        pre_norm: pre-norm layers instead of post-norm.
    """

    def __init__(self, dim: int, num_heads: int, num_layers: int, ffn_dim: int, dropout: float = 0.0,
                 pre_norm: bool = False) -> None:
        super().__init__()
        self.layers = nn.ModuleList([MaskedDecoderLayer(dim, num_heads, ffn_dim, dropout, pre_norm)
                                     for _ in range(num_layers)])
        self.post_norm = nn.LayerNorm(dim)


class MaskedQueryDecoder(nn.Module):
    """Mask2Former's transformer decoder with queries given from outside, masked attention over the levels.

    Args:
        hidden_dim: query and memory width (the pixel decoder's channels).
        num_queries: queries Q.
        num_classes: classes C; the class head predicts C + 1 logits (the last is "no object").
        num_heads: attention heads.
        num_layers: decoder layers (predictions: num_layers + 1 sets).
        ffn_dim: FFN inner width.
        mask_dim: channels of the mask features.
        num_levels: multi-scale levels attended in turn.
        dropout: attention and FFN dropout (official: 0).
        pre_norm: pre-norm layers (official: False, post-norm).
    """

    def __init__(
        self,
        hidden_dim: int = 256,
        num_queries: int = 100,
        num_classes: int = 19,
        num_heads: int = 8,
        num_layers: int = 9,
        ffn_dim: int = 2048,
        mask_dim: int = 256,
        num_levels: int = 3,
        dropout: float = 0.0,
        pre_norm: bool = False,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        if num_layers < 1:
            raise ValueError(f"{name}: num_layers must be at least 1, got {num_layers}")
        if hidden_dim % 4:
            raise ValueError(f"{name}: hidden_dim must be a multiple of 4 (sine encoding), got {hidden_dim}")
        self.hidden_dim = hidden_dim
        self.num_queries = num_queries
        self.num_classes = num_classes
        self.num_heads = num_heads
        self.num_layers = num_layers
        self.num_levels = num_levels
        self.mask_dim = mask_dim

        self.position_encoding = SinePositionEncoding(num_feats=hidden_dim // 2, normalize=True)
        self.level_embed = nn.Embedding(num_levels, hidden_dim)
        self.transformer_decoder = MaskedTransformerDecoder(hidden_dim, num_heads, num_layers, ffn_dim, dropout,
                                                            pre_norm)
        self.cls_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.mask_embed = nn.Sequential(nn.Linear(hidden_dim, hidden_dim), nn.ReLU(inplace=True),
                                        nn.Linear(hidden_dim, hidden_dim), nn.ReLU(inplace=True),
                                        nn.Linear(hidden_dim, mask_dim))
        self.reset_decoder_parameters()

    @torch.no_grad()
    def reset_decoder_parameters(self) -> None:
        """The official init: Xavier-normal on every matrix of the decoder layers (biases and norms untouched).

        The embeddings and heads keep PyTorch's defaults, as they do in the official head.
        """
        for p in self.transformer_decoder.parameters():
            if p.dim() > 1:
                nn.init.xavier_normal_(p)

    segmentation_scores = staticmethod(segmentation_scores)

    def _predict(self, query: torch.Tensor, mask_features: torch.Tensor,
                 with_class: bool = True) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Prediction heads on (N, Q, hidden) → class logits (N, Q, C+1) or None, mask logits (N, Q, h, w)."""
        x = self.transformer_decoder.post_norm(query)
        mask_logits = torch.einsum("nqc,nchw->nqhw", self.mask_embed(x), mask_features)
        return (self.cls_embed(x) if with_class else None), mask_logits

    def forward(self, multi_scale: list[torch.Tensor], mask_features: torch.Tensor, query: torch.Tensor,
                query_pos: torch.Tensor, all_sets: bool = True) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Decode.

        Args:
            multi_scale: num_levels maps (N, hidden_dim, h_l, w_l), lowest resolution first.
            mask_features: (N, mask_dim, H, W).
            query: (1 or N, num_queries, hidden_dim) content queries (1: shared by the batch).
            query_pos: (1 or N, num_queries, hidden_dim) positional queries.
            all_sets: return every prediction set (training); False returns only the last one (inference:
                the intermediate masks are still computed, for the attention masks, but at each level's
                size — bilinear resizing commutes with the mask einsum — and without class logits).

        Returns:
            Class logits, a list of (N, num_queries, num_classes + 1), and mask logits, a list of
            (N, num_queries, H, W): num_layers + 1 sets (initial queries first), or only the last.
        """
        name = type(self).__name__
        if len(multi_scale) != self.num_levels:
            raise ValueError(f"{name}: expected {self.num_levels} levels, got {len(multi_scale)}")
        n = mask_features.shape[0]
        for label, q in (("query", query), ("query_pos", query_pos)):
            if q.dim() != 3 or q.shape[0] not in (1, n) or tuple(q.shape[1:]) != (self.num_queries, self.hidden_dim):
                raise ValueError(f"{name}: {label} must be (1 or {n}, {self.num_queries}, {self.hidden_dim}), "
                                 f"got {tuple(q.shape)}")

        memories, memory_pos, sizes = [], [], []
        for level, x in enumerate(multi_scale):
            if x.shape[1] != self.hidden_dim:
                raise ValueError(f"{name}: level {level} has {x.shape[1]} channels, expected {self.hidden_dim}")
            sizes.append((int(x.shape[-2]), int(x.shape[-1])))
            # The level embedding goes into the values as well as the keys; the sine encoding only the keys.
            memories.append(x.flatten(2).transpose(1, 2) + self.level_embed.weight[level].to(x.dtype))
            memory_pos.append(self.position_encoding(x[:1]).flatten(2).transpose(1, 2))

        # The attention masks and heads work per sample; the positional part broadcasts in the additions.
        query = query.expand(n, -1, -1)
        # Inference: the masks that only steer attention are computed from features already at the level's
        # size, which equals resizing the full-resolution mask (both maps are linear) at a fraction of the cost.
        level_features = None if all_sets else [
            F.interpolate(mask_features, size=size, mode="bilinear", align_corners=False) for size in sizes]

        def steer(q: torch.Tensor, level: int) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
            """Predict from q; return (class logits, full-size mask logits or None, attention mask for level)."""
            if level_features is None:
                cls, masks = self._predict(q, mask_features)
                return cls, masks, attention_mask(masks, sizes[level], self.num_heads)
            _, small = self._predict(q, level_features[level], with_class=False)
            return None, None, attention_mask(small, sizes[level], self.num_heads)

        class_sets, mask_sets = [], []
        cls, masks, mask = steer(query, 0)
        if all_sets:
            class_sets.append(cls)
            mask_sets.append(masks)
        layers = self.transformer_decoder.layers
        for i, layer in enumerate(layers):
            level = i % self.num_levels
            query = layer(query, query_pos, memories[level], memory_pos[level], mask)
            if i < len(layers) - 1:
                cls, masks, mask = steer(query, (i + 1) % self.num_levels)
                if all_sets:
                    class_sets.append(cls)
                    mask_sets.append(masks)
        # The last set needs no attention mask.
        cls, masks = self._predict(query, mask_features)
        class_sets.append(cls)
        mask_sets.append(masks)
        return class_sets, mask_sets


class TextQueryDecoder(MaskedQueryDecoder):
    """tqdm's transformer decoder: one text-derived query per class, masked attention over the levels.

    The content queries are ``text_proj(text)``, the positional ones ``query_embed``; the rest is
    ``MaskedQueryDecoder`` with as many classes as queries.

    Args:
        text_dim: width of the text embeddings.
        num_queries: queries, one per class (also the number of classes predicted).
        The others: as ``MaskedQueryDecoder``.
    """

    def __init__(
        self,
        text_dim: int = 768,
        hidden_dim: int = 256,
        num_queries: int = 19,
        num_heads: int = 8,
        num_layers: int = 9,
        ffn_dim: int = 2048,
        mask_dim: int = 256,
        num_levels: int = 3,
        dropout: float = 0.0,
        pre_norm: bool = False,
    ) -> None:
        # The query modules are created, and then registered, ahead of the shared ones: the checkpoints list
        # them first, optimizer states follow the parameter order, and a seeded init draws in this order.
        text_proj = nn.Sequential(nn.Linear(text_dim, hidden_dim), nn.ReLU(inplace=True),
                                  nn.Linear(hidden_dim, hidden_dim))
        query_embed = nn.Embedding(num_queries, hidden_dim)
        super().__init__(hidden_dim, num_queries, num_queries, num_heads, num_layers, ffn_dim, mask_dim,
                         num_levels, dropout, pre_norm)
        shared = {key: self._modules.pop(key) for key in list(self._modules)}
        self.text_proj = text_proj
        self.query_embed = query_embed
        self._modules.update(shared)

    def forward(self, multi_scale: list[torch.Tensor], mask_features: torch.Tensor, text: torch.Tensor,
                all_sets: bool = True) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Decode.

        Args:
            multi_scale: num_levels maps (N, hidden_dim, h_l, w_l), lowest resolution first.
            mask_features: (N, mask_dim, H, W).
            text: (N, num_queries, text_dim) text embeddings, or (num_queries, text_dim) shared by the batch.
            all_sets: every prediction set, or only the last (see ``MaskedQueryDecoder.forward``).

        Returns:
            Class logits, a list of (N, num_queries, num_queries + 1), and mask logits, a list of
            (N, num_queries, H, W): num_layers + 1 sets (initial queries first), or only the last.
        """
        n = mask_features.shape[0]
        if text.dim() == 2:
            text = text.unsqueeze(0).expand(n, -1, -1)
        if tuple(text.shape[:2]) != (n, self.num_queries):
            raise ValueError(f"TextQueryDecoder: text must be (N, {self.num_queries}, text_dim), "
                             f"got {tuple(text.shape)}")
        query = self.text_proj(text)
        query_pos = self.query_embed.weight.unsqueeze(0).to(query.dtype)
        return super().forward(multi_scale, mask_features, query, query_pos, all_sets)
