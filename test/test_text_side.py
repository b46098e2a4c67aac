"""Text side of MFuser: CoOp prompt encoder on an open_clip text tower, its weight loading, and the MTEnhancer.

Tiny sizes throughout (text tower width 32, 2 layers, 2 heads, output 24; enhancer width 16 on 24-wide
tokens); full sizes are only counted, on the meta device.

Tolerances, as max|got − ref| ≤ tol · max|ref|:
* prompt encoder against open_clip's own forward on the equivalent token ids (float32): 1e-5.
* enhancer against a hand-written composition (float64): 1e-10.
* ONNX Runtime (float32) against eager: 1e-4.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from dgss_perception.labels import CITYSCAPES_CLASSES
from onnxutil import op_types
from training.models.text_encoder import (NameTokenizer, PromptTextEncoder, build_text_tower, clip_name_tokenizer,
                                          rename_official_text_side, text_tower_state_dict, tokenize_class_names)
from training.models.text_enhancer import ContextDecoder

TINY = {"width": 32, "layers": 2, "heads": 2, "output_dim": 24}
SOT, EOT = 49406, 49407

# EVA02-CLIP-L text tower at 13 positions: token embedding 49,408·768 = 37,945,344; positions 13·768 = 9,984;
# per layer ln_1 1,536 + in_proj 768·2,304 + 2,304 = 1,771,776 + out_proj 768² + 768 = 590,592 + ln_2 1,536
# + c_fc 768·3,072 + 3,072 = 2,362,368 + c_proj 3,072·768 + 768 = 2,360,064 → 7,087,872, ×12 = 85,054,464;
# ln_final 1,536; text_projection 768² = 589,824.
EVA_TEXT_PARAMS = 37_945_344 + 9_984 + 12 * 7_087_872 + 1_536 + 589_824
# ContextDecoder(768, 256, 4, 1): memory_proj LN 1,536 + Linear 196,864 + LN 512 = 198,912; text_proj 1,536 +
# 196,864 = 198,400; layer: q/k/v 3·65,536 + proj 65,792 = 262,400, MVFuser(256, 16, dt_rank 16) 109,697,
# three LNs 1,536, MLP 263,168 + 262,400 = 525,568 → 899,201; out_proj LN 512 + Linear 197,376 = 197,888.
CONTEXT_DECODER_PARAMS = 198_912 + 198_400 + (262_400 + 109_697 + 1_536 + 525_568) + 197_888


def _rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.detach().double(), ref.detach().double()
    return float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def _tiny_tower(seed: int = 0, context_length: int | None = None, name: str = "eva02_clip_l14",
                **extra: object) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_text_tower(name, context_length=context_length, overrides={**TINY, **extra}).eval()


@pytest.fixture(scope="module")
def tower() -> torch.nn.Module:
    return _tiny_tower()


# ---------------------------------------------------------------- tokenization


def test_tokenize_cityscapes_names() -> None:
    ids = tokenize_class_names(CITYSCAPES_CLASSES, 5)
    assert ids.shape == (19, 5) and ids.dtype == torch.long
    assert (ids[:, 0] == SOT).all()
    bpe = open_clip.tokenizer.SimpleTokenizer()
    for row, name in zip(ids.tolist(), CITYSCAPES_CLASSES):
        n = len(bpe.encode(name))
        assert row[n + 1] == EOT and all(t == 0 for t in row[n + 2:]), (name, row)
    reference = open_clip.tokenize(list(CITYSCAPES_CLASSES))  # (19, 77), open_clip's own tokenizer
    assert (reference[:, 5:] == 0).all()  # nothing is lost by the short length
    assert torch.equal(ids, reference[:, :5])
    # The multi-word names the official uses: 'traffic light' is two pieces, [SOT, traffic, light, EOT, pad].
    assert ids[CITYSCAPES_CLASSES.index("traffic light")].tolist()[3:] == [EOT, 0]


def test_a_name_that_does_not_fit_is_a_clear_error(tower: torch.nn.Module) -> None:
    with pytest.raises(ValueError, match="'bicycle with a very long description'.*5 available"):
        tokenize_class_names(["road", "bicycle with a very long description"], 5)
    with pytest.raises(ValueError, match="needs 6 tokens"):
        PromptTextEncoder(tower, ["road", "a b c d"])
    with pytest.raises(ValueError, match="leaves 1"):
        PromptTextEncoder(tower, ["road"], n_ctx=12)


# ---------------------------------------------------------------- prompt encoder


def _with_token_contexts(enc: PromptTextEncoder, ctx_ids: torch.Tensor) -> torch.Tensor:
    """Set the contexts to the embeddings of real tokens; return the equivalent full-length token ids."""
    with torch.no_grad():
        enc.contexts.copy_(enc.text.token_embedding.weight[ctx_ids].unsqueeze(0))
    ids = enc.token_ids
    ctx = ctx_ids.expand(ids.shape[0], -1)
    return torch.cat([ids[:, :1], ctx, ids[:, 1:]], dim=1)


def test_contexts_follow_the_start_token_and_pool_at_eos(tower: torch.nn.Module) -> None:
    enc = PromptTextEncoder(tower, CITYSCAPES_CLASSES)
    assert enc.n_ctx == 8 and enc.contexts.shape == (1, 8, 32) and enc.token_ids.shape == (19, 5)
    torch.manual_seed(1)
    full = _with_token_contexts(enc, torch.randint(1, 49000, (8,)))
    assert full.shape == (19, 13)
    # open_clip's own forward on the equivalent ids (it pools at argmax = EOT): same embeddings.
    with torch.no_grad():
        got, ref = enc(), tower(full)
    assert got.shape == (19, 24) and enc.out_dim == 24
    assert _rel_err(got, ref) < 1e-5
    assert torch.equal(enc.eos_index, full.argmax(dim=-1))
    # The prompt really is [SOT, ctx × 8, name…]: shifting the contexts one place later breaks the equality.
    shifted = torch.cat([full[:, :2], full[:, 1:2], full[:, 2:-1]], dim=1)
    with torch.no_grad():
        assert _rel_err(got, tower(shifted)) > 1e-3


def test_tokens_after_eos_do_not_matter_but_tokens_before_do(tower: torch.nn.Module) -> None:
    enc = PromptTextEncoder(tower, CITYSCAPES_CLASSES)
    with torch.no_grad():
        base = enc()
        padded = enc.token_ids == 0
        assert padded.any()
        enc.token_ids[padded] = 1234  # causal mask: the EOT position never sees these
        after = enc()
        assert _rel_err(after, base) < 1e-6
        enc.token_ids[:, 1] = 4321  # the first name piece is seen
        before = enc()
    assert (before - base).abs().amax(dim=-1).min() > 1e-4


def test_gradients_reach_contexts_and_a_frozen_tower_gets_none() -> None:
    enc = PromptTextEncoder(_tiny_tower(seed=2), CITYSCAPES_CLASSES[:4])
    weight = torch.randn(4, 24)
    (enc() * weight).sum().backward()
    assert enc.contexts.grad is not None and float(enc.contexts.grad.abs().max()) > 0
    assert enc.text.ln_final.weight.grad is not None  # trainable unless the training code freezes it

    enc.zero_grad(set_to_none=True)
    enc.text.requires_grad_(False)  # what the training code does by name: text.* frozen, contexts trainable
    (enc() * weight).sum().backward()
    assert float(enc.contexts.grad.abs().max()) > 0
    assert all(p.grad is None for p in enc.text.parameters())
    names = {n for n, p in enc.named_parameters() if p.requires_grad}
    assert names == {"contexts"}
    assert "token_ids" not in enc.state_dict() and "eos_index" not in enc.state_dict()


def test_contexts_init_as_the_official() -> None:
    torch.manual_seed(3)
    enc = PromptTextEncoder(_tiny_tower(seed=3, width=256, heads=4), CITYSCAPES_CLASSES[:2])
    ctx = enc.contexts.detach()
    assert float(ctx.abs().max()) <= 2.0  # trunc_normal_ defaults: std 1 truncated at ±2
    assert 0.8 < float(ctx.std()) < 1.0  # truncation at 2σ shrinks the std to ≈ 0.88


# ---------------------------------------------------------------- weight loading


def _source_state(seed: int = 4) -> dict[str, torch.Tensor]:
    """A tiny text tower's weights with the usual 77 positions."""
    return {k: v.clone() for k, v in _tiny_tower(seed=seed, context_length=77).state_dict().items()}


