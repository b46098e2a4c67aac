"""MVFuser: parameter counts, init, wiring against a hand-written composition, dropout, gradients, ONNX export.

Tolerances, as max|got − ref| ≤ tol · max|ref|:
* float64 block against the hand-written composition on the sequential reference scan: 1e-10 (same math).
* ONNX Runtime (float32) against eager: 1e-4.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from onnxutil import op_types
from training.models.mvfuser import DT_MAX, DT_MIN, MVFuser, RMSNormGated
from dgss_perception.ops.selective_scan import selective_scan_reference

# Per MVFuser at d_model 1024, d_state 16, dt_rank 64: in_proj 1024², two depthwise convs 2·512·3,
# x_proj 512·96, dt_proj 64·512 + 512, A_log 512·16, D 512, norm 512, out_proj 512·1024, scale 1.
PARAMS_1024 = 1_667_585
# The text enhancer's MVFuser (d_model 256, d_state 16, dt_rank 16; 128 SSM channels):
# in_proj 256·256 = 65,536; convs 2·128·3 = 768; x_proj 128·48 = 6,144; dt_proj 16·128 + 128 = 2,176;
# A_log 128·16 = 2,048; D 128; norm 128; out_proj 128·256 = 32,768; scale 1.
PARAMS_256 = 65_536 + 768 + 6_144 + 2_176 + 2_048 + 128 + 128 + 32_768 + 1


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max|got − ref| / max|ref|, in float64."""
    got, ref = got.detach().double(), ref.detach().double()
    return float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def test_parameter_counts() -> None:
    with torch.device("meta"):  # 1.7M parameters need no real memory to be counted
        big = MVFuser(d_model=1024, d_state=16)
    assert big.dt_rank == 64 and big.d_inner == 512
    assert _count(big) == PARAMS_1024
    small = MVFuser(d_model=256, d_state=16, dt_rank=16)
    assert PARAMS_256 == 109_697
    assert _count(small) == PARAMS_256


def test_parameter_names_follow_the_checkpoints() -> None:
    names = {name for name, _ in MVFuser(d_model=32, d_state=4).named_parameters()}
    assert names == {"in_proj.weight", "conv1d_x.weight", "conv1d_z.weight", "x_proj.weight", "dt_proj.weight",
                     "dt_proj.bias", "A_log", "D", "norm.weight", "out_proj.weight", "scale"}


def test_init() -> None:
    torch.manual_seed(0)
    block = MVFuser(d_model=64, d_state=8)
    expected_a_log = torch.log(torch.arange(1, 9, dtype=torch.float32)).expand(32, 8)
    assert torch.equal(block.A_log.detach(), expected_a_log)
    assert torch.equal(block.D.detach(), torch.ones(32))
    assert torch.equal(block.norm.weight.detach(), torch.ones(32))
    assert float(block.scale.detach()) == pytest.approx(1e-3)
    dt = F.softplus(block.dt_proj.bias.detach())  # the bias is softplus⁻¹ of a log-uniform dt
    assert float(dt.min()) >= DT_MIN * (1 - 1e-5) and float(dt.max()) <= DT_MAX * (1 + 1e-5)
    bound = block.dt_rank ** -0.5
    assert float(block.dt_proj.weight.detach().abs().max()) <= bound
    for conv in (block.conv1d_x, block.conv1d_z):
        assert conv.bias is None and conv.groups == 32 and conv.padding == (1,)


@pytest.mark.parametrize("d_model, length", [(64, 50), (32, 1), (48, 17)])
def test_shapes(d_model: int, length: int) -> None:
    block = MVFuser(d_model=d_model, d_state=8).eval()
    h = torch.randn(3, length, d_model)
    out = block(h)
    assert out.shape == h.shape and out.dtype == h.dtype
    assert torch.isfinite(out).all()


