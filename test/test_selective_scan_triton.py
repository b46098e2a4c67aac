"""The fused Triton selective scan (``dgss::selective_scan``) and its backward against the sequential reference.

Off a GPU the ops' CPU kernels are the chunked scan; inside ``interpreted_kernels`` (on for every test here)
they run the same Triton kernel bodies in Triton's interpreter, so every comparison here checks the kernels
themselves (the backward's against autograd through the reference in
fp64); the GPU tests compare the compiled kernels with the reference and mamba_ssm.
"""

from __future__ import annotations

from typing import Dict, Iterator, Optional, Tuple

import pytest
import torch

pytest.importorskip("triton")

from dgss_perception.ops.selective_scan import selective_scan_chunked, selective_scan_reference  # noqa: E402
from dgss_perception.ops.selective_scan_triton import (  # noqa: E402
    BWD_CHUNK,
    block_d,
    interpreted_kernels,
    selective_scan_backward_chunked,
    selective_scan_fast,
    selective_scan_triton,
)


@pytest.fixture(autouse=True)
def _interpreted() -> Iterator[None]:
    """Every test here runs the Triton kernels themselves: on CPU tensors, in Triton's interpreter."""
    with interpreted_kernels():
        yield


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


def _scan_times_two(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                    C: torch.Tensor) -> torch.Tensor:
    return selective_scan_triton(u, delta, A, B, C, delta_softplus=True) * 2