def _write(path: Path, state: dict) -> Path:
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, str(path))
    return path


@pytest.mark.parametrize("layout", ["open_clip", "openai", "eva_module", "mfuser"])
def test_load_checkpoint_layouts(tmp_path: Path, layout: str) -> None:
    src = _source_state()
    assert src["positional_embedding"].shape == (77, 32)
    visual = {"visual.proj": torch.randn(4, 4), "logit_scale": torch.tensor(4.6)}
    if layout == "open_clip":  # custom-text CLIP: text.* (EVA02-CLIP in open_clip form)
        path = _write(tmp_path / "clip.safetensors", {**visual, **{f"text.{k}": v for k, v in src.items()}})
    elif layout == "openai":  # OpenAI-layout CLIP: the text tower at the top level
        path = _write(tmp_path / "clip.pth", {**visual, **src})
    elif layout == "eva_module":  # EVA-CLIP training output: module.-prefixed custom-text keys
        path = _write(tmp_path / "eva.pt", {f"module.{k}": v for k, v in
                                            {**visual, **{f"text.{k}": v for k, v in src.items()}}.items()})
    else:  # an MFuser/tqdm segmentor checkpoint (mmcv's wrapper), positions already cut to 13
        state = {"backbone.x": torch.zeros(2), "contexts": torch.zeros(1, 8, 32),
                 **{f"text_encoder.{k}": (v[:13] if k == "positional_embedding" else v) for k, v in src.items()}}
        path = _write(tmp_path / "iter_20000.pth", {"meta": {"iter": 20000}, "state_dict": state})
    loaded = build_text_tower("eva02_clip_l14", weights=str(path), overrides=TINY)
    got = loaded.state_dict()
    assert got["positional_embedding"].shape == (13, 32)
    assert torch.equal(got["positional_embedding"], src["positional_embedding"][:13])
    for key, value in got.items():
        if key != "positional_embedding":
            assert torch.equal(value, src[key]), key


