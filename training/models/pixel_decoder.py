"""Multi-scale deformable-attention pixel decoders: Mask2Former's standard one and tqdm / MFuser's text-conditioned one.

Inputs are the backbone pyramid, highest resolution first, and for the text-conditioned variant the refined
class-text embeddings (N, num_texts, text_dim). The standard decoder (mmdet's ``MSDeformAttnPixelDecoder`` as the
Rein / DepthForge heads configure it) takes four 1024-channel maps of 128², 64², 32², 16² for a 512² window;
tqdm's takes four 2048-channel maps of 144², 72², 36², 18². Structure:

1. The ``num_deform_levels`` lowest-resolution maps (e.g. 16², 32², 64²) each go through a 1×1 conv +
   GroupNorm(32) to ``conv_dim`` and are flattened into one token sequence, lowest resolution first. Their
   positional embedding is a normalised sine encoding plus a learned per-level embedding (level 0 = lowest
   resolution).
2. ``num_layers`` post-norm layers, each
   x = LN(x + MSDeformAttn(q = x + pos, values = x)), over all levels, reference points at pixel centres;
   only with text: x = LN(x + MHA(q = x + pos, k = text + text_pos, v = text)), pixels attending to the text
   tokens (text = Linear(text_dim → conv_dim)(text), text_pos a learned num_texts × conv_dim table);
   x = LN(x + FFN(x)), FFN conv_dim → ffn_dim → conv_dim with ReLU (ffn_dim 1024 standard, 2048 in tqdm);
   then, in tqdm only, one final LayerNorm over the result (the encoder's post-norm; mmdet 3.x's encoder has
   none).
3. FPN on the remaining high-resolution input(s): lateral 1×1 conv + GN, plus the bilinearly upsampled
   (align_corners=False) highest-resolution encoder output, then 3×3 conv + GN + ReLU; a 1×1 conv gives the
   mask features.

The official layers drop out nothing (all rates 0.0); ``dropout`` keeps the places where mmcv applies it
(after each attention's output projection, and inside the FFN after the activation and after the second
linear layer) for experiments. Submodule and parameter names mirror the mmcv checkpoints
(``input_convs.0.conv``/``.gn``, ``encoder.layers.k.attentions.{0,1}``, ``norms.{0,1,2}``,
``ffns.0.layers``, ``encoder.post_norm``, ``level_encoding``, ``lateral_convs``, ``output_convs``,
``mask_feature``, ``text_proj``, ``text_pos_embed``), so decode-head weights load by name after the
``decode_head.pixel_decoder.`` prefix is stripped. Without text a layer has ``attentions.0``, ``norms.{0,1}``
and ``ffns.0`` (mmdet 3.x calls them ``self_attn``, ``norms`` and ``ffn``; a conversion renames them).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from training.models.ms_deform_attn import MSDeformAttn
from training.models.portable import arange_like
from training.models.position_encoding import SinePositionEncoding

GN_GROUPS = 32

# Full-size parameter count of the standard decoder (in_channels [1024] * 4, conv_dim 256, mask_dim 256, 8 heads,
# 3 levels, 4 points, FFN 1024, 6 layers, no text, no final LayerNorm):
#   input_convs    3 × (1024·256 + 256 + GN 2·256)                                =    788,736
#   level_encoding 3·256                                                          =        768
#   per layer      MSDeformAttn: offsets 256·192 + 192, weights 256·96 + 96,
#                  value and output projections 2 × (256·256 + 256)               =    205,600
#                  2 LayerNorms × 512                                             =      1,024
#                  FFN 256·1024 + 1024 + 1024·256 + 256                           =    525,568
#                                                                       → 732,192 × 6 = 4,393,152
#   lateral_convs  1024·256 (no bias) + GN 512                                    =    262,656
#   output_convs   256·256·9 (no bias) + GN 512                                   =    590,336
#   mask_feature   256·256 + 256                                                  =     65,792
#   total                                                                         =  6,101,440
STANDARD_FULL_SIZE_PARAMS = 6_101_440


class ConvGN(nn.Module):
    """Conv2d → GroupNorm (→ ReLU), mmcv ``ConvModule`` naming (``conv``, ``gn``).

    Args:
        in_channels: input channels.
        out_channels: output channels (a multiple of the GroupNorm group count).
        kernel_size: square kernel; padding keeps the size.
        bias: conv bias (redundant before GroupNorm, but the input projections of the official decoder
            have one).
        relu: apply ReLU after the norm.
        groups: GroupNorm groups.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, bias: bool = True,
                 relu: bool = False, groups: int = GN_GROUPS) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=bias)
        self.gn = nn.GroupNorm(groups, out_channels)
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply conv, norm and (optionally) ReLU.

        Args:
            x: (N, in_channels, H, W).

        Returns:
            (N, out_channels, H, W).
        """
        x = self.gn(self.conv(x))
        return F.relu(x) if self.relu else x


class TextCrossAttention(nn.Module):
    """Pixels-to-text multi-head attention; ``attn`` holds torch's packed in/out projections (mmcv naming).

    Args:
        embed_dim: channel width of pixels and projected text.
        num_heads: attention heads.
    """

    def __init__(self, embed_dim: int, num_heads: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(embed_dim, num_heads, batch_first=True)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """Attend from pixels to text tokens.

        Args:
            query: (N, Lq, C) pixel tokens (with their positional embedding).
            key: (N, T, C) text tokens with the text positional embedding.
            value: (N, T, C) text tokens.

        Returns:
            (N, Lq, C), after the output projection (no residual).
        """
        return self.attn(query, key, value, need_weights=False)[0]


class FFN(nn.Module):
    """Two-layer ReLU MLP; ``layers`` nests like mmcv's FFN so the checkpoint keys match.

    Args:
        embed_dim: input and output width.
        hidden_dim: hidden width.
        dropout: after the activation and after the second linear layer.
    """

    def __init__(self, embed_dim: int, hidden_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Sequential(nn.Linear(embed_dim, hidden_dim), nn.ReLU(inplace=True), nn.Dropout(dropout)),
            nn.Linear(hidden_dim, embed_dim),
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the MLP (no residual).

        Args:
            x: (..., embed_dim).

        Returns:
            (..., embed_dim).
        """
        return self.layers(x)


