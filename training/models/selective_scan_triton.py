"""Mamba-1 selective scan as one fused Triton kernel, wrapped as the custom op ``dgss::selective_scan``.

Same function as :func:`training.models.selective_scan.selective_scan_reference` (see that module for the
recurrence and the argument layout: u, delta, z (N, D, L); A (D, S); B, C (N, S, L) or (N, G, S, L);
D, delta_bias (D,)). The kernel runs one program per (batch element, block of channels) and walks the
sequence once, keeping the (block_d × S) state in registers and accumulating in float32; inputs may be
float32, bfloat16 or float16 (each operand is read in its own dtype and widened in registers), and the
output has u's dtype. Unlike the chunked scan it touches every input once and stores nothing but the
output and the last state, so its cost is one pass over memory.

The op is registered with ``torch.library.triton_op``, so ``torch.export`` keeps it as a single
``dgss.selective_scan`` node (its fake implementation is the launcher itself, traced on fake tensors)
while ``torch.compile`` / AOTInductor see and compile the kernel inside. Where that API is missing it is
registered with ``torch.library.custom_op`` and an explicit fake implementation.

Devices: on CUDA the compiled kernel runs; on CPU the op runs the *same* kernel source through Triton's
interpreter (slow: meant for tests and debugging, so the kernel is checked without a GPU);
:func:`selective_scan_fast` never sends CPU tensors to the op. Backward: the op's gradient recomputes the
forward with the differentiable chunked PyTorch scan and back-propagates through it (correct, but with the
chunked scan's memory and speed; a fused backward kernel is not written yet).

Nothing here needs Triton to import: without it :data:`TRITON_AVAILABLE` is False, the op is not
registered and :func:`selective_scan_fast` uses the other paths.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Tuple

import torch

from training.models.selective_scan import (
    ScanOutput,
    _exporting,
    _load_kernel,
    kernel_available,
    selective_scan_chunked,
    selective_scan_reference,
)

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs (and Jetson) without Triton: the op is simply not registered
    triton = None
    tl = None

TRITON_AVAILABLE = triton is not None
OP_NAME = "dgss::selective_scan"

# Channels per program: at most 16 (16 channels × 16 states = 256 fp32 of state, two per thread of 4 warps,
# all in registers), fewer when that would leave the GPU idle: the programs are independent and each walks
# all L steps, so the grid should cover the SMs (132 on an H200) a couple of times over.
MAX_BLOCK_D = 16
MIN_PROGRAMS = 256


def block_d(batch: int, dim: int) -> int:
    """Channels per program for N = ``batch`` and D = ``dim``: the largest of 16, 8, 4 that gives ≥ 256 programs."""
    size = MAX_BLOCK_D
    while size > 4 and batch * -(-dim // size) < MIN_PROGRAMS:
        size //= 2
    return size


def _scan_fwd_body(
    u_ptr, delta_ptr, a_ptr, b_ptr, c_ptr, d_ptr, z_ptr, bias_ptr, out_ptr, last_ptr,
    dim, length, state, per_group,
    s_un, s_ud, s_ul, s_tn, s_td, s_tl, s_zn, s_zd, s_zl,
    s_bn, s_bg, s_bs, s_bl, s_cn, s_cg, s_cs, s_cl,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """One program: batch element program_id(0), channels [program_id(1)·BLOCK_D, +BLOCK_D), all L steps.

    A, D and bias are contiguous (D, S) / (D,); out is contiguous (N, D, L); last is contiguous (N, D, S)
    float32. The other operands come with their strides (s_u*, s_t* for delta, s_z*, s_b*, s_c*).
    """
    pid_n = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_s = tl.arange(0, BLOCK_S)
    mask_d = offs_d < dim
    mask_ds = mask_d[:, None] & (offs_s < state)[None, :]
    # Masked lanes read A = 0 and B = 0, so their state stays 0 and nothing reaches a stored value.
    a = tl.load(a_ptr + offs_d[:, None] * state + offs_s[None, :], mask=mask_ds, other=0.0).to(tl.float32)
    if HAS_D:
        skip = tl.load(d_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    group = (offs_d // per_group).to(tl.int64)  # channel d reads B and C of group d // (D/G)
    u_row = u_ptr + pid_n * s_un + offs_d * s_ud
    t_row = delta_ptr + pid_n * s_tn + offs_d * s_td
    z_row = z_ptr + pid_n * s_zn + offs_d * s_zd
    o_row = out_ptr + pid_n * dim * length + offs_d.to(tl.int64) * length
    b_tile = b_ptr + pid_n * s_bn + group[:, None] * s_bg + offs_s[None, :] * s_bs
    c_tile = c_ptr + pid_n * s_cn + group[:, None] * s_cg + offs_s[None, :] * s_cs
    # Only builtins here (tl.full, tl.reduce with the library's sum combine), not tl.zeros / tl.sum: those
    # are themselves @jit functions, which Triton's interpreter runs only when it was enabled before
    # Triton was imported, while the CPU kernel below interprets this body in an ordinary process.
    h = tl.full((BLOCK_D, BLOCK_S), 0.0, tl.float32)
    for t in range(length):
        u_t = tl.load(u_row + t * s_ul, mask=mask_d, other=0.0).to(tl.float32)
        dt = tl.load(t_row + t * s_tl, mask=mask_d, other=0.0).to(tl.float32)
        if HAS_BIAS:
            dt = dt + bias
        if SOFTPLUS:
            # softplus(x) = max(x, 0) + log1p(exp(−|x|)); log1p by its series where 1 + e would round e away
            # (no libdevice log1p: it is not available to the interpreter).
            e = tl.exp(-tl.abs(dt))
            dt = tl.maximum(dt, 0.0) + tl.where(e < 1e-4, e - 0.5 * e * e, tl.log(1.0 + e))
        b_t = tl.load(b_tile + t * s_bl, mask=mask_ds, other=0.0).to(tl.float32)
        c_t = tl.load(c_tile + t * s_cl, mask=mask_ds, other=0.0).to(tl.float32)
        h = tl.exp(dt[:, None] * a) * h + (dt * u_t)[:, None] * b_t
        y = tl.reduce(h * c_t, 1, _SUM_COMBINE)
        if HAS_D:
            y = y + skip * u_t
        if HAS_Z:
            z_t = tl.load(z_row + t * s_zl, mask=mask_d, other=0.0).to(tl.float32)
            y = y * (z_t / (1.0 + tl.exp(-z_t)))
        tl.store(o_row + t, y.to(out_ptr.dtype.element_ty), mask=mask_d)
    last = last_ptr + (pid_n * dim + offs_d[:, None]) * state + offs_s[None, :]
    tl.store(last, h, mask=mask_ds)


if TRITON_AVAILABLE:
    def _add(a, b):  # noqa: D103 (reduction combine: a + b)
        return a + b

    # The library's own sum combine, which the interpreter reduces with numpy (any other combine function
    # it calls once per element pair); a local one where a Triton release does not have it.
    _SUM_COMBINE = getattr(tl.standard, "_sum_combine", None) or triton.jit(_add)
    _scan_fwd_kernel = triton.jit(_scan_fwd_body)

    @functools.lru_cache(maxsize=1)
    def _interpreted_kernel() -> Any:
        """The kernel under Triton's interpreter (numpy on the host), for CPU tensors."""
        from triton.runtime.interpreter import InterpretedFunction

        return InterpretedFunction(_scan_fwd_body)