def test_rms_norm_gated() -> None:
    norm = RMSNormGated(6, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 2.0, 6))
    y, z = torch.randn(2, 5, 6, dtype=torch.float64), torch.randn(2, 5, 6, dtype=torch.float64)
    expected = y / torch.sqrt(y.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight.double() * z * torch.sigmoid(z)
    assert _rel_err(norm.double()(y, z), expected) < 1e-12


def _hand_written(block: MVFuser, h: torch.Tensor, double_bias: bool = True, double_silu: bool = True) -> torch.Tensor:
    """The block's forward spelled out op by op from its parameters, with the sequential reference scan.

    ``double_bias`` / ``double_silu`` False give the variants without the checkpoints' quirks, to show
    that the comparison would catch them.
    """
    inner, rank, state = block.d_inner, block.dt_rank, block.d_state
    xz = h @ block.in_proj.weight.T  # (B, L, d_model)
    x, z = xz[..., :inner].transpose(1, 2), xz[..., inner:].transpose(1, 2)  # first half x, second half z
    x = F.silu(F.conv1d(x, block.conv1d_x.weight, padding=1, groups=inner))
    z = F.conv1d(z, block.conv1d_z.weight, padding=1, groups=inner)
    if double_silu:
        z = F.silu(z)
    proj = x.transpose(1, 2) @ block.x_proj.weight.T
    dt_low, b, c = proj[..., :rank], proj[..., rank:rank + state], proj[..., rank + state:]
    dt = (dt_low @ block.dt_proj.weight.T + block.dt_proj.bias).transpose(1, 2)
    # The bias goes in a second time through delta_bias (the checkpoints were trained that way).
    y = selective_scan_reference(x, dt, -torch.exp(block.A_log), b.transpose(1, 2), c.transpose(1, 2),
                                 D=block.D, delta_bias=block.dt_proj.bias if double_bias else None,
                                 delta_softplus=True)
    y = y.transpose(1, 2)
    y = y / torch.sqrt(y.pow(2).mean(-1, keepdim=True) + 1e-5) * block.norm.weight
    y = y * F.silu(z.transpose(1, 2))  # z's second SiLU
    return (y @ block.out_proj.weight.T) * block.scale


def test_matches_hand_written_composition() -> None:
    torch.manual_seed(1)
    block = MVFuser(d_model=32, d_state=4, chunk=4).double().eval()
    with torch.no_grad():  # move every parameter off its init so a swapped or skipped one shows
        for p in block.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    h = torch.randn(2, 37, 32, dtype=torch.float64)
    got, ref = block(h), _hand_written(block, h)
    assert _rel_err(got, ref) < 1e-10
    # The quirks are pinned: the variants without them are far outside the tolerance.
    assert _rel_err(got, _hand_written(block, h, double_bias=False)) > 1e-3
    assert _rel_err(got, _hand_written(block, h, double_silu=False)) > 1e-3


def test_eval_is_deterministic_and_dropout_acts_in_train() -> None:
    torch.manual_seed(2)
    block = MVFuser(d_model=64, d_state=8)
    h = torch.randn(2, 20, 64)
    block.eval()
    with torch.no_grad():
        first, second = block(h), block(h)
        assert torch.equal(first, second)
        block.train()
        train_a, train_b = block(h), block(h)
    assert not torch.equal(train_a, train_b)
    assert not torch.equal(train_a, first)
    zeros = (train_a == 0).float().mean()  # about proj_drop of the outputs are dropped
    assert 0.05 < float(zeros) < 0.15


def test_gradients_reach_every_parameter() -> None:
    torch.manual_seed(3)
    block = MVFuser(d_model=32, d_state=4).eval()  # eval: no dropped entries hiding a gradient path
    h = torch.randn(2, 25, 32)
    loss = (block(h) * torch.randn(2, 25, 32)).sum()
    loss.backward()
    for name, p in block.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert float(p.grad.abs().max()) > 0, name


def test_onnx_export_has_no_loops_and_matches_eager() -> None:
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(4)
    block = MVFuser(d_model=64, d_state=16).eval()
    with torch.no_grad():
        block.scale.fill_(1.0)  # a unit scale keeps the comparison away from float32's floor
    h = torch.randn(1, 50, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(block, (h,), dynamo=True, opset_version=18, input_names=["h"],
                                    output_names=["out"])
    model = program.model_proto
    onnx.checker.check_model(model)
    ops = op_types(model)
    assert not ops & {"Loop", "Scan"}, sorted(ops)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"h": h.numpy()})
    with torch.no_grad():
        eager = block(h)
    assert got.shape == (1, 50, 64)
    assert _rel_err(torch.from_numpy(got), eager) < 1e-4
    assert math.isfinite(float(torch.from_numpy(got).abs().max()))


def test_torch_export_keeps_the_scan_op_and_runs_it_on_the_cpu() -> None:
    """A torch.export program of MVFuser names dgss.selective_scan (the car's GPU compiles its kernel), and the
    op's CPU kernel (the chunked scan) gives the eager block's output; ONNX and TorchScript get no op."""
    from dgss_perception.ops.selective_scan_triton import TRITON_AVAILABLE

    if not TRITON_AVAILABLE:
        pytest.skip("Triton is not installed: the op is not registered (the chunked scan is exported instead)")
    torch.manual_seed(5)
    block = MVFuser(d_model=64, d_state=8).eval()
    with torch.no_grad():
        block.scale.fill_(1.0)
    h = torch.randn(1, 37, 64)
    program = torch.export.export(block, (h,))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert "dgss.selective_scan.default" in targets, sorted(targets)
    with torch.no_grad():
        eager = block(h)
        exported = program.module()(h)
        traced = torch.jit.trace(block, (h,), check_trace=False)
    assert torch.allclose(exported, eager, rtol=1e-5, atol=1e-6)
    assert not [n.kind() for n in traced.inlined_graph.nodes() if n.kind().startswith("dgss::")]
    with torch.no_grad():
        assert torch.allclose(traced(h), eager, rtol=1e-5, atol=1e-6)
