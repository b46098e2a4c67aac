"""MFuser: DINOv2 and a VLM vision tower fused by MVFusers, text queries refined by MTEnhancer, tqdm's head.

The model receives its parts through the constructor (see ``training.build.build_mfuser`` for the
official sizes). Per window of the input (the official model sees exactly 512×512):

1. :class:`~training.models.fused_encoder.FusedEncoder` runs both frozen towers block by block with an
   MVFuser after every pair and returns four 2D-channel maps (simple FPN), the global image embedding
   and the dense visual embedding in the joint image-text space.
2. :class:`~training.models.text_encoder.PromptTextEncoder` gives one embedding per class from the frozen
   text tower and the learnable prompt context; it does not depend on the image, so an exported graph
   holds it as a constant.
3. The context decoder (MTEnhancer) refines the text with the image: t ← t + γ ⊙ MTEnhancer(t, [global;
   visual]).
4. The pixel–text score map (cosine similarity of the normalised visual and text embeddings) feeds only
   the alignment loss; the head receives the refined, unnormalised text.
5. :class:`TextQueryHead`: tqdm's pixel decoder and masked transformer decoder with one text query per
   class; the segmentation scores are Σ_q softmax(class_q)[c] · sigmoid(mask_q).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .fused_encoder import FusedEncoder
from .mask_decoder import TextQueryDecoder, segmentation_scores
from .pixel_decoder import TextPixelDecoder
from .text_encoder import PromptTextEncoder
from .text_enhancer import ContextDecoder


class TextQueryHead(nn.Module):
    """tqdm's decode head: the text-conditioned pixel decoder, then the masked decoder with text queries.

    Args:
        pixel_decoder: multi-scale deformable-attention pixel decoder with text-to-pixel attention.
        decoder: masked transformer decoder, one query per class.
    """

    def __init__(self, pixel_decoder: TextPixelDecoder, decoder: TextQueryDecoder) -> None:
        super().__init__()
        self.pixel_decoder = pixel_decoder
        self.decoder = decoder

    def forward(self, maps: list[torch.Tensor], text: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """maps: 4 × (N,C_l,H_l,W_l) highest resolution first; text (N,K,E) → class logits and mask logits.

        Returns:
            Per prediction set (initial queries, then every decoder layer): class logits (N,K,K+1) and
            mask logits (N,K,H_0,W_0) at the highest map's resolution.
        """
        mask_features, multi_scale = self.pixel_decoder(maps, text)
        return self.decoder(multi_scale, mask_features, text)


class MFuserOutputs(NamedTuple):
    """What training needs from one forward pass."""

    class_logits: list[torch.Tensor]  # per prediction set (N,K,K+1)
    mask_logits: list[torch.Tensor]  # per prediction set (N,K,H/s,W/s)
    score_map: torch.Tensor  # pixel-text cosine similarities (N,K,h,w) on the token grid


class MFuser(nn.Module):
    """The MFuser segmentor: (N,3,H,W) normalised with the VLM's statistics → class scores (N,K,H/s,W/s).

    Parameter names follow the released checkpoints where they can (``contexts`` in the text encoder,
    ``gamma``, ``context_decoder``, ``decode_head``); ``training.convert_mfuser`` maps the rest.

    Args:
        backbone: the fused DINOv2 + VLM encoder (frozen towers, trainable fusers and FPN).
        text_encoder: frozen text tower with the learnable prompt context.
        context_decoder: MTEnhancer.
        decode_head: tqdm's head.
        gamma: initial values of γ (E,), the per-channel weight of MTEnhancer's update.
    """

    def __init__(self, backbone: FusedEncoder, text_encoder: PromptTextEncoder, context_decoder: ContextDecoder,
                 decode_head: TextQueryHead, gamma: torch.Tensor) -> None:
        super().__init__()
        self.backbone = backbone
        self.text_encoder = text_encoder
        self.context_decoder = context_decoder
        self.decode_head = decode_head
        self.gamma = nn.Parameter(gamma.clone())

    def forward(self, x: torch.Tensor, text: torch.Tensor | None = None) -> torch.Tensor:
        """Segmentation scores (N,K,H/s,W/s) of the last prediction set (s = 512/144 at the official size).

        Args:
            x: (N,3,H,W), normalised with the VLM's mean and std.
            text: the text encoder's output (K,E), when precomputed (it does not depend on the image).
        """
        out = self.forward_train(x, text, all_sets=False)
        return segmentation_scores(out.class_logits[-1], out.mask_logits[-1])

    def forward_train(self, x: torch.Tensor, text: torch.Tensor | None = None,
                      all_sets: bool = True) -> MFuserOutputs:
        """Everything the losses need: every prediction set and the pixel-text score map."""
        features = self.backbone(x)
        n = x.shape[0]
        text = (self.text_encoder() if text is None else text).expand(n, -1, -1)  # (N,K,E)
        visual = features.visual_embed  # (N,E,h,w)
        context = torch.cat([features.global_embed[:, None], visual.flatten(2).transpose(1, 2)], dim=1)
        text = text + self.gamma * self.context_decoder(text, context)
        score_map = torch.einsum("nchw,nkc->nkhw", F.normalize(visual, dim=1), F.normalize(text, dim=-1))
        class_logits, mask_logits = self.decode_head(features.maps, text)
        if not all_sets:
            class_logits, mask_logits = class_logits[-1:], mask_logits[-1:]
        return MFuserOutputs(class_logits, mask_logits, score_map)