class DeformEncoderLayer(nn.Module):
    """One post-norm encoder layer: deformable self-attention (→ text cross-attention) → FFN.

    Args:
        embed_dim: token width.
        num_heads: heads of the attentions.
        num_levels: feature levels of the deformable attention.
        num_points: sampling points per head and level.
        ffn_dim: FFN hidden width.
        dropout: on each attention's output before its residual add, and inside the FFN.
        text_attention: add the pixels-to-text attention (``attentions.1``, three norms instead of two).
    """

    def __init__(self, embed_dim: int, num_heads: int, num_levels: int, num_points: int, ffn_dim: int,
                 dropout: float = 0.0, text_attention: bool = False) -> None:
        super().__init__()
        self.text_attention = text_attention
        attentions: list[nn.Module] = [MSDeformAttn(embed_dim, num_heads, num_levels, num_points)]
        if text_attention:
            attentions.append(TextCrossAttention(embed_dim, num_heads))
        self.attentions = nn.ModuleList(attentions)
        self.norms = nn.ModuleList([nn.LayerNorm(embed_dim) for _ in range(len(attentions) + 1)])
        self.ffns = nn.ModuleList([FFN(embed_dim, ffn_dim, dropout)])
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, reference_points: torch.Tensor,
                spatial_shapes: Sequence[tuple[int, int]], text: torch.Tensor | None = None,
                text_pos: torch.Tensor | None = None) -> torch.Tensor:
        """Update the pixel tokens.

        Args:
            x: (N, S, C) pixel tokens of all levels.
            pos: (N, S, C) their positional embedding (sine + level).
            reference_points: (N, S, levels, 2), each token's pixel centre in [0, 1]².
            spatial_shapes: (h, w) of each level, in token order.
            text: (N, T, C) projected text tokens; given exactly when the layer has text attention.
            text_pos: (1 or N, T, C) text positional embedding, with ``text``.

        Returns:
            (N, S, C).
        """
        if self.text_attention != (text is not None and text_pos is not None):
            raise ValueError("DeformEncoderLayer: text and text_pos are required with text attention and "
                             "refused without it")
        # The values are the tokens without position; only offsets and weights see it (through the query).
        x = self.norms[0](x + self.dropout(self.attentions[0](x + pos, reference_points, x, spatial_shapes)))
        if text is not None and text_pos is not None:
            x = self.norms[1](x + self.dropout(self.attentions[1](x + pos, text + text_pos, text)))
        return self.norms[-1](x + self.ffns[0](x))


class TextPixelDecoderLayer(DeformEncoderLayer):
    """tqdm's encoder layer: ``DeformEncoderLayer`` with the text attention (arguments as there)."""

    def __init__(self, embed_dim: int, num_heads: int, num_levels: int, num_points: int, ffn_dim: int,
                 dropout: float = 0.0) -> None:
        super().__init__(embed_dim, num_heads, num_levels, num_points, ffn_dim, dropout, text_attention=True)


