"""The fused Triton selective scan (``dgss::selective_scan``) against the sequential reference.

Off a GPU the op's CPU kernel runs the same Triton kernel body in Triton's interpreter, so every
comparison here checks the kernel itself; the GPU test compares the compiled kernel and mamba_ssm.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import pytest
import torch

pytest.importorskip("triton")

from training.models.selective_scan import selective_scan_chunked, selective_scan_reference  # noqa: E402
from training.models.selective_scan_triton import (  # noqa: E402
    block_d,
    selective_scan_fast,
    selective_scan_triton,
)


def make_inputs(dim: int, length: int, state: int, *, batch: int = 2, groups: int = 0, decay: float = 1.0,
                dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int = 0) -> Dict[str, torch.Tensor]:
    """Random scan operands: u, delta, z (N, D, L); A (D, S) < 0; B, C (N, S, L) or (N, G, S, L); D, bias (D,).

    ``decay`` scales A: large values make exp(Δ·A) underflow to 0 within a step (strong decays).
    """
    g = torch.Generator().manual_seed(seed)
    bc_shape = (batch, state, length) if groups == 0 else (batch, groups, state, length)
    t = {
        "u": torch.randn(batch, dim, length, generator=g),
        "delta": torch.randn(batch, dim, length, generator=g) * 0.5,
        "A": -torch.exp(torch.rand(dim, state, generator=g) * 2.0) * decay,
        "B": torch.randn(*bc_shape, generator=g),
        "C": torch.randn(*bc_shape, generator=g),
        "D": torch.randn(dim, generator=g),
        "z": torch.randn(batch, dim, length, generator=g),
        "delta_bias": torch.randn(dim, generator=g) * 0.5,
    }
    return {k: v.to(device=device, dtype=dtype if k in ("u", "delta", "B", "C", "z") else torch.float32)
            for k, v in t.items()}


def pick(t: Dict[str, torch.Tensor], *, D: bool, z: bool, bias: bool) -> Dict[str, Optional[torch.Tensor]]:
    """Keyword operands with the optional ones present or None."""
    return {"u": t["u"], "delta": t["delta"], "A": t["A"], "B": t["B"], "C": t["C"], "D": t["D"] if D else None,
            "z": t["z"] if z else None, "delta_bias": t["delta_bias"] if bias else None}


def assert_scan_close(got: torch.Tensor, want: torch.Tensor, tol: float = 1e-5) -> None:
    """Equal to ``tol`` relative, or absolute on the scale of the whole output (fp32 sums of S terms cancel)."""
    scale = max(1.0, want.abs().max().item())
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol * scale)


# (D, L, S, groups): D below one channel block (4 at these sizes), across several and off a multiple of it
# (11, 27, 43) and on one; L of 1, on and off multiples of 16; S a power of two and not.
SHAPES = [(3, 1, 4, 0), (27, 33, 16, 0), (11, 16, 5, 0), (40, 47, 8, 4), (43, 32, 12, 0), (24, 20, 4, 3)]
# Every shape with all options on; every option set on two of them (the interpreter is slow).
CASES = ([(shape, "all") for shape in SHAPES]
         + [(shape, options) for shape in SHAPES[1:3] for options in ("none", "softplus_only", "z_and_D")])


def test_block_sizes_cover_the_gpu_and_tests_cross_blocks() -> None:
    assert block_d(2, 512) == 4 and block_d(4, 512) == 8 and block_d(8, 512) == 16 and block_d(1, 8) == 4
    assert all(d % block_d(2, d) for d, *_ in SHAPES if d not in (24, 40))


@pytest.mark.parametrize("shape,options", CASES)
def test_kernel_equals_the_reference_fp32(shape: Tuple[int, int, int, int], options: str) -> None:
    dim, length, state, groups = shape
    flags = {"all": (True, True, True, True), "none": (False, False, False, False),
             "softplus_only": (False, False, False, True), "z_and_D": (True, True, False, False)}[options]
    args = pick(make_inputs(dim, length, state, groups=groups), D=flags[0], z=flags[1], bias=flags[2])
    if not flags[3]:  # steps used as given must be positive, as after a softplus: a negative one amplifies
        args["delta"] = args["delta"].abs()
    got, got_last = selective_scan_triton(**args, delta_softplus=flags[3], return_last_state=True)
    want, want_last = selective_scan_reference(**args, delta_softplus=flags[3], return_last_state=True)
    assert got.shape == want.shape and got.dtype == torch.float32
    assert got_last.shape == (2, dim, state) and got_last.dtype == torch.float32
    assert_scan_close(got, want)
    assert_scan_close(got_last, want_last)


@pytest.mark.parametrize("decay", [30.0, 1000.0])
def test_strong_decays_equal_the_reference(decay: float) -> None:
    """exp(Δ·A) near or at 0 (the state forgets within a step), with large softplus'd steps."""
    t = make_inputs(24, 20, 16, decay=decay, seed=3)
    t["delta"] = t["delta"] * 8.0 + 4.0  # softplus(Δ) up to ~30: exp(Δ·A) underflows
    args = pick(t, D=True, z=True, bias=True)
    got, got_last = selective_scan_triton(**args, delta_softplus=True, return_last_state=True)
    want, want_last = selective_scan_reference(**args, delta_softplus=True, return_last_state=True)
    assert torch.isfinite(got).all()
    assert_scan_close(got, want)
    assert_scan_close(got_last, want_last)