def _aot_forward_targets(*args: torch.Tensor) -> list:
    """The call targets of the forward graph AOTDispatcher hands a torch.compile backend (what inductor sees)."""
    from functorch.compile import aot_function, make_boxed_func

    graphs = []

    def capture(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    aot_function(_scan_times_two, fw_compiler=capture)(*args)
    return [str(n.target) for n in graphs[-1].graph.nodes if n.op == "call_function"]


def test_compile_keeps_the_op_whole_off_cuda_and_inlines_the_kernel_on_cuda() -> None:
    """On the CPU inductor must call the op (its CPU kernel), not compile the chunked scan it would trace into
    (that code corrupted the heap inside MFuser); on CUDA it sees the Triton kernel to inline."""
    from torch._subclasses import FakeTensorMode

    t = make_inputs(8, 9, 4)
    args = (t["u"], t["delta"], t["A"], t["B"], t["C"])
    cpu = _aot_forward_targets(*args)
    assert "dgss.selective_scan.default" in cpu and not any("triton_kernel" in c for c in cpu)
    with FakeTensorMode():  # CUDA tensors without a GPU: tracing only
        fake = [torch.empty_strided(a.shape, a.stride(), dtype=a.dtype, device="cuda") for a in args]
        cuda = _aot_forward_targets(*fake)
    assert "triton_kernel_wrapper_functional" in cuda and "dgss.selective_scan.default" not in cuda


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
    import dgss_perception.ops.selective_scan_triton as module

    def refuse(*args, **kwargs):
        raise AssertionError("the Triton op must not run for CPU tensors")

    monkeypatch.setattr(module, "selective_scan_triton", refuse)
    args = pick(make_inputs(24, 21, 8), D=True, z=True, bias=True)
    got, last = selective_scan_fast(**args, delta_softplus=True, return_last_state=True)
    want, want_last = selective_scan_chunked(**args, delta_softplus=True, return_last_state=True)
    assert torch.equal(got, want) and torch.equal(last, want_last)


# -- backward kernel ------------------------------------------------------------------------------------------
GRAD_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def backward_by_op(args: Dict[str, Optional[torch.Tensor]], grad_out: torch.Tensor, grad_last: Optional[torch.Tensor],
                   softplus: bool, chunk: int) -> Dict[str, Optional[torch.Tensor]]:
    """Gradients from ``dgss::selective_scan_backward`` (the interpreted kernel on CPU); None for absent operands."""
    grads = torch.ops.dgss.selective_scan_backward(*(args[k] for k in GRAD_NAMES), grad_out, grad_last, softplus,
                                                   chunk)
    for k, g in zip(GRAD_NAMES, grads):
        assert (g.numel() == 0) == (args[k] is None), k
    return {k: g if args[k] is not None else None for k, g in zip(GRAD_NAMES, grads)}


def backward_by_autograd(args: Dict[str, Optional[torch.Tensor]], grad_out: torch.Tensor,
                         grad_last: Optional[torch.Tensor], softplus: bool,
                         dtype: Optional[torch.dtype] = torch.float64) -> Dict[str, Optional[torch.Tensor]]:
    """Autograd through the sequential reference, in ``dtype`` (None: the operands' own dtypes)."""
    leaves = {k: None if v is None else v.detach().to(dtype or v.dtype).requires_grad_(True) for k, v in args.items()}
    out, last = selective_scan_reference(**leaves, delta_softplus=softplus, return_last_state=True)
    outputs, grads = [out], [grad_out.to(out.dtype)]
    if grad_last is not None:
        outputs.append(last)
        grads.append(grad_last.to(last.dtype))
    torch.autograd.backward(outputs, grads)
    return {k: None if v is None else v.grad for k, v in leaves.items()}


def assert_grads_close(got: Dict[str, Optional[torch.Tensor]], want: Dict[str, Optional[torch.Tensor]],
                       tol: float = 1e-5, zero: Tuple[str, ...] = ()) -> None:
    """Every present gradient equal within ``tol`` (relative, or of its largest value); nonzero unless in ``zero``."""
    for k in GRAD_NAMES:
        if want[k] is None:
            assert got[k] is None, k
            continue
        assert got[k].shape == want[k].shape, k
        assert (want[k].abs().max() > 0) != (k in zero), k
        scale = want[k].abs().max().item()
        torch.testing.assert_close(got[k].double(), want[k].double(), rtol=tol, atol=tol * scale, msg=k)


def backward_case(dim: int, length: int, state: int, groups: int, *, options: str = "all", decay: float = 1.0,
                  dtype: torch.dtype = torch.float32, seed: int = 0):
    """Operands, grad_out (N, D, L), grad_last (N, D, S) or None, and softplus for an option set."""
    flags = {"all": (True, True, True, True, True), "none": (False, False, False, False, False),
             "z_only": (False, True, False, False, False), "D_bias": (True, False, True, False, True),
             "softplus_last": (False, False, False, True, True)}[options]
    t = make_inputs(dim, length, state, groups=groups, decay=decay, dtype=dtype, seed=seed)
    args = pick(t, D=flags[0], z=flags[1], bias=flags[2])
    if not flags[3]:  # as in the forward tests: steps used as given (with their bias) are positive
        args["delta"] = args["delta"].abs()
        if args["delta_bias"] is not None:
            args["delta_bias"] = args["delta_bias"].abs()
    g = torch.Generator().manual_seed(seed + 100)
    grad_out = torch.randn(2, dim, length, generator=g).to(dtype)
    grad_last = torch.randn(2, dim, state, generator=g) if flags[4] else None
    return args, grad_out, grad_last, flags[3]


@pytest.mark.parametrize("length", [1, 7, 33, 70])
def test_backward_kernel_equals_fp64_autograd(length: int) -> None:
    """All options on, grouped B/C, a last-state gradient; with 16-step chunks, 33 and 70 end off a chunk boundary.

    The kernel accumulates in fp32 and the reference runs in fp64: they agree to fp32 rounding.
    """
    args, grad_out, grad_last, softplus = backward_case(8, length, 4, 2, seed=length)
    got = backward_by_op(args, grad_out, grad_last, softplus, chunk=16)
    assert all(got[k].dtype == args[k].dtype for k in GRAD_NAMES)
    # One step from h = 0 leaves A without influence: its gradient is exactly zero.
    assert_grads_close(got, backward_by_autograd(args, grad_out, grad_last, softplus),
                       zero=("A",) if length == 1 else ())
    assert length > 1 or not got["A"].any()


@pytest.mark.parametrize("options", ["none", "z_only", "D_bias", "softplus_last"])
def test_backward_kernel_option_sets(options: str) -> None:
    """Each optional operand and the last state's gradient off in turn; L = 24 is three whole 8-step chunks."""
    args, grad_out, grad_last, softplus = backward_case(8, 24, 5, 0, options=options, seed=11)
    got = backward_by_op(args, grad_out, grad_last, softplus, chunk=8)
    assert_grads_close(got, backward_by_autograd(args, grad_out, grad_last, softplus))


@pytest.mark.parametrize("dim,groups", [(22, 2), (12, 12)])
def test_backward_groups_across_channel_blocks(dim: int, groups: int) -> None:
    """Groups that do not align with the channel blocks (11 or 1 channels per group, blocks of 4): dB and dC are
    added per channel, not per block; the aligned case (4 per group) is the fp64 test above."""
    assert (dim // groups) % block_d(2, dim) != 0 and (8 // 2) % block_d(2, 8) == 0
    args, grad_out, grad_last, softplus = backward_case(dim, 19, 4, groups, seed=dim)
    got = backward_by_op(args, grad_out, grad_last, softplus, chunk=8)
    assert_grads_close(got, backward_by_autograd(args, grad_out, grad_last, softplus))


def test_backward_strong_decays() -> None:
    """exp(Δ·A) underflowing to 0: the backward recomputes states forwards, never divides by the decay."""
    args, grad_out, grad_last, softplus = backward_case(8, 40, 4, 2, decay=1000.0, seed=3)
    args["delta"] = args["delta"] * 8.0 + 4.0
    got = backward_by_op(args, grad_out, grad_last, softplus, chunk=16)
    assert all(torch.isfinite(g).all() for g in got.values())
    assert_grads_close(got, backward_by_autograd(args, grad_out, grad_last, softplus))


def test_backward_half_inputs() -> None:
    """bf16 u, delta, B, C, z and grad_out: against autograd through the reference on the same inputs.

    Both compute the gradients in fp32 and round those of bf16 operands once, so they differ by at most one
    bf16 unit in the last place (relative 2⁻⁷), plus fp32 noise of 1e−5 of the largest value where values
    cancel; the fp32 gradients (A, D, delta_bias) agree to 1e−4.
    """
    args, grad_out, grad_last, softplus = backward_case(8, 21, 4, 2, dtype=torch.bfloat16, seed=9)
    got = backward_by_op(args, grad_out, grad_last, softplus, chunk=8)
    want = backward_by_autograd(args, grad_out, grad_last, softplus, dtype=None)
    for k in GRAD_NAMES:
        assert got[k].dtype == want[k].dtype == args[k].dtype, k
        if args[k].dtype == torch.bfloat16:
            scale = want[k].float().abs().max().item()
            torch.testing.assert_close(got[k].float(), want[k].float(), rtol=2.0 ** -7, atol=1e-5 * scale, msg=k)
        else:
            scale = want[k].abs().max().item()
            torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-4 * scale, msg=k)


def test_backward_kernel_equals_the_chunked_backward_on_strided_operands() -> None:
    """The plain backward (autograd through the chunked scan) and the kernel agree, with channels-last u and
    delta, B and C sliced from one projection, and a broadcast grad_out (stride 0, as from ``out.sum()``)."""
    t = make_inputs(12, 26, 4, seed=12)
    u = t["u"].transpose(1, 2).contiguous().transpose(1, 2)
    delta = t["delta"].transpose(1, 2).contiguous().transpose(1, 2)
    bc = torch.cat([t["B"], t["C"]], dim=1)
    args = {**pick(t, D=True, z=True, bias=True), "u": u, "delta": delta, "B": bc[:, :4], "C": bc[:, 4:]}
    grad_out = torch.full((1, 1, 1), 0.5).expand(2, 12, 26)
    assert grad_out.stride() == (0, 0, 0) and not args["B"].is_contiguous()
    got = backward_by_op(args, grad_out, None, True, chunk=8)
    plain = selective_scan_backward_chunked(*(args[k] for k in GRAD_NAMES), grad_out, None, True)
    assert_grads_close(got, dict(zip(GRAD_NAMES, plain)))
    only_u = selective_scan_backward_chunked(*(args[k] for k in GRAD_NAMES), grad_out, None, True,
                                             wanted=[True] + [False] * 7)
    assert only_u[1:] == (None,) * 7 and torch.equal(only_u[0], plain[0])


def test_backward_through_autograd_with_only_the_last_state_used() -> None:
    """A loss of the last state alone: the op's backward gets a zero grad_out and the last state's gradient."""
    t = make_inputs(8, 18, 4, groups=2, seed=13)
    grads = {}
    for name, scan in (("op", selective_scan_triton), ("reference", selective_scan_reference)):
        leaves = {k: v.clone().requires_grad_(True) for k, v in t.items()}
        _, last = scan(**leaves, delta_softplus=True, return_last_state=True)
        (last * last).sum().backward()
        # C, D and z act on the output only: zero gradients from the op, none from the reference.
        for k in ("C", "D", "z"):
            assert leaves[k].grad is None or not leaves[k].grad.any(), k
        grads[name] = {k: None if k in ("C", "D", "z") else v.grad for k, v in leaves.items()}
    assert_grads_close(grads["op"], grads["reference"], 1e-4)


def test_backward_fake_implementation_gives_the_shapes() -> None:
    from torch._subclasses import FakeTensorMode

    t = make_inputs(40, 23, 6, groups=4, dtype=torch.bfloat16)
    with FakeTensorMode() as mode:
        fake = {k: mode.from_tensor(v) for k, v in t.items()}
        grads = torch.ops.dgss.selective_scan_backward(*(fake[k] for k in GRAD_NAMES), fake["u"], None, True, 64)
    for k, g in zip(GRAD_NAMES, grads):
        assert g.shape == t[k].shape and g.dtype == t[k].dtype, k


def test_backward_bad_gradient_shapes_raise_clear_errors() -> None:
    t = make_inputs(8, 5, 4)
    operands = [t[k] for k in GRAD_NAMES]
    with pytest.raises(ValueError, match="grad_out must be"):
        torch.ops.dgss.selective_scan_backward(*operands, t["u"][..., :4], None, True, 64)
    with pytest.raises(ValueError, match="grad_last must be"):
        torch.ops.dgss.selective_scan_backward(*operands, t["u"], torch.zeros(2, 8, 3), True, 64)


# -- GPU ----------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_kernel_equals_the_reference_and_mamba_ssm(dtype: torch.dtype) -> None:
    """The compiled kernel against the reference (on the CPU, in fp32) and against mamba_ssm where installed."""
    from dgss_perception.ops.selective_scan import kernel_available, _load_kernel

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


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dim,groups", [(96, 0), (96, 4), (90, 9)])
def test_compiled_backward_equals_fp64_autograd(dim: int, groups: int) -> None:
    """The compiled backward kernel (64-step chunks over L = 300, block-aligned groups or not) against autograd
    through the reference in fp64 on the CPU."""
    args, grad_out, grad_last, softplus = backward_case(dim, 300, 16, groups, seed=8)
    cuda = {k: None if v is None else v.cuda() for k, v in args.items()}
    got = backward_by_op(cuda, grad_out.cuda(), grad_last.cuda(), softplus, chunk=BWD_CHUNK)
    want = backward_by_autograd(args, grad_out, grad_last, softplus)
    assert_grads_close({k: None if v is None else v.cpu() for k, v in got.items()}, want, 1e-4)