class DeformEncoder(nn.Module):
    """The stack of encoder layers (``layers``), optionally followed by a final LayerNorm (``post_norm``).

    Args:
        num_layers: encoder layers.
        embed_dim: token width.
        num_heads: attention heads.
        num_levels: deformable-attention levels.
        num_points: sampling points per head and level.
        ffn_dim: FFN hidden width.
        dropout: see ``DeformEncoderLayer``.
        text_attention: layers with the pixels-to-text attention.
        post_norm: a LayerNorm over the last layer's output (tqdm); mmdet 3.x's encoder has none.
    """

    def __init__(self, num_layers: int, embed_dim: int, num_heads: int, num_levels: int, num_points: int,
                 ffn_dim: int, dropout: float = 0.0, text_attention: bool = False, post_norm: bool = False) -> None:
        super().__init__()
        self.layers = nn.ModuleList([
            DeformEncoderLayer(embed_dim, num_heads, num_levels, num_points, ffn_dim, dropout, text_attention)
            for _ in range(num_layers)
        ])
        self.post_norm = nn.LayerNorm(embed_dim) if post_norm else None

    def forward(self, x: torch.Tensor, pos: torch.Tensor, reference_points: torch.Tensor,
                spatial_shapes: Sequence[tuple[int, int]], text: torch.Tensor | None = None,
                text_pos: torch.Tensor | None = None) -> torch.Tensor:
        """Run all layers, then the final norm if any (applied once, to the output only).

        Args:
            x: (N, S, C).
            pos: (N, S, C).
            reference_points: (N, S, levels, 2).
            spatial_shapes: (h, w) per level.
            text: (N, T, C), with text attention only.
            text_pos: (1 or N, T, C), with text attention only.

        Returns:
            (N, S, C).
        """
        for layer in self.layers:
            x = layer(x, pos, reference_points, spatial_shapes, text, text_pos)
        return x if self.post_norm is None else self.post_norm(x)


class TextPixelEncoder(DeformEncoder):
    """tqdm's encoder: text attention in every layer and the final LayerNorm (arguments as ``DeformEncoder``)."""

    def __init__(self, num_layers: int, embed_dim: int, num_heads: int, num_levels: int, num_points: int,
                 ffn_dim: int, dropout: float = 0.0) -> None:
        super().__init__(num_layers, embed_dim, num_heads, num_levels, num_points, ffn_dim, dropout,
                         text_attention=True, post_norm=True)


def pixel_centres(spatial_shapes: Sequence[tuple[int, int]], like: torch.Tensor) -> torch.Tensor:
    """Normalised pixel centres of every level, concatenated in token order.

    Args:
        spatial_shapes: (h, w) per level.
        like: a tensor of the output's dtype and device.

    Returns:
        (S, 2) as (x, y) = ((j + 0.5)/w, (i + 0.5)/h), row-major within each level.
    """
    points = []
    for h, w in spatial_shapes:
        ys = (arange_like(like, h, dtype=like.dtype) + 0.5) / h
        xs = (arange_like(like, w, dtype=like.dtype) + 0.5) / w
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        points.append(torch.stack([grid_x, grid_y], dim=-1).reshape(-1, 2))
    return torch.cat(points, dim=0)