def _check(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
           D: Optional[torch.Tensor], z: Optional[torch.Tensor], delta_bias: Optional[torch.Tensor]) -> None:
    """Raise ValueError on shapes the kernel cannot take (the same rules as the reference)."""
    if A.is_complex():
        raise NotImplementedError("selective scan: only real A is supported")
    if u.dim() != 3 or delta.shape != u.shape:
        raise ValueError(f"selective scan: u and delta must be (N, D, L), got {tuple(u.shape)}, {tuple(delta.shape)}")
    batch, dim, length = u.shape
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"selective scan: A must be (D={dim}, S), got {tuple(A.shape)}")
    state = A.shape[1]
    for name, t in (("B", B), ("C", C)):
        ok = t.dim() in (3, 4) and t.shape[0] == batch and t.shape[-2] == state and t.shape[-1] == length
        if not ok:
            raise ValueError(f"selective scan: {name} must be (N, S, L) or (N, G, S, L) with N={batch}, S={state}, "
                             f"L={length}; got {tuple(t.shape)}")
    groups = B.shape[1] if B.dim() == 4 else 1
    if (C.shape[1] if C.dim() == 4 else 1) != groups or dim % groups != 0:
        raise ValueError(f"selective scan: B and C need the same group count G dividing D={dim}, "
                         f"got shapes {tuple(B.shape)} and {tuple(C.shape)}")
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None and t.shape != (dim,):
            raise ValueError(f"selective scan: {name} must be (D={dim},), got {tuple(t.shape)}")
    if z is not None and z.shape != u.shape:
        raise ValueError(f"selective scan: z must be (N, D, L) like u, got {tuple(z.shape)}")