def test_softplus_of_very_negative_steps_keeps_its_small_value() -> None:
    """softplus(−30) ≈ 9e−14 is kept (not rounded to 0), so the state still receives Δ·B·u."""
    t = make_inputs(8, 6, 4, seed=5)
    t["delta"] = torch.full_like(t["delta"], -30.0)
    args = pick(t, D=False, z=False, bias=False)
    got = selective_scan_triton(**args, delta_softplus=True)
    want = selective_scan_reference(**args, delta_softplus=True)
    assert want.abs().max() > 0
    torch.testing.assert_close(got, want, rtol=1e-4, atol=0.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_equal_the_reference(dtype: torch.dtype) -> None:
    """Half-precision u, delta, B, C, z: fp32 inside, so the output differs by at most its own rounding.

    Both compute the same fp32 values from the same half inputs and round once to the output dtype, so
    they agree to one unit in the last place: relative 2⁻⁷ (bf16) / 2⁻¹⁰ (fp16) of the magnitude.
    """
    args = pick(make_inputs(19, 29, 8, dtype=dtype, seed=1), D=True, z=True, bias=True)
    got, got_last = selective_scan_triton(**args, delta_softplus=True, return_last_state=True)
    want, want_last = selective_scan_reference(**args, delta_softplus=True, return_last_state=True)
    assert got.dtype == dtype and got_last.dtype == torch.float32
    ulp = {torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}[dtype]
    torch.testing.assert_close(got.float(), want.float(), rtol=ulp, atol=1e-5 * want.float().abs().max().item())
    assert_scan_close(got_last, want_last)


def test_strided_operands() -> None:
    """Channels-last views (as MVFuser's transposes make) and a sliced B/C are read through their strides."""
    t = make_inputs(24, 19, 8, seed=2)
    u = t["u"].transpose(1, 2).contiguous().transpose(1, 2)  # (N, D, L) with stride 1 along D
    delta = t["delta"].transpose(1, 2).contiguous().transpose(1, 2)
    bc = torch.cat([t["B"], t["C"]], dim=1)  # (N, 2S, L): B and C as slices of one projection
    B, C = bc[:, :8], bc[:, 8:]
    assert u.stride(1) == 1 and not B.is_contiguous() and not C.is_contiguous()
    got = selective_scan_triton(u, delta, t["A"], B, C, D=t["D"], z=t["z"], delta_softplus=True)
    want = selective_scan_reference(u, delta, t["A"], B, C, D=t["D"], z=t["z"], delta_softplus=True)
    assert_scan_close(got, want)


def test_bad_shapes_raise_clear_errors() -> None:
    t = make_inputs(8, 5, 4)
    with pytest.raises(ValueError, match="A must be"):
        selective_scan_triton(t["u"], t["delta"], t["A"][:4], t["B"], t["C"])
    with pytest.raises(ValueError, match="B must be"):
        selective_scan_triton(t["u"], t["delta"], t["A"], t["B"][..., :3], t["C"])
    with pytest.raises(ValueError, match="group count"):
        selective_scan_triton(t["u"], t["delta"], t["A"], t["B"].unsqueeze(1).expand(2, 3, 4, 5), t["C"])
    with pytest.raises(ValueError, match="D must be"):
        selective_scan_triton(t["u"], t["delta"], t["A"], t["B"], t["C"], D=t["D"][:3])


def test_fake_implementation_gives_the_shapes() -> None:
    from torch._subclasses import FakeTensorMode

    t = make_inputs(40, 23, 6, groups=4, dtype=torch.bfloat16)
    with FakeTensorMode() as mode:
        fake = {k: mode.from_tensor(v) for k, v in t.items()}
        out, last = torch.ops.dgss.selective_scan(fake["u"], fake["delta"], fake["A"], fake["B"], fake["C"],
                                                  fake["D"], fake["z"], fake["delta_bias"], True)
    assert out.shape == (2, 40, 23) and out.dtype == torch.bfloat16
    assert last.shape == (2, 40, 6) and last.dtype == torch.float32


class _ScanModule(torch.nn.Module):
    """A small module around the op: z gate and D skip from parameters."""

    def __init__(self, dim: int, state: int) -> None:
        super().__init__()
        self.A_log = torch.nn.Parameter(torch.rand(dim, state))
        self.D = torch.nn.Parameter(torch.randn(dim))

    def forward(self, u: torch.Tensor, delta: torch.Tensor, B: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
        return selective_scan_triton(u, delta, -torch.exp(self.A_log), B, C, D=self.D, z=u, delta_softplus=True)


def test_export_keeps_one_scan_node() -> None:
    torch.manual_seed(0)
    module = _ScanModule(24, 8).eval()
    t = make_inputs(24, 17, 8)
    inputs = (t["u"], t["delta"], t["B"], t["C"])
    program = torch.export.export(module, inputs)
    scans = [n for n in program.graph.nodes if n.op == "call_function" and "selective_scan" in str(n.target)]
    assert [str(n.target) for n in scans] == ["dgss.selective_scan.default"]
    assert not any("triton_kernel_wrapper" in str(n.target) for n in program.graph.nodes)
    got = program.module()(*inputs)
    with torch.no_grad():
        want = selective_scan_reference(t["u"], t["delta"], -torch.exp(module.A_log), t["B"], t["C"], D=module.D,
                                        z=t["u"], delta_softplus=True)
    assert_scan_close(got, want)


def test_gradients_equal_the_references() -> None:
    t = make_inputs(22, 13, 4, groups=2, seed=4)
    leaves = {k: v.clone().requires_grad_(True) for k, v in t.items()}
    grads = {}
    for name, scan in (("op", selective_scan_triton), ("reference", selective_scan_reference)):
        out, last = scan(**leaves, delta_softplus=True, return_last_state=True)
        (out.square().sum() + (last * 0.5).sum()).backward()
        grads[name] = {k: v.grad.clone() for k, v in leaves.items()}
        for v in leaves.values():
            v.grad = None
    for k in t:
        assert grads["op"][k].abs().max() > 0, k
        torch.testing.assert_close(grads["op"][k], grads["reference"][k], rtol=1e-4, atol=1e-4, msg=k)


def test_gradient_with_only_the_output_used() -> None:
    """The last state's gradient may be absent, and inputs without requires_grad get none."""
    t = make_inputs(8, 9, 4, seed=6)
    u = t["u"].clone().requires_grad_(True)
    selective_scan_triton(u, t["delta"], t["A"], t["B"], t["C"], D=t["D"]).sum().backward()
    u_ref = t["u"].clone().requires_grad_(True)
    selective_scan_reference(u_ref, t["delta"], t["A"], t["B"], t["C"], D=t["D"]).sum().backward()
    torch.testing.assert_close(u.grad, u_ref.grad, rtol=1e-5, atol=1e-5)


def test_fast_dispatch_uses_the_chunked_scan_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    import training.models.selective_scan_triton as module

    def refuse(*args, **kwargs):
        raise AssertionError("the Triton op must not run for CPU tensors")

    monkeypatch.setattr(module, "selective_scan_triton", refuse)
    args = pick(make_inputs(24, 21, 8), D=True, z=True, bias=True)
    got, last = selective_scan_fast(**args, delta_softplus=True, return_last_state=True)
    want, want_last = selective_scan_chunked(**args, delta_softplus=True, return_last_state=True)
    assert torch.equal(got, want) and torch.equal(last, want_last)


# -- GPU ----------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_kernel_equals_the_reference_and_mamba_ssm(dtype: torch.dtype) -> None:
    """The compiled kernel against the reference (on the CPU, in fp32) and against mamba_ssm where installed."""
    from training.models.selective_scan import kernel_available, _load_kernel

    t = make_inputs(96, 300, 16, dtype=dtype, seed=7)
    cuda = pick({k: v.cuda() for k, v in t.items()}, D=True, z=True, bias=True)
    got, got_last = selective_scan_triton(**cuda, delta_softplus=True, return_last_state=True)
    want, want_last = selective_scan_reference(**pick(t, D=True, z=True, bias=True), delta_softplus=True,
                                               return_last_state=True)
    tol = {torch.float32: 1e-4, torch.bfloat16: 2.0 ** -7}[dtype]
    assert_scan_close(got.cpu(), want, tol)
    assert_scan_close(got_last.cpu(), want_last, 1e-4)
    if kernel_available():
        mamba, mamba_last = _load_kernel()(**cuda, delta_softplus=True, return_last_state=True)
        assert_scan_close(got, mamba, tol)
        assert_scan_close(got_last, mamba_last, 1e-4)
    fast = selective_scan_fast(**cuda, delta_softplus=True)
    assert_scan_close(fast, got, tol)