def test_load_errors_are_clear(tmp_path: Path) -> None:
    src = _source_state()
    missing = dict(src)
    del missing["ln_final.weight"]
    path = _write(tmp_path / "missing.safetensors", {f"text.{k}": v for k, v in missing.items()})
    with pytest.raises(ValueError, match=r"missing \['ln_final.weight'\]"):
        build_text_tower("eva02_clip_l14", weights=str(path), overrides=TINY)

    with pytest.raises(ValueError, match="shape mismatch"):  # a width-32 checkpoint into a width-64 tower
        build_text_tower("eva02_clip_l14", weights=str(_write(tmp_path / "ok.pth", src)),
                         overrides={**TINY, "width": 64})

    with pytest.raises(ValueError, match="no text-tower entries"):
        build_text_tower("eva02_clip_l14", weights=str(_write(tmp_path / "vis.pth", {"visual.w": torch.zeros(1)})),
                         overrides=TINY)

    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"PK\x03\x04 definitely not a checkpoint")
    with pytest.raises(ValueError, match="corrupt"):
        build_text_tower("eva02_clip_l14", weights=str(corrupt), overrides=TINY)

    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        build_text_tower("eva02_clip_l14", weights=str(tmp_path / "nowhere.pth"), overrides=TINY)
    with pytest.raises(ValueError, match="unknown text tower"):
        build_text_tower("clip_b16")
    with pytest.raises(ValueError, match="override 'depth'"):
        build_text_tower("eva02_clip_l14", overrides={"depth": 2})


