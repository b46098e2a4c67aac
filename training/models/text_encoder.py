"""Frozen CLIP-family text towers (built by open_clip) with learnable CoOp prompt context.

MFuser (like tqdm and DenseCLIP before it) turns every class name into a text query once per step:

* The class name is tokenized to a short sequence of ``NAME_LENGTH`` = 5 ids: [SOT, name pieces…, EOT, pad…].
* ``n_ctx`` learnable context vectors (1, n_ctx, width) are inserted right after the first token, so the
  tower sees [SOT, ctx_1 … ctx_n, name pieces…, EOT, pad…] — no hand-written template. The tower's positional
  embedding is truncated to that total length (13 for EVA02-CLIP-L: 8 contexts + 5; 10 for the official
  CLIP-L and SigLIP-L variants: 5 contexts + 5).
* The tower runs causally, and the output is the final-norm feature at the EOT position (argmax of the ids,
  EOT being the largest id, shifted by n_ctx), times the text projection. The embedding is *not* normalised
  here: the official refines the raw embedding and normalises only for its pixel–text score map.

The tower is open_clip's own ``TextTransformer`` (no reimplementation); :class:`PromptTextEncoder` runs its
modules (token_embedding, positional_embedding, transformer with its mask, ln_final, text_projection) on the
embedded prompts. The tower is frozen in MFuser; freezing is left to the training code, which goes by name:
``<encoder>.text.*`` frozen, ``<encoder>.contexts`` trainable.

SigLIP's text tower differs: its sentencepiece tokenizer has no start token ([pieces…, </s>, pad…], pad and
</s> both id 1), attention is bidirectional and the pooled feature is the *last* position. The official
SigLIP variant still inserts the contexts after the first id — i.e. after the first word piece — and pools
the last position of the 10-token prompt (always </s> or padding, as in SigLIP's own training, which pads
to 64 and pools the last token). That is reproduced as is, so its checkpoints keep their meaning.

Checkpoint keys. The official segmentors hold the tower as ``text_encoder.*`` and the contexts as a
top-level ``contexts``; here the tower sits at ``<encoder>.text.*`` and the contexts at ``<encoder>.contexts``
(:func:`rename_official_text_side` maps a whole official state dict, the enhancer's keys included).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import open_clip
import torch
from open_clip.model import CLIPTextCfg, _build_text_tower
from torch import nn

from training.backbones.vit import describe_mismatch
from training.checkpoint import load_state_dict_file
from training.models.portable import arange_like

StateDict = dict[str, torch.Tensor]

# Class names are tokenized to this many ids (start and end tokens included) in every official variant.
NAME_LENGTH = 5


@dataclasses.dataclass(frozen=True)
class TextTowerSpec:
    """How one named text tower is built.

    Attributes:
        open_clip_config: open_clip model config whose ``text_cfg`` / ``embed_dim`` define the tower.
        pretrained_tag: open_clip pretrained tag used by ``weights="hub"``.
        context_length: prompt length of the official MFuser variant (contexts + NAME_LENGTH).
        quick_gelu: QuickGELU activations (OpenAI CLIP weights were trained with them).
        clip_bpe: the tower reads CLIP's BPE ids (else open_clip's tokenizer for the config, from the hub).
        text_cfg: entries that replace open_clip's text config.
    """

    open_clip_config: str
    pretrained_tag: str
    context_length: int
    quick_gelu: bool = False
    clip_bpe: bool = True
    text_cfg: Mapping[str, object] = dataclasses.field(default_factory=dict)


TEXT_TOWERS: dict[str, TextTowerSpec] = {
    # EVA02-CLIP-L/14-336 text tower: width 768, 12 layers, 12 heads, output 768, exact GELU, LN eps 1e-5.
    "eva02_clip_l14": TextTowerSpec("EVA02-L-14-336", "merged2b_s6b_b61k", 13),
    # OpenAI CLIP-L/14-336: same shape as EVA's, QuickGELU. The official CLIP variant prompts with 10 tokens.
    "clip_l14": TextTowerSpec("ViT-L-14-336", "openai", 10, quick_gelu=True),
    # SigLIP-L/16-384: width 1024, 24 layers, bidirectional, last-token pooling, projection with bias.
    # big_vision's (and Hugging Face's) GELU is the tanh approximation; open_clip's config leaves it exact.
    "siglip_l16": TextTowerSpec("ViT-L-16-SigLIP-384", "webli", 10, clip_bpe=False,
                                text_cfg={"act_kwargs": {"approximate": "tanh"}}),
}

# Top-level names of a text tower's entries in an OpenAI-layout CLIP state dict.
_TOWER_ROOTS = ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection")
# Text-side entries of full CLIP checkpoints that the tower does not hold.
_NOT_TOWER = ("logit_scale", "logit_bias", "attn_mask")
_TEXT_CFG_FIELDS = frozenset(f.name for f in dataclasses.fields(CLIPTextCfg))


def _spec(name: str) -> TextTowerSpec:
    if name not in TEXT_TOWERS:
        raise ValueError(f"unknown text tower {name!r}; known: {sorted(TEXT_TOWERS)}")
    return TEXT_TOWERS[name]


def build_text_tower(name: str, weights: str = "", context_length: int | None = None,
                     overrides: dict | None = None) -> nn.Module:
    """Build a named open_clip text tower at a short prompt length.

    Args:
        name: a key of ``TEXT_TOWERS`` ("eva02_clip_l14", "clip_l14", "siglip_l16").
        weights: "" (random init), "hub" (open_clip's pretrained download, needs network) or a local
            checkpoint (see :func:`load_text_tower_weights` for the layouts).
        context_length: total prompt length (contexts + class-name tokens); None → the official value of the
            variant (13 for EVA02-CLIP-L, 10 for CLIP-L and SigLIP-L). Longer positional embeddings in a
            checkpoint are truncated to it.
        overrides: text config entries for small variants: any open_clip ``CLIPTextCfg`` field (width,
            layers, heads, mlp_ratio, …) plus ``output_dim`` (projection width) and ``quick_gelu``.

    Returns:
        an ``open_clip.transformer.TextTransformer``; forward on token ids (B, context_length) gives (B, output_dim).
    """
    spec = _spec(name)
    model_cfg = open_clip.get_model_config(spec.open_clip_config)
    if model_cfg is None:
        raise RuntimeError(f"open_clip has no model config {spec.open_clip_config!r} (open_clip version?)")
    text_cfg = {**model_cfg["text_cfg"], **spec.text_cfg}
    embed_dim = int(model_cfg["embed_dim"])
    quick_gelu = spec.quick_gelu
    text_cfg["context_length"] = spec.context_length if context_length is None else int(context_length)
    if text_cfg["context_length"] < 2:
        raise ValueError(f"text context_length must be at least 2, got {text_cfg['context_length']}")
    for key, value in (overrides or {}).items():
        if key == "output_dim":
            embed_dim = int(value)
        elif key == "quick_gelu":
            quick_gelu = bool(value)
        elif key in _TEXT_CFG_FIELDS and key != "context_length":
            text_cfg[key] = value
        else:
            raise ValueError(f"unknown text tower override {key!r} (context_length has its own argument)")
    tower = _build_text_tower(embed_dim, text_cfg, quick_gelu=quick_gelu)
    if weights == "hub":
        load_text_tower_weights(tower, _download(spec))
    elif weights:
        load_text_tower_weights(tower, weights)
    return tower


def _download(spec: TextTowerSpec) -> str:
    from open_clip.pretrained import download_pretrained, get_pretrained_cfg

    cfg = get_pretrained_cfg(spec.open_clip_config, spec.pretrained_tag)
    try:
        path = download_pretrained(cfg)
    except Exception as exc:  # network, hub or cache failures all surface here
        raise RuntimeError(f"downloading open_clip {spec.open_clip_config}/{spec.pretrained_tag} failed "
                           f"(needs network or a populated cache): {exc}") from exc
    if not path:
        raise RuntimeError(f"open_clip lists no download for {spec.open_clip_config}/{spec.pretrained_tag}")
    return path


def _from_hf_siglip(state: Mapping[str, torch.Tensor]) -> StateDict:
    """Hugging Face SigLIP text-model names (under ``text_model.``, prefix removed) → open_clip names.

    Separate q/k/v projections are concatenated into the fused in-projection of nn.MultiheadAttention.
    Names without a counterpart are kept as they are, so the mismatch report lists them.
    """
    renames = {"layer_norm1.": "ln_1.", "layer_norm2.": "ln_2.", "mlp.fc1.": "mlp.c_fc.", "mlp.fc2.": "mlp.c_proj.",
               "self_attn.out_proj.": "attn.out_proj."}
    out: StateDict = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        layer = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)", key)
        if key == "embeddings.token_embedding.weight":
            out["token_embedding.weight"] = value
        elif key == "embeddings.position_embedding.weight":
            out["positional_embedding"] = value
        elif key == "embeddings.position_ids":
            continue  # an index buffer, not a weight
        elif key.startswith("final_layer_norm."):
            out["ln_final." + key.split(".", 1)[1]] = value
        elif key.startswith("head."):
            out["text_projection." + key.split(".", 1)[1]] = value
        elif layer:
            index, rest = layer.groups()
            proj = re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", rest)
            if proj:
                qkv.setdefault((index, proj.group(2)), {})[proj.group(1)] = value
                continue
            prefix = next((p for p in renames if rest.startswith(p)), None)
            out[f"transformer.resblocks.{index}.{renames[prefix]}{rest[len(prefix):]}" if prefix else key] = value
        else:
            out[key] = value
    for (index, param), parts in sorted(qkv.items()):
        if set(parts) != {"q", "k", "v"}:
            raise ValueError(f"SigLIP text layer {index}: {param} of q/k/v incomplete (found {sorted(parts)})")
        out[f"transformer.resblocks.{index}.attn.in_proj_{param}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def text_tower_state_dict(state: Mapping[str, torch.Tensor], context_length: int | None = None) -> StateDict:
    """The text-tower entries of a checkpoint, renamed to open_clip ``TextTransformer`` names.

    Recognised layouts (a ``module.`` prefix on every key is removed first):

    * an MFuser/tqdm segmentor checkpoint: ``text_encoder.*`` (the EVA/CLIP towers already use open_clip
      names; the SigLIP one uses Hugging Face names and is converted);
    * an open_clip custom-text CLIP (EVA02-CLIP, SigLIP in open_clip form) or an EVA-CLIP original
      checkpoint saved with a custom text tower: ``text.*``;
    * a Hugging Face SigLIP: ``text_model.*``;
    * an OpenAI-layout CLIP (and EVA-CLIP saved that way): top-level ``token_embedding``,
      ``positional_embedding``, ``transformer.*``, ``ln_final``, ``text_projection``.

    ``logit_scale`` / ``logit_bias`` / ``attn_mask`` are dropped; everything else is kept so a mismatch shows.

    Args:
        state: a full checkpoint state dict.
        context_length: when given, a longer positional embedding is truncated to its first rows (the
            official loaders do the same, 77 → 13).

    Raises:
        ValueError: no text-tower entries found, or a SigLIP layer's q/k/v incomplete.
    """
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    for prefix in ("text_encoder.", "text.", "text_model."):
        tower = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if tower:
            break
    else:
        tower = {k: v for k, v in state.items() if k.split(".", 1)[0] in _TOWER_ROOTS}
    if not tower:
        first = sorted(state)[:8]
        raise ValueError("no text-tower entries found (looked for text_encoder.*, text.*, text_model.* and top-level "
                         f"{', '.join(_TOWER_ROOTS)}); the checkpoint starts with {first}")
    if "embeddings.token_embedding.weight" in tower:
        tower = _from_hf_siglip(tower)
    tower = {k: v for k, v in tower.items() if k not in _NOT_TOWER}
    pos = tower.get("positional_embedding")
    if context_length is not None and pos is not None and pos.ndim == 2 and pos.shape[0] > context_length:
        tower["positional_embedding"] = pos[:context_length]
    return tower


def load_text_tower_weights(tower: nn.Module, path: str | Path) -> None:
    """Load a local checkpoint's text tower into ``tower`` (layouts as in :func:`text_tower_state_dict`).

    Read safely (safetensors, or torch files with weights_only) by ``training.checkpoint``; the positional
    embedding is truncated to the tower's length.

    Raises:
        FileNotFoundError: the file does not exist (named).
        ValueError: the file is unreadable or a TorchScript archive, holds no text tower, or its keys/shapes do
            not fit (missing, unexpected and mismatched shapes listed).
    """
    try:
        state = load_state_dict_file(path)
    except ValueError as exc:
        if "TorchScript" in str(exc):  # OpenAI's original .pt files are TorchScript archives
            raise ValueError(f"{path} is a TorchScript archive, which cannot be read safely; use weights='hub' "
                             "(open_clip's converted copy) or save torch.jit.load(...).state_dict() once "
                             "as .safetensors") from exc
        raise
    try:
        state = text_tower_state_dict(state, context_length=int(tower.positional_embedding.shape[0]))
    except ValueError as exc:
        raise ValueError(f"text weights {path}: {exc}") from exc
    problem = describe_mismatch(tower.state_dict(), state)
    if problem:
        raise ValueError(f"text weights {path} do not fit the text tower: {problem}")
    tower.load_state_dict(state)


@dataclasses.dataclass(frozen=True)
class NameTokenizer:
    """Turns one class name into its token ids, special tokens included, and pads with ``pad_id``.

    Attributes:
        encode: name → ids with the tokenizer's own start/end tokens (CLIP: [SOT, pieces…, EOT];
            SigLIP: [pieces…, </s>]).
        pad_id: id used to fill up to the name length.
        vocab_size: the vocabulary the ids index (checked against the tower's).
    """

    encode: Callable[[str], list[int]]
    pad_id: int
    vocab_size: int


@functools.lru_cache(maxsize=1)
def clip_name_tokenizer() -> NameTokenizer:
    """CLIP's byte-level BPE (49,408 ids; the vocabulary ships with open_clip, so it works offline)."""
    bpe = open_clip.tokenizer.SimpleTokenizer()
    sot, eot = bpe.sot_token_id, bpe.eot_token_id
    return NameTokenizer(encode=lambda name: [sot, *bpe.encode(name), eot], pad_id=0, vocab_size=len(bpe.encoder))


def name_tokenizer(name: str) -> NameTokenizer:
    """The tokenizer that goes with a named text tower.

    EVA02-CLIP and CLIP share CLIP's BPE (offline). SigLIP's sentencepiece tokenizer comes through open_clip
    from the Hugging Face hub (network on first use); like the official, names get no start token.
    """
    spec = _spec(name)
    if spec.clip_bpe:
        return clip_name_tokenizer()
    hf = open_clip.get_tokenizer(spec.open_clip_config)
    inner = hf.tokenizer
    return NameTokenizer(encode=lambda text: list(inner(hf.clean_fn(text))["input_ids"]),
                         pad_id=int(inner.pad_token_id), vocab_size=int(len(inner)))


def tokenize_class_names(class_names: Sequence[str], length: int = NAME_LENGTH,
                         tokenizer: NameTokenizer | None = None) -> torch.Tensor:
    """Token ids of each class name, padded to ``length``.

    Args:
        class_names: K names.
        length: ids per name, special tokens included (the official 5: [SOT, pieces…, EOT, pad…]).
        tokenizer: None → CLIP's BPE.

    Returns:
        (K, length) int64.

    Raises:
        ValueError: no names, or a name that needs more than ``length`` ids (named, with its count).
    """
    if not class_names:
        raise ValueError("no class names to tokenize")
    tokenizer = tokenizer or clip_name_tokenizer()
    rows = []
    for name in class_names:
        ids = tokenizer.encode(name)
        if len(ids) > length:
            raise ValueError(f"class name {name!r} needs {len(ids)} tokens with its start/end tokens, more than the "
                             f"{length} available (context_length − n_ctx); shorten it or use fewer context vectors")
        rows.append(ids + [tokenizer.pad_id] * (length - len(ids)))
    return torch.tensor(rows, dtype=torch.long)


class PromptTextEncoder(nn.Module):
    """CoOp prompts through a frozen open_clip text tower: class names → text embeddings (K, out_dim).

    Parameters: ``text.*`` (the tower, to be frozen by the training code) and ``contexts`` (1, n_ctx, width),
    learnable, shared by all classes. Buffers ``token_ids`` (K, context_length − n_ctx) and ``eos_index`` (K,)
    are not persistent: they follow from the class names and the tokenizer, so a checkpoint holds only
    weights (as the official ones, which keep the ids outside the state dict) and loads whatever names the
    model is built with.

    Args:
        text: an open_clip ``TextTransformer`` (e.g. from :func:`build_text_tower`); its positional embedding
            sets the total prompt length.
        class_names: K class names (the official prompts use the plain Cityscapes names, which are
            ``dgss_perception.labels.CITYSCAPES_CLASSES``).
        n_ctx: learnable context vectors; None → context_length − NAME_LENGTH (8 for EVA02-CLIP-L at 13,
            5 for the CLIP-L and SigLIP-L variants at 10).
        tokenizer: None → CLIP's BPE (for the 49,408-id towers); SigLIP needs ``name_tokenizer("siglip_l16")``.
    """

    def __init__(self, text: nn.Module, class_names: Sequence[str], n_ctx: int | None = None,
                 tokenizer: NameTokenizer | None = None) -> None:
        super().__init__()
        missing = [a for a in _TOWER_ROOTS if not hasattr(text, a)]
        if missing:
            raise TypeError(f"PromptTextEncoder needs an open_clip TextTransformer; {type(text).__name__} "
                            f"lacks {missing}")
        if getattr(text, "cls_emb", None) is not None or getattr(text, "use_pad_mask", False):
            raise ValueError("text towers with an appended class token or a padding mask (CoCa-style) "
                             "are not supported")
        pool_type = getattr(text, "pool_type", "argmax")
        if pool_type not in ("argmax", "last"):
            raise ValueError(f"text tower pool_type {pool_type!r} not supported (argmax or last)")
        total = int(text.positional_embedding.shape[0])
        n_ctx = total - NAME_LENGTH if n_ctx is None else int(n_ctx)
        name_length = total - n_ctx
        if n_ctx < 0 or name_length < 2:
            raise ValueError(f"n_ctx {n_ctx} leaves {name_length} of the tower's {total} positions for the class "
                             "names; at least 2 (start and end tokens) are needed")
        if tokenizer is None:
            if text.vocab_size != clip_name_tokenizer().vocab_size:
                raise ValueError(f"the tower's vocabulary has {text.vocab_size} ids, not CLIP's BPE; pass its "
                                 "tokenizer (e.g. name_tokenizer('siglip_l16'))")
            tokenizer = clip_name_tokenizer()
        elif tokenizer.vocab_size != text.vocab_size:
            raise ValueError(f"tokenizer vocabulary ({tokenizer.vocab_size}) differs from the tower's "
                             f"({text.vocab_size})")
        ids = tokenize_class_names(class_names, name_length, tokenizer)

        self.text = text
        self.class_names = tuple(class_names)
        self.n_ctx = n_ctx
        self.pool_type = pool_type
        width = int(text.token_embedding.embedding_dim)
        self.contexts = nn.Parameter(torch.empty(1, n_ctx, width))
        # As the official: torch's trunc_normal_ with its defaults, i.e. std 1 truncated at ±2 (not 0.02).
        nn.init.trunc_normal_(self.contexts)
        self.register_buffer("token_ids", ids, persistent=False)
        if pool_type == "argmax":
            # EOT has the largest id; inserting the contexts after the first token moves it n_ctx places on.
            eos = ids.argmax(dim=-1) + n_ctx
        else:
            eos = torch.full((len(ids),), total - 1, dtype=torch.long)
        self.register_buffer("eos_index", eos, persistent=False)

    @property
    def out_dim(self) -> int:
        """Width of the text embeddings."""
        proj = self.text.text_projection
        if proj is None:
            return int(self.text.width)
        return int(proj.out_features if isinstance(proj, nn.Linear) else proj.shape[1])

    def prompt_embeddings(self) -> torch.Tensor:
        """The tower's input: embedded names with the contexts after their first token, plus positions.

        Returns:
            (K, context_length, width).
        """
        text = self.text
        dtype = text.transformer.get_cast_dtype()
        tokens = text.token_embedding(self.token_ids).to(dtype)  # (K, name_length, width)
        contexts = self.contexts.to(dtype).expand(tokens.shape[0], -1, -1)
        x = torch.cat([tokens[:, :1], contexts, tokens[:, 1:]], dim=1)
        return x + text.positional_embedding.to(dtype)

    def forward(self) -> torch.Tensor:
        """Text embeddings of all classes (not normalised).

        Returns:
            (K, out_dim).
        """
        text = self.text
        x = text.transformer(self.prompt_embeddings(), attn_mask=text.attn_mask)  # causal (None for SigLIP)
        x = text.ln_final(x)
        pooled = x[arange_like(x, x.shape[0]), self.eos_index]  # (K, width)
        proj = text.text_projection
        if proj is None:
            return pooled
        return proj(pooled) if isinstance(proj, nn.Linear) else pooled @ proj


def rename_official_text_side(state: Mapping[str, torch.Tensor], encoder_prefix: str = "text_encoder") -> StateDict:
    """Rename the text-side entries of an official MFuser/tqdm state dict to this package's modules.

    ======================  ==========================================================
    official                here
    ======================  ==========================================================
    ``text_encoder.X``      ``<encoder_prefix>.text.X`` (SigLIP: converted to open_clip names)
    ``contexts``            ``<encoder_prefix>.contexts``
    ``context_decoder.X``   unchanged (same inner names)
    ``gamma``               unchanged
    ``random_text``         dropped (the official EVA segmentor allocates it and never uses it)
    ======================  ==========================================================

    Other entries (backbone, decode head, …) pass through unchanged.

    Args:
        state: the official ``state_dict`` (already unwrapped from mmcv's {'meta', 'state_dict', …}).
        encoder_prefix: where the :class:`PromptTextEncoder` sits in the model.
    """
    out: StateDict = {}
    tower: StateDict = {}
    for key, value in state.items():
        if key.startswith("text_encoder."):
            tower[key] = value
        elif key == "contexts":
            out[f"{encoder_prefix}.contexts"] = value
        elif key == "random_text":
            continue
        else:
            out[key] = value
    if tower:
        out.update({f"{encoder_prefix}.text.{k}": v for k, v in text_tower_state_dict(tower).items()})
    return out
