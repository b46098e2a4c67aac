"""DepthForge and Rein: a frozen foundation ViT refined by learnable tokens, and a Mask2Former head.

The model receives its parts through the constructor (see ``training.build.build_depthforge`` for the
official sizes). Per window of the input (the official models see exactly 512×512):

1. :class:`~training.models.rein_encoder.ReinEncoder` runs the frozen visual tower with the tokens after
   every block — DepthForge's tokens also look at the frozen Depth Anything V2 encoder run in lockstep,
   Rein's do not — and returns four maps at strides 4, 8, 16 and 32.
2. The decoder queries come from the tokens alone (:meth:`ReinTokens.queries`): image-independent, so an
   exported graph holds them as a constant.
3. :class:`MaskFormerHead`: DepthForge first adds the dynamic query correction (DQCM) of all four maps to
   the stride-4 map; then the deformable-attention pixel decoder and the masked transformer decoder with
   query_pos = q and content queries = ``querys2feat(q)``. Scores are Σ_q softmax(class_q)[c] · sigmoid(mask_q).

Rein is this model without the depth tower and without DQCM (family ``rein``), the baseline that shows
what depth adds.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from .mask_decoder import MaskedQueryDecoder, segmentation_scores
from .pixel_decoder import DeformPixelDecoder
from .query_correction import QueryCorrection
from .rein_encoder import ReinEncoder


class MaskFormerHead(nn.Module):
    """Rein's Mask2Former head with outside queries, and DepthForge's DQCM in front of it.

    Args:
        pixel_decoder: the deformable-attention pixel decoder (no text).
        decoder: the masked transformer decoder.
        correction: DQCM (DepthForge), or None (Rein).
    """

    def __init__(self, pixel_decoder: DeformPixelDecoder, decoder: MaskedQueryDecoder,
                 correction: QueryCorrection | None = None) -> None:
        super().__init__()
        self.pixel_decoder = pixel_decoder
        self.decoder = decoder
        hidden = decoder.hidden_dim
        self.querys2feat = nn.Linear(hidden, hidden)
        self.correction = correction

    def forward(self, maps: list[torch.Tensor], queries: torch.Tensor,
                all_sets: bool = True) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Decode.

        Args:
            maps: four (N, C, H_l, W_l), highest resolution first.
            queries: (Q, hidden) or (N, Q, hidden), the tokens' queries (the positional part).
            all_sets: every prediction set (training) or only the last.

        Returns:
            Class logits [(N, Q, K+1)] and mask logits [(N, Q, H_0, W_0)] per prediction set.
        """
        if self.correction is not None:
            maps = [maps[0] + self.correction(maps), *maps[1:]]
        mask_features, multi_scale = self.pixel_decoder(maps)
        if queries.dim() == 2:
            queries = queries.unsqueeze(0)
        return self.decoder(multi_scale, mask_features, self.querys2feat(queries), queries, all_sets=all_sets)


class MaskFormerOutputs(NamedTuple):
    """What training needs from one forward pass."""

    class_logits: list[torch.Tensor]  # per prediction set (N, Q, K+1)
    mask_logits: list[torch.Tensor]  # per prediction set (N, Q, H/4, W/4)


class DepthForge(nn.Module):
    """(N, 3, H, W) normalised with the visual tower's statistics → class scores (N, K, H/4, W/4).

    Args:
        backbone: the encoder (frozen towers, trainable tokens).
        decode_head: the Mask2Former head (with DQCM for DepthForge).
    """

    def __init__(self, backbone: ReinEncoder, decode_head: MaskFormerHead) -> None:
        super().__init__()
        self.backbone = backbone
        self.decode_head = decode_head

    @property
    def uses_depth(self) -> bool:
        """True for DepthForge, False for the Rein baseline."""
        return self.backbone.depth is not None

    def queries(self) -> torch.Tensor:
        """Decoder queries of shape (Q, hidden); they do not depend on the image."""
        return self.backbone.reins.queries()

    def forward(self, x: torch.Tensor, queries: torch.Tensor | None = None) -> torch.Tensor:
        """Segmentation scores (N, K, H/4, W/4) of the last prediction set.

        Args:
            x: (N, 3, H, W), normalised.
            queries: :meth:`queries`, when precomputed (an exported graph holds them as a constant).
        """
        out = self.forward_train(x, queries, all_sets=False)
        return segmentation_scores(out.class_logits[-1], out.mask_logits[-1])

    def forward_train(self, x: torch.Tensor, queries: torch.Tensor | None = None,
                      all_sets: bool = True) -> MaskFormerOutputs:
        """Every prediction set (initial queries, then each decoder layer), for the losses."""
        maps = self.backbone(x)
        queries = self.queries() if queries is None else queries
        class_logits, mask_logits = self.decode_head(maps, queries, all_sets=all_sets)
        return MaskFormerOutputs(class_logits, mask_logits)