def _to_hf_siglip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """open_clip names → Hugging Face SigLIP text-model names (the inverse of the loader's conversion)."""
    out = {"text_model.embeddings.position_ids": torch.arange(64)[None]}
    ren = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
           "attn.out_proj": "self_attn.out_proj"}
    for key, value in state.items():
        if key == "token_embedding.weight":
            out["text_model.embeddings.token_embedding.weight"] = value
        elif key == "positional_embedding":
            out["text_model.embeddings.position_embedding.weight"] = value
        elif key.startswith("ln_final."):
            out["text_model.final_layer_norm." + key.split(".")[-1]] = value
        elif key.startswith("text_projection."):
            out["text_model.head." + key.split(".")[-1]] = value
        else:
            _, _, i, rest = key.split(".", 3)
            prefix = f"text_model.encoder.layers.{i}."
            if rest.startswith("attn.in_proj_"):
                param = rest.rsplit("_", 1)[-1]
                for part, chunk in zip("qkv", value.chunk(3)):
                    out[f"{prefix}self_attn.{part}_proj.{param}"] = chunk
            else:
                module, param = rest.rsplit(".", 1)
                out[f"{prefix}{ren[module]}.{param}"] = value
    return out


def test_siglip_tower_loads_hf_layout_and_pools_the_last_token(tmp_path: Path) -> None:
    src = _tiny_tower(seed=5, context_length=64, name="siglip_l16", vocab_size=100)
    assert src.attn_mask is None and src.pool_type == "last"
    assert src.transformer.resblocks[0].mlp.gelu.approximate == "tanh"
    path = _write(tmp_path / "siglip.pth", _to_hf_siglip(src.state_dict()))
    torch.manual_seed(6)
    tower = build_text_tower("siglip_l16", weights=str(path), overrides={**TINY, "vocab_size": 100}).eval()
    assert tower.positional_embedding.shape == (10, 32)  # the official SigLIP prompt: 5 contexts + 5
    for key, value in tower.state_dict().items():
        ref = src.state_dict()[key]
        assert torch.equal(value, ref[:10] if key == "positional_embedding" else ref), key

    # SigLIP ids: [pieces…, </s>=1, pad=1…], no start token; the official still inserts after the first id.
    fake = NameTokenizer(encode=lambda name: [10 + len(name) % 50, 60 + len(name) % 30, 1], pad_id=1, vocab_size=100)
    with pytest.raises(ValueError, match="vocabulary"):
        PromptTextEncoder(tower, ["road"])  # CLIP's BPE would not fit a 100-id tower
    enc = PromptTextEncoder(tower, ["road", "sidewalk", "car"], tokenizer=fake)
    assert enc.n_ctx == 5 and torch.equal(enc.eos_index, torch.full((3,), 9))
    full = _with_token_contexts(enc, torch.tensor([3, 4, 5, 6, 7]))
    with torch.no_grad():
        assert _rel_err(enc(), tower(full)) < 1e-5  # open_clip pools its last position too


def test_rename_official_text_side() -> None:
    state = {"text_encoder.positional_embedding": torch.zeros(13, 4), "text_encoder.ln_final.weight": torch.ones(4),
             "contexts": torch.zeros(1, 8, 4), "gamma": torch.ones(4), "random_text": torch.zeros(19, 4),
             "context_decoder.out_proj.1.weight": torch.ones(4, 2), "backbone.adapter.0.scale": torch.ones(())}
    out = rename_official_text_side(state, encoder_prefix="enc")
    assert set(out) == {"enc.text.positional_embedding", "enc.text.ln_final.weight", "enc.contexts", "gamma",
                        "context_decoder.out_proj.1.weight", "backbone.adapter.0.scale"}
    top = rename_official_text_side(state)  # context_decoder and gamma kept at the top level, as the official
    assert set(top) == {"text_encoder.text.positional_embedding", "text_encoder.text.ln_final.weight",
                        "text_encoder.contexts", "gamma", "context_decoder.out_proj.1.weight",
                        "backbone.adapter.0.scale"}
    assert set(text_tower_state_dict({"text.logit_scale": torch.ones(()), "text.ln_final.bias": torch.ones(2)})) == {
        "ln_final.bias"}