class DeformPixelDecoder(nn.Module):
    """MSDeformAttn pixel decoder: pyramid (+ text) → mask features and encoder levels.

    The defaults are Mask2Former's standard decoder (no text, FFN 1024, no final LayerNorm);
    ``TextPixelDecoder`` is tqdm's text-conditioned configuration.

    Args:
        in_channels: channels of each input level, highest resolution first (e.g. [1024] * 4 for maps of
            128², 64², 32², 16²). At least ``num_deform_levels`` levels; those beyond the deformable ones (the
            highest-resolution ones) go through the FPN.
        conv_dim: token / feature width inside the decoder.
        mask_dim: channels of the mask features.
        num_layers: encoder layers.
        num_heads: attention heads (deformable and text attention).
        num_points: deformable sampling points per head and level.
        ffn_dim: FFN hidden width.
        dropout: dropout rate in the encoder layers; the official decoders use 0.0 everywhere.
        num_deform_levels: lowest-resolution levels refined by the encoder.
        text_dim: width of the text embeddings; required with text, refused without.
        num_texts: number of text tokens (classes); 0 builds no text attention, more adds it to every layer
            with a text positional table of this many rows.
        post_norm: a LayerNorm over the encoder's output.
    """

    def __init__(self, in_channels: list[int], conv_dim: int = 256, mask_dim: int = 256, num_layers: int = 6,
                 num_heads: int = 8, num_points: int = 4, ffn_dim: int = 1024, dropout: float = 0.0,
                 num_deform_levels: int = 3, text_dim: int | None = None, num_texts: int = 0,
                 post_norm: bool = False) -> None:
        super().__init__()
        name = type(self).__name__
        if len(in_channels) < num_deform_levels:
            raise ValueError(f"{name}: {num_deform_levels} deformable levels need at least as many "
                             f"inputs, got in_channels {in_channels}")
        if num_texts < 0 or (num_texts > 0) != (text_dim is not None):
            raise ValueError(f"{name}: text_dim must be given exactly when num_texts > 0, got text_dim {text_dim}, "
                             f"num_texts {num_texts}")
        self.in_channels = list(in_channels)
        self.num_texts = num_texts
        self.conv_dim = conv_dim
        self.num_deform_levels = num_deform_levels
        self.num_fpn_levels = len(in_channels) - num_deform_levels
        num_inputs = len(in_channels)
        # Index 0 is the lowest-resolution input (the last in ``in_channels``), as the level embedding.
        self.input_convs = nn.ModuleList([
            ConvGN(in_channels[num_inputs - 1 - i], conv_dim, kernel_size=1, bias=True)
            for i in range(num_deform_levels)
        ])
        self.position_encoding = SinePositionEncoding(conv_dim // 2, normalize=True)
        self.level_encoding = nn.Embedding(num_deform_levels, conv_dim)
        self.encoder = DeformEncoder(num_layers, conv_dim, num_heads, num_deform_levels, num_points, ffn_dim,
                                     dropout, text_attention=num_texts > 0, post_norm=post_norm)
        # Registered here, between the encoder and the FPN, to keep the checkpoints' parameter order (and
        # with it optimizer states and the random draws of a seeded init).
        if text_dim is not None:
            self.text_proj = nn.Linear(text_dim, conv_dim)
            self.text_pos_embed = nn.Embedding(num_texts, conv_dim)
        # FPN steps from low to high resolution: step j refines input num_fpn_levels − 1 − j.
        self.lateral_convs = nn.ModuleList([
            ConvGN(in_channels[self.num_fpn_levels - 1 - j], conv_dim, kernel_size=1, bias=False)
            for j in range(self.num_fpn_levels)
        ])
        self.output_convs = nn.ModuleList([
            ConvGN(conv_dim, conv_dim, kernel_size=3, bias=False, relu=True) for _ in range(self.num_fpn_levels)
        ])
        self.mask_feature = nn.Conv2d(conv_dim, mask_dim, kernel_size=1)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Re-initialise as the official decoders do.

        Input projections xavier-uniform; FPN and mask convs "caffe2 xavier" (kaiming-uniform with a = 1,
        i.e. U(±√(3/fan_in))); conv biases 0; level embedding N(0, 1); every matrix in the encoder
        xavier-normal, then the deformable attentions' own init on top. Norms, the text projection and the
        text positional table keep torch's defaults, as in the official code.
        """
        for block in self.input_convs:
            nn.init.xavier_uniform_(block.conv.weight)
            nn.init.zeros_(block.conv.bias)
        for conv in [b.conv for b in self.lateral_convs] + [b.conv for b in self.output_convs] + [self.mask_feature]:
            nn.init.kaiming_uniform_(conv.weight, a=1, mode="fan_in", nonlinearity="leaky_relu")
            if conv.bias is not None:
                nn.init.zeros_(conv.bias)
        nn.init.normal_(self.level_encoding.weight, mean=0.0, std=1.0)
        for p in self.encoder.parameters():
            if p.dim() > 1:
                nn.init.xavier_normal_(p)
        for layer in self.encoder.layers:
            layer.attentions[0].reset_parameters()

    def forward(self, features: list[torch.Tensor],
                text: torch.Tensor | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Decode the pyramid (under text guidance when the decoder has text attention).

        Args:
            features: one (N, in_channels[i], H_i, W_i) map per input level, highest resolution first.
            text: (N, num_texts, text_dim) class-text embeddings; required with text attention, refused without.

        Returns:
            mask_features: (N, mask_dim, H_0, W_0), at the highest input resolution.
            multi_scale: the ``num_deform_levels`` encoder outputs as (N, conv_dim, h, w), lowest resolution
                first (16², 32², 64² for a 512² window at stride 32 … 8), the order the transformer decoder
                cycles through.
        """
        name = type(self).__name__
        if len(features) != len(self.in_channels):
            raise ValueError(f"{name}: {len(self.in_channels)} feature maps expected, got {len(features)}")
        if self.num_texts == 0 and text is not None:
            raise ValueError(f"{name}: this decoder has no text attention, text must be None")
        if self.num_texts > 0 and (text is None or text.dim() != 3 or text.shape[1] != self.num_texts):
            got = None if text is None else tuple(text.shape)
            raise ValueError(f"{name}: text must be (N, {self.num_texts}, text_dim), got {got}")
        n = features[0].shape[0]
        tokens, positions, spatial_shapes = [], [], []
        for i, conv in enumerate(self.input_convs):
            projected = conv(features[len(features) - 1 - i])
            h, w = int(projected.shape[-2]), int(projected.shape[-1])
            pos = self.position_encoding(projected) + self.level_encoding.weight[i].view(1, -1, 1, 1)
            tokens.append(projected.flatten(2).transpose(1, 2))  # (N, h·w, C)
            positions.append(pos.flatten(2).transpose(1, 2))
            spatial_shapes.append((h, w))
        x = torch.cat(tokens, dim=1)
        pos = torch.cat(positions, dim=1)
        # Every token samples all levels around its own centre (the same normalised point on each level).
        centres = pixel_centres(spatial_shapes, x)
        reference_points = centres[None, :, None, :].expand(n, -1, self.num_deform_levels, -1)
        text_tokens = text_pos = None
        if text is not None:
            text_tokens = self.text_proj(text)
            text_pos = self.text_pos_embed.weight.to(text_tokens.dtype).unsqueeze(0)
        x = self.encoder(x, pos, reference_points, spatial_shapes, text_tokens, text_pos)

        sizes = [h * w for h, w in spatial_shapes]
        outs = [chunk.transpose(1, 2).reshape(n, self.conv_dim, h, w)
                for chunk, (h, w) in zip(x.split(sizes, dim=1), spatial_shapes)]
        for j, (lateral, output) in enumerate(zip(self.lateral_convs, self.output_convs)):
            lat = lateral(features[self.num_fpn_levels - 1 - j])
            up = F.interpolate(outs[-1], size=lat.shape[-2:], mode="bilinear", align_corners=False)
            outs.append(output(lat + up))
        return self.mask_feature(outs[-1]), outs[:self.num_deform_levels]


class TextPixelDecoder(DeformPixelDecoder):
    """tqdm's text-conditioned pixel decoder: ``DeformPixelDecoder`` with text attention and the final norm.

    Args:
        in_channels: channels of each input level, highest resolution first (e.g. [2048] * 4 for maps of
            144², 72², 36², 18²).
        text_dim: width of the text embeddings.
        num_texts: number of text tokens (classes), at least 1; the text positional table has this many rows.
        conv_dim: token / feature width inside the decoder.
        mask_dim: channels of the mask features.
        num_layers: encoder layers.
        num_heads: attention heads (deformable and text attention).
        num_points: deformable sampling points per head and level.
        ffn_dim: FFN hidden width (2048 in the official config, which overrides the 1024 of its FFN block).
        dropout: dropout rate in the encoder layers; the official decoder uses 0.0 everywhere.
        num_deform_levels: lowest-resolution levels refined by the encoder.
    """

    def __init__(self, in_channels: list[int], text_dim: int = 768, num_texts: int = 19, conv_dim: int = 256,
                 mask_dim: int = 256, num_layers: int = 6, num_heads: int = 8, num_points: int = 4,
                 ffn_dim: int = 2048, dropout: float = 0.0, num_deform_levels: int = 3) -> None:
        if num_texts < 1:
            raise ValueError(f"TextPixelDecoder: num_texts must be at least 1, got {num_texts}")
        super().__init__(in_channels, conv_dim=conv_dim, mask_dim=mask_dim, num_layers=num_layers,
                         num_heads=num_heads, num_points=num_points, ffn_dim=ffn_dim, dropout=dropout,
                         num_deform_levels=num_deform_levels, text_dim=text_dim, num_texts=num_texts,
                         post_norm=True)

    def forward(self, features: list[torch.Tensor], text: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Decode the pyramid under text guidance.

        Args:
            features: one (N, in_channels[i], H_i, W_i) map per input level, highest resolution first.
            text: (N, num_texts, text_dim) class-text embeddings.

        Returns:
            mask_features: (N, mask_dim, H_0, W_0), at the highest input resolution.
            multi_scale: the ``num_deform_levels`` encoder outputs as (N, conv_dim, h, w), lowest resolution
                first (18², 36², 72² for a 512² crop), the order the transformer decoder cycles through.
        """
        return super().forward(features, text)