def _empty_outputs(u: torch.Tensor, A: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Uninitialised out (N, D, L) in u's dtype (contiguous) and last state (N, D, S) in float32."""
    batch, dim, length = u.shape
    out = torch.empty((batch, dim, length), dtype=u.dtype, device=u.device)
    last = torch.empty((batch, dim, A.shape[1]), dtype=torch.float32, device=u.device)
    return out, last


def _launch(kernel: Any, u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
            D: Optional[torch.Tensor], z: Optional[torch.Tensor], delta_bias: Optional[torch.Tensor],
            delta_softplus: bool, out: torch.Tensor, last: torch.Tensor) -> None:
    """Fill out and last with the scan, running ``kernel`` (compiled, interpreted, or traced by wrap_triton)."""
    _, dim, length = u.shape
    state = A.shape[1]
    B4 = B if B.dim() == 4 else B.unsqueeze(1)
    C4 = C if C.dim() == 4 else C.unsqueeze(1)
    zz = u if z is None else z  # a valid pointer for the unused operands; the constexpr flags skip them
    size = block_d(u.shape[0], dim)
    block_s = max(triton.next_power_of_2(state), 2)
    grid = (u.shape[0], triton.cdiv(dim, size), 1)
    kernel[grid](
        u, delta, A.contiguous(), B4, C4,
        u if D is None else D.contiguous(), zz, u if delta_bias is None else delta_bias.contiguous(), out, last,
        dim, length, state, dim // B4.shape[1],
        u.stride(0), u.stride(1), u.stride(2), delta.stride(0), delta.stride(1), delta.stride(2),
        zz.stride(0), zz.stride(1), zz.stride(2),
        B4.stride(0), B4.stride(1), B4.stride(2), B4.stride(3), C4.stride(0), C4.stride(1), C4.stride(2), C4.stride(3),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=delta_softplus,
        BLOCK_D=size, BLOCK_S=block_s, num_warps=max(1, min(4, size * block_s // 64)),
    )


def _selective_scan_impl(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor],
    z: Optional[torch.Tensor],
    delta_bias: Optional[torch.Tensor],
    delta_softplus: bool,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Body of ``dgss::selective_scan``: (out (N, D, L) in u's dtype, last state (N, D, S) float32).

    Also the op's fake implementation (run on fake tensors, where the launch is traced, not run) and what
    torch.compile decomposes the op into. CUDA launches the compiled kernel; other devices get the
    chunked PyTorch scan here, which is exact, traceable and compilable (eager CPU calls never reach this:
    the op's CPU kernel runs the interpreted Triton kernel).
    """
    _check(u, delta, A, B, C, D, z, delta_bias)
    if u.device.type != "cuda":
        out, last = selective_scan_chunked(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias,
                                           delta_softplus=delta_softplus, return_last_state=True)
        return out, last.to(torch.float32)
    out, last = _empty_outputs(u, A)
    _launch(torch.library.wrap_triton(_scan_fwd_kernel), u, delta, A, B, C, D, z, delta_bias, delta_softplus,
            out, last)
    return out, last


def _selective_scan_cpu(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor],
    z: Optional[torch.Tensor],
    delta_bias: Optional[torch.Tensor],
    delta_softplus: bool,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """CPU kernel of the op: the Triton kernel run by Triton's interpreter. Returns as the op."""
    _check(u, delta, A, B, C, D, z, delta_bias)
    out, last = _empty_outputs(u, A)
    _launch(_interpreted_kernel(), u, delta, A, B, C, D, z, delta_bias, delta_softplus, out, last)
    return out, last


def _setup_context(ctx: Any, inputs: Tuple[Any, ...], output: Any) -> None:
    """Keep the inputs: the backward recomputes the forward."""
    ctx.inputs = inputs


def _backward(ctx: Any, grad_out: Optional[torch.Tensor], grad_last: Optional[torch.Tensor]) -> Tuple[Any, ...]:
    """Gradients of (u, delta, A, B, C, D, z, delta_bias) by back-propagating through the chunked scan."""
    u, delta, A, B, C, D, z, delta_bias, delta_softplus = ctx.inputs
    tensors = (u, delta, A, B, C, D, z, delta_bias)
    wanted = [t is not None and need for t, need in zip(tensors, ctx.needs_input_grad[:8])]
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(w) if t is not None else None for t, w in zip(tensors, wanted)]
        out, last = selective_scan_chunked(*leaves[:5], D=leaves[5], z=leaves[6], delta_bias=leaves[7],
                                           delta_softplus=delta_softplus, return_last_state=True)
        pairs = [(o, g) for o, g in ((out, grad_out), (last, grad_last)) if g is not None]
        inputs = [t for t, w in zip(leaves, wanted) if w]
        grads = iter(torch.autograd.grad([o for o, _ in pairs], inputs, [g.to(o.dtype) for o, g in pairs],
                                         allow_unused=True) if pairs and inputs else ())
    return tuple(next(grads) if w else None for w in wanted) + (None,)


if TRITON_AVAILABLE:
    if hasattr(torch.library, "triton_op") and hasattr(torch.library, "wrap_triton"):
        selective_scan_op = torch.library.triton_op(OP_NAME, _selective_scan_impl, mutates_args=())
    else:  # older torch: an opaque custom op (export keeps it; torch.compile cannot look inside)
        selective_scan_op = torch.library.custom_op(OP_NAME, _selective_scan_impl, mutates_args=())

        @selective_scan_op.register_fake
        def _fake(u, delta, A, B, C, D, z, delta_bias, delta_softplus):  # noqa: D103 (shapes only)
            return _empty_outputs(u, A)

    selective_scan_op.register_kernel("cpu", _selective_scan_cpu)
    selective_scan_op.register_autograd(_backward, setup_context=_setup_context)


def selective_scan_triton(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor] = None,
    z: Optional[torch.Tensor] = None,
    delta_bias: Optional[torch.Tensor] = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
) -> ScanOutput:
    """Selective scan by the ``dgss::selective_scan`` op (the fused Triton kernel).

    Arguments and result as :func:`training.models.selective_scan.selective_scan_reference`: u, delta, z
    (N, D, L); A (D, S); B, C (N, S, L) or (N, G, S, L); D, delta_bias (D,). Returns out (N, D, L) in u's
    dtype, and with ``return_last_state`` the last state (N, D, S) in float32. On CPU tensors the kernel
    runs in Triton's interpreter (slow; for tests).
    """
    if not TRITON_AVAILABLE:
        raise RuntimeError("selective_scan_triton: Triton is not installed")
    out, last = torch.ops.dgss.selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    return (out, last) if return_last_state else out


def selective_scan_fast(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor] = None,
    z: Optional[torch.Tensor] = None,
    delta_bias: Optional[torch.Tensor] = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
) -> ScanOutput:
    """Selective scan on the fastest path for the tensors' device.

    On CUDA: mamba_ssm's ``selective_scan_fn`` where it imports and nothing is being exported or traced
    (it does neither), else the Triton op (which exports as one ``dgss.selective_scan`` node and compiles
    under torch.compile / AOTInductor). Elsewhere, or without Triton: the chunked PyTorch scan (which also
    exports to ONNX without loops). Arguments and result as
    :func:`training.models.selective_scan.selective_scan_reference` (u, delta, z (N, D, L); A (D, S);
    B, C (N, S, L) or (N, G, S, L); D, delta_bias (D,) → out (N, D, L) [, last state (N, D, S)]).
    """
    scan: Callable[..., ScanOutput] = selective_scan_chunked
    if u.is_cuda:
        if not _exporting() and kernel_available():
            scan = _load_kernel()
        elif TRITON_AVAILABLE:
            scan = selective_scan_triton
    return scan(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus,
                return_last_state=return_last_state)


__all__ = ["OP_NAME", "TRITON_AVAILABLE", "selective_scan_fast", "selective_scan_reference", "selective_scan_triton"]