# ---------------------------------------------------------------- MTEnhancer


def _decoder(seed: int = 7, layers: int = 1) -> ContextDecoder:
    torch.manual_seed(seed)
    return ContextDecoder(visual_dim=24, width=16, heads=2, layers=layers)


def test_context_decoder_shapes() -> None:
    cd = _decoder(layers=2).eval()
    text, visual = torch.randn(2, 19, 24), torch.randn(2, 1 + 12, 24)
    out = cd(text, visual)
    assert out.shape == (2, 19, 24) and torch.isfinite(out).all()
    assert cd.decoder[0].cross_attn.dt_rank == 16 and cd.decoder[0].cross_attn.d_state == 16
    with pytest.raises(ValueError, match="expects text"):
        cd(text[0], visual)


def test_context_decoder_init_quirk() -> None:
    cd = _decoder(seed=8, layers=2)
    linears = [m for m in cd.modules() if isinstance(m, torch.nn.Linear)]
    weights = torch.cat([m.weight.detach().flatten() for m in linears])
    assert abs(float(weights.std()) - 0.02) < 0.002 and abs(float(weights.mean())) < 0.002
    assert all(m.bias is None or not m.bias.detach().any() for m in linears)
    for layer in cd.decoder:
        mixer = layer.cross_attn
        assert not mixer.dt_proj.bias.detach().any()  # the official re-init zeroes the Δ bias
        assert float(mixer.dt_proj.weight.detach().std()) < 0.03  # trunc normal 0.02, not U(±16^-½ = ±0.25)
        # What the re-init does not touch keeps the MVFuser's own init.
        assert torch.equal(mixer.A_log.detach(), torch.log(torch.arange(1, 17.0)).expand(8, 16))
        assert float(mixer.scale.detach()) == pytest.approx(1e-3)
        assert layer.self_attn.q_proj.bias is None and layer.self_attn.proj.bias is not None
    norms = [m for m in cd.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert all(bool((m.weight == 1).all()) and not m.bias.detach().any() for m in norms)


def _hand_layer(layer: torch.nn.Module, x: torch.Tensor, memory: torch.Tensor, slots: str = "both") -> torch.Tensor:
    """One MTEnhancer layer from its parameters (the MVFuser called as a module: it has its own tests)."""
    attn = layer.self_attn
    n, k, c = x.shape
    h = F.layer_norm(x, (c,), layer.norm1.weight, layer.norm1.bias)
    q, kk, v = (t.reshape(n, k, attn.heads, -1).transpose(1, 2) for t in
                (h @ attn.q_proj.weight.T, h @ attn.k_proj.weight.T, h @ attn.v_proj.weight.T))
    a = torch.softmax(q @ kk.transpose(-1, -2) / (c // attn.heads) ** 0.5, dim=-1)
    x = x + (a @ v).transpose(1, 2).reshape(n, k, c) @ attn.proj.weight.T + attn.proj.bias
    h = F.layer_norm(x, (c,), layer.norm2.weight, layer.norm2.bias)
    s = layer.cross_attn(torch.cat([h, memory, h], dim=1))
    x = x + (s[:, :k] if slots in ("both", "first") else 0) + (s[:, -k:] if slots in ("both", "last") else 0)
    h = F.layer_norm(x, (c,), layer.norm3.weight, layer.norm3.bias)
    return x + F.gelu(h @ layer.mlp[0].weight.T + layer.mlp[0].bias) @ layer.mlp[3].weight.T + layer.mlp[3].bias


def test_context_decoder_matches_hand_composition_with_both_text_slots() -> None:
    cd = _decoder(seed=9).double().eval()
    with torch.no_grad():  # move everything off its init so a skipped or swapped parameter shows
        for p in cd.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        cd.decoder[0].cross_attn.scale.fill_(1.0)
    text, visual = torch.randn(2, 5, 24, dtype=torch.float64), torch.randn(2, 17, 24, dtype=torch.float64)
    captured = []
    handle = cd.decoder[0].cross_attn.register_forward_hook(lambda m, i, o: captured.append((i[0], o)))
    with torch.no_grad():
        got = cd(text, visual)
    handle.remove()
    (mixer_in, mixer_out), = captured
    assert mixer_in.shape == (2, 5 + 17 + 5, 16)
    assert torch.equal(mixer_in[:, :5], mixer_in[:, -5:])  # the same normalised queries on both sides
    assert _rel_err(mixer_out[:, :5], mixer_out[:, -5:]) > 1e-2  # the trailing copy has read the image

    with torch.no_grad():
        memory = cd.memory_proj(visual)
        x = F.linear(F.layer_norm(text, (24,), cd.text_proj[0].weight, cd.text_proj[0].bias),
                     cd.text_proj[1].weight, cd.text_proj[1].bias)

        def hand(slots: str) -> torch.Tensor:
            return cd.out_proj(_hand_layer(cd.decoder[0], x, memory, slots))

        assert _rel_err(got, hand("both")) < 1e-10
        assert _rel_err(got, hand("first")) > 1e-3
        assert _rel_err(got, hand("last")) > 1e-3


def test_context_decoder_gradients_reach_every_parameter() -> None:
    cd = _decoder(seed=10, layers=2).eval()  # eval: no dropped entries hiding a gradient path
    text = torch.randn(2, 6, 24, requires_grad=True)
    visual = torch.randn(2, 11, 24, requires_grad=True)
    (cd(text, visual) * torch.randn(2, 6, 24)).sum().backward()
    for name, p in cd.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert float(p.grad.abs().max()) > 0, name
    assert float(visual.grad.abs().max()) > 0 and float(text.grad.abs().max()) > 0


def test_parameter_counts_at_full_size() -> None:
    with torch.device("meta"):  # 125M parameters counted without memory
        cd = ContextDecoder(768, 256, 4, 1)
        enc = PromptTextEncoder(build_text_tower("eva02_clip_l14"), CITYSCAPES_CLASSES)
    assert CONTEXT_DECODER_PARAMS == 1_494_401 and EVA_TEXT_PARAMS == 123_601_152
    assert sum(p.numel() for p in cd.parameters()) == CONTEXT_DECODER_PARAMS
    assert sum(p.numel() for p in enc.text.parameters()) == EVA_TEXT_PARAMS
    assert enc.contexts.shape == (1, 8, 768) and enc.text.positional_embedding.shape == (13, 768)
    assert clip_name_tokenizer().vocab_size == enc.text.vocab_size == 49_408


def test_context_decoder_onnx_export_has_no_loops_and_matches_eager() -> None:
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    cd = _decoder(seed=13).eval()
    with torch.no_grad():
        cd.decoder[0].cross_attn.scale.fill_(1.0)  # a unit scale makes the mixer's share visible
    text, visual = torch.randn(1, 5, 24), torch.randn(1, 17, 24)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(cd, (text, visual), dynamo=True, opset_version=18,
                                    input_names=["text", "visual"], output_names=["update"])
    model = program.model_proto
    onnx.checker.check_model(model)
    ops = op_types(model)
    assert not ops & {"Loop", "Scan"}, sorted(ops)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"text": text.numpy(), "visual": visual.numpy()})
    with torch.no_grad():
        eager = cd(text, visual)
    assert got.shape == (1, 5, 24)
    assert _rel_err(torch.from_numpy(got), eager) < 1e-4
