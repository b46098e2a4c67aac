"""Mamba-1 selective scan as one fused Triton kernel, wrapped as the custom op ``dgss::selective_scan``.

Same function as :func:`dgss_perception.ops.selective_scan.selective_scan_reference` (see that module for the
recurrence and the argument layout: u, delta, z (N, D, L); A (D, S); B, C (N, S, L) or (N, G, S, L);
D, delta_bias (D,)). The kernel runs one program per (batch element, block of channels) and walks the
sequence once, keeping the (block_d × S) state in registers and accumulating in float32; inputs may be
float32, bfloat16 or float16 (each operand is read in its own dtype and widened in registers), and the
output has u's dtype. Unlike the chunked scan it touches every input once and stores nothing but the
output and the last state, so its cost is one pass over memory.

The op is registered with ``torch.library.triton_op``, so ``torch.export`` keeps it as a single
``dgss.selective_scan`` node (its fake implementation is the launcher itself, traced on fake tensors)
while ``torch.compile`` / AOTInductor see and compile the kernel inside on CUDA (on other devices
they call the op as one extern kernel). Where that API is missing it is
registered with ``torch.library.custom_op`` and an explicit fake implementation.

Devices: on CUDA the compiled kernel runs; on the CPU the op is the chunked PyTorch scan (exact, and
as fast as the PyTorch path gets there), so a program exported with the op runs anywhere. Inside
:func:`interpreted_kernels` the CPU runs the *same* kernel source through Triton's interpreter instead
(slow: for tests and debugging, so the kernels are checked without a GPU). :func:`selective_scan_fast`
chooses between mamba_ssm, the op and the chunked scan by device and by what traces the call.

Backward: the op's gradient is a second op, ``dgss::selective_scan_backward``, registered the same way
around a fused backward kernel. One program per (batch element,
block of channels) recomputes the forward from the inputs — checkpoints of the state every
:data:`BWD_CHUNK` steps, then each chunk's states again from its checkpoint — and runs the adjoint
recurrence backwards, in float32, producing every gradient (u, delta before bias and softplus, A, B, C,
D, z, delta_bias) in one pass; dB and dC, shared by the channels of a group, are summed with atomic
adds. Nothing of the forward is saved but its inputs. :func:`selective_scan_backward_chunked` (recompute
through the chunked PyTorch scan and back-propagate) is the plain backward it is checked against, and
the backward op's path on devices other than CUDA and CPU.

Nothing here needs Triton to import: without it :data:`TRITON_AVAILABLE` is False, the op is not
registered and :func:`selective_scan_fast` uses the other paths.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import Any, Iterator, Optional, Sequence, Tuple

import torch

from .selective_scan import (
    DEFAULT_CHUNK,
    ScanOutput,
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
BWD_OP_NAME = "dgss::selective_scan_backward"

# The op's CPU kernels run the exact chunked PyTorch scan (so that a program exported with the op runs on a
# CPU at the chunked scan's speed); inside interpreted_kernels() they run the Triton kernels' own source
# under Triton's interpreter instead, which is how the kernels are tested without a GPU.
_INTERPRET_ON_CPU: contextvars.ContextVar[bool] = contextvars.ContextVar("dgss_scan_interpret", default=False)


@contextlib.contextmanager
def interpreted_kernels() -> Iterator[None]:
    """Inside the block, the ``dgss::`` scan ops run their Triton kernels in Triton's interpreter on CPU tensors."""
    token = _INTERPRET_ON_CPU.set(True)
    try:
        yield
    finally:
        _INTERPRET_ON_CPU.reset(token)


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
    torch.compile decomposes the op into on CUDA. CUDA launches the compiled kernel; other devices get
    the chunked PyTorch scan here, which is exact and traceable (eager CPU calls and CPU torch.compile
    never reach this: they call the op's CPU kernel, see :func:`_keep_opaque_off_cuda`).
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
    """CPU kernel of the op: the chunked scan, or in :func:`interpreted_kernels` the interpreted Triton kernel."""
    _check(u, delta, A, B, C, D, z, delta_bias)
    if not _INTERPRET_ON_CPU.get():
        out, last = selective_scan_chunked(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias,
                                           delta_softplus=delta_softplus, return_last_state=True)
        return out, last.to(torch.float32)
    out, last = _empty_outputs(u, A)
    _launch(_interpreted_kernel(), u, delta, A, B, C, D, z, delta_bias, delta_softplus, out, last)
    return out, last


# -- backward --------------------------------------------------------------------------------------------------
# Steps per chunk of the backward kernel. Pass 1 checkpoints the state entering every chunk; pass 2 reruns
# one chunk at a time from its checkpoint into a scratch of BWD_CHUNK states and walks them backwards. The
# memory beyond the gradients is (N, ⌈L/BWD_CHUNK⌉ + BWD_CHUNK, D, S) float32, ~2·√L states per channel at
# the best chunk: 64 suits the few thousand tokens of MVFuser (L 2594: 41 checkpoints + 64 scratch states).
BWD_CHUNK = 64


def _scan_bwd_body(
    u_ptr, delta_ptr, a_ptr, b_ptr, c_ptr, d_ptr, z_ptr, bias_ptr, gout_ptr, glast_ptr,
    du_ptr, ddelta_ptr, dz_ptr, db_ptr, dc_ptr, da_ptr, dskip_ptr, dbias_ptr, ck_ptr, hs_ptr,
    dim, length, state, per_group, groups, n_chunks,
    s_un, s_ud, s_ul, s_tn, s_td, s_tl, s_zn, s_zd, s_zl, s_gn, s_gd, s_gl,
    s_bn, s_bg, s_bs, s_bl, s_cn, s_cg, s_cs, s_cl,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_GLAST: tl.constexpr, ONE_GROUP: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
    CHUNK: tl.constexpr,
):
    """Gradients from one program: batch element program_id(0), channels [program_id(1)·BLOCK_D, +BLOCK_D).

    With a_t = exp(Δ_t·A), h_t = a_t·h_{t−1} + Δ_t·u_t·B_t, w_t = C_t·h_t + D·u_t and out_t = w_t·silu(z_t),
    the adjoint λ_t = ∂loss/∂h_t runs backwards, λ_t = C_t·gy_t + a_{t+1}·λ_{t+1} with gy_t = grad_out_t·silu(z_t),
    starting from the last state's gradient (a_L·λ_L := glast), and gives

        du_t = Δ_t·Σ_s λ_t·B_t + D·gy_t            dΔ_t = Σ_s λ_t·(A·a_t·h_{t−1} + u_t·B_t)   (× σ through softplus)
        dA   = Σ_t Δ_t·λ_t·a_t·h_{t−1}            dB_t = Σ_d Δ_t·u_t·λ_t     dC_t = Σ_d gy_t·h_t
        dz_t = grad_out_t·w_t·silu'(z_t)           dD   = Σ_t gy_t·u_t        dbias = Σ_t dΔ_t

    h_{t−1} is never recovered by dividing by a_t (which underflows to 0 under strong decays). Pass 1 runs the
    forward over the full chunks of CHUNK steps and stores the state entering each chunk to ck (N, n_chunks,
    D, S); pass 2 takes the chunks from the last, reruns each from its checkpoint storing the state entering
    each step to hs (N, CHUNK, D, S), and walks the chunk backwards. Steps past the end (the last chunk's
    tail) get Δ = 0 and u = B = C = grad = 0: they change neither the state nor the adjoint, and store nothing.

    du, ddelta, dz are contiguous (N, D, L) in their operands' dtypes; db and dc are float32 (N, G, L, S),
    zero on entry, accumulated by atomic adds of the programs sharing a group; da (N, D, S), dskip and dbias
    (N, D) are float32 sums over time per batch element (the caller sums over N). glast is contiguous
    (N, D, S). ONE_GROUP: every channel block lies inside one group (D/G a multiple of BLOCK_D), so dB and
    dC are summed over the block in registers and added with one atomic add of S values per step.
    """
    pid_n = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_s = tl.arange(0, BLOCK_S)
    mask_d = offs_d < dim
    mask_s = offs_s < state
    mask_ds = mask_d[:, None] & mask_s[None, :]
    # Masked lanes read A = B = C = 0 and a zero gradient: their state and adjoint stay 0.
    a = tl.load(a_ptr + offs_d[:, None] * state + offs_s[None, :], mask=mask_ds, other=0.0).to(tl.float32)
    if HAS_D:
        skip = tl.load(d_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    group = (offs_d // per_group).to(tl.int64)
    u_row = u_ptr + pid_n * s_un + offs_d * s_ud
    t_row = delta_ptr + pid_n * s_tn + offs_d * s_td
    z_row = z_ptr + pid_n * s_zn + offs_d * s_zd
    g_row = gout_ptr + pid_n * s_gn + offs_d * s_gd
    o_off = pid_n * dim * length + offs_d.to(tl.int64) * length
    b_tile = b_ptr + pid_n * s_bn + group[:, None] * s_bg + offs_s[None, :] * s_bs
    c_tile = c_ptr + pid_n * s_cn + group[:, None] * s_cg + offs_s[None, :] * s_cs
    ds_off = offs_d[:, None] * state + offs_s[None, :]  # this block's tile of a contiguous (D, S) slab
    slab = dim * state
    ck_tile = ck_ptr + pid_n * n_chunks * slab + ds_off
    hs_tile = hs_ptr + pid_n * CHUNK * slab + ds_off
    if ONE_GROUP:
        first = (pid_d * BLOCK_D // per_group).to(tl.int64)
        db_row = db_ptr + (pid_n * groups + first) * length * state + offs_s
        dc_row = dc_ptr + (pid_n * groups + first) * length * state + offs_s
    else:
        db_row = db_ptr + (pid_n * groups + group[:, None]) * length * state + offs_s[None, :]
        dc_row = dc_ptr + (pid_n * groups + group[:, None]) * length * state + offs_s[None, :]

    # Pass 1: the states entering the chunks (every step of the full chunks is inside the sequence).
    h = tl.full((BLOCK_D, BLOCK_S), 0.0, tl.float32)
    tl.store(ck_tile, h, mask=mask_ds)
    for k in range(1, n_chunks):
        for j in range(CHUNK):
            t = (k - 1) * CHUNK + j
            u_t = tl.load(u_row + t * s_ul, mask=mask_d, other=0.0).to(tl.float32)
            dt = tl.load(t_row + t * s_tl, mask=mask_d, other=0.0).to(tl.float32)
            if HAS_BIAS:
                dt = dt + bias
            if SOFTPLUS:  # as in the forward kernel
                e = tl.exp(-tl.abs(dt))
                dt = tl.maximum(dt, 0.0) + tl.where(e < 1e-4, e - 0.5 * e * e, tl.log(1.0 + e))
            b_t = tl.load(b_tile + t * s_bl, mask=mask_ds, other=0.0).to(tl.float32)
            h = tl.exp(dt[:, None] * a) * h + (dt * u_t)[:, None] * b_t
        tl.store(ck_tile + k * slab, h, mask=mask_ds)
    tl.debug_barrier()

    # Pass 2, chunk by chunk from the last. carry = a_{t+1}·λ_{t+1}, the adjoint reaching h_t from step t+1.
    if HAS_GLAST:
        carry = tl.load(glast_ptr + pid_n * slab + ds_off, mask=mask_ds, other=0.0).to(tl.float32)
    else:
        carry = tl.full((BLOCK_D, BLOCK_S), 0.0, tl.float32)
    da_acc = tl.full((BLOCK_D, BLOCK_S), 0.0, tl.float32)
    if HAS_D:
        dskip_acc = tl.full((BLOCK_D,), 0.0, tl.float32)
    if HAS_BIAS:
        dbias_acc = tl.full((BLOCK_D,), 0.0, tl.float32)
    for kk in range(n_chunks):
        k = n_chunks - 1 - kk
        h = tl.load(ck_tile + k * slab, mask=mask_ds, other=0.0)
        for j in range(CHUNK):  # rerun the chunk, keeping h_{t−1} of every step
            t = k * CHUNK + j
            ok = mask_d & (t < length)
            tl.store(hs_tile + j * slab, h, mask=mask_ds)
            u_t = tl.load(u_row + t * s_ul, mask=ok, other=0.0).to(tl.float32)
            dt = tl.load(t_row + t * s_tl, mask=ok, other=0.0).to(tl.float32)
            if HAS_BIAS:
                dt = dt + bias
            if SOFTPLUS:
                e = tl.exp(-tl.abs(dt))
                dt = tl.maximum(dt, 0.0) + tl.where(e < 1e-4, e - 0.5 * e * e, tl.log(1.0 + e))
            dt = tl.where(ok, dt, 0.0)
            b_t = tl.load(b_tile + t * s_bl, mask=ok[:, None] & mask_s[None, :], other=0.0).to(tl.float32)
            h = tl.exp(dt[:, None] * a) * h + (dt * u_t)[:, None] * b_t
        tl.debug_barrier()
        for jj in range(CHUNK):  # h holds h_t; the scratch gives h_{t−1}
            j = CHUNK - 1 - jj
            t = k * CHUNK + j
            inside = t < length
            ok = mask_d & inside
            ok_ds = ok[:, None] & mask_s[None, :]
            h_prev = tl.load(hs_tile + j * slab, mask=mask_ds, other=0.0)
            u_t = tl.load(u_row + t * s_ul, mask=ok, other=0.0).to(tl.float32)
            x = tl.load(t_row + t * s_tl, mask=ok, other=0.0).to(tl.float32)
            if HAS_BIAS:
                x = x + bias
            if SOFTPLUS:
                e = tl.exp(-tl.abs(x))
                dt = tl.maximum(x, 0.0) + tl.where(e < 1e-4, e - 0.5 * e * e, tl.log(1.0 + e))
                sig = tl.where(x >= 0.0, 1.0, e) / (1.0 + e)  # softplus'(x) = σ(x), without overflow
            else:
                dt = x
            dt = tl.where(ok, dt, 0.0)
            b_t = tl.load(b_tile + t * s_bl, mask=ok_ds, other=0.0).to(tl.float32)
            c_t = tl.load(c_tile + t * s_cl, mask=ok_ds, other=0.0).to(tl.float32)
            g_t = tl.load(g_row + t * s_gl, mask=ok, other=0.0).to(tl.float32)
            if HAS_Z:
                z_t = tl.load(z_row + t * s_zl, mask=ok, other=0.0).to(tl.float32)
                sz = 1.0 / (1.0 + tl.exp(-z_t))
                w = tl.reduce(h * c_t, 1, _SUM_COMBINE)
                if HAS_D:
                    w = w + skip * u_t
                dz = g_t * w * sz * (1.0 + z_t * (1.0 - sz))  # silu'(z) = σ(z)·(1 + z·(1 − σ(z)))
                tl.store(dz_ptr + o_off + t, dz.to(dz_ptr.dtype.element_ty), mask=ok)
                gy = g_t * z_t * sz
            else:
                gy = g_t
            decay = tl.exp(dt[:, None] * a)
            lam = carry + gy[:, None] * c_t
            lam_b = lam * b_t
            du = tl.reduce(lam_b, 1, _SUM_COMBINE) * dt
            if HAS_D:
                du = du + skip * gy
                dskip_acc = dskip_acc + gy * u_t
            back = lam * decay * h_prev
            da_acc = da_acc + dt[:, None] * back
            ddt = tl.reduce(back * a + lam_b * u_t[:, None], 1, _SUM_COMBINE)
            if SOFTPLUS:
                ddt = ddt * sig
            ddt = tl.where(ok, ddt, 0.0)  # past the end λ is the carried glast: keep it out of dbias
            if HAS_BIAS:
                dbias_acc = dbias_acc + ddt
            tl.store(du_ptr + o_off + t, du.to(du_ptr.dtype.element_ty), mask=ok)
            tl.store(ddelta_ptr + o_off + t, ddt.to(ddelta_ptr.dtype.element_ty), mask=ok)
            gb = lam * (dt * u_t)[:, None]
            gc = gy[:, None] * h
            if ONE_GROUP:
                tl.atomic_add(db_row + t * state, tl.reduce(gb, 0, _SUM_COMBINE), mask=mask_s & inside)
                tl.atomic_add(dc_row + t * state, tl.reduce(gc, 0, _SUM_COMBINE), mask=mask_s & inside)
            else:
                tl.atomic_add(db_row + t * state, gb, mask=ok_ds)
                tl.atomic_add(dc_row + t * state, gc, mask=ok_ds)
            carry = decay * lam
            h = h_prev
        tl.debug_barrier()  # the next chunk overwrites the scratch
    tl.store(da_ptr + pid_n * slab + ds_off, da_acc, mask=mask_ds)
    if HAS_D:
        tl.store(dskip_ptr + pid_n * dim + offs_d, dskip_acc, mask=mask_d)
    if HAS_BIAS:
        tl.store(dbias_ptr + pid_n * dim + offs_d, dbias_acc, mask=mask_d)


if TRITON_AVAILABLE:
    _scan_bwd_kernel = triton.jit(_scan_bwd_body)

    @functools.lru_cache(maxsize=1)
    def _interpreted_bwd_kernel() -> Any:
        """The backward kernel under Triton's interpreter, for CPU tensors."""
        from triton.runtime.interpreter import InterpretedFunction

        return InterpretedFunction(_scan_bwd_body)


Grads = Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
              torch.Tensor]


def _check_backward(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                    D: Optional[torch.Tensor], z: Optional[torch.Tensor], delta_bias: Optional[torch.Tensor],
                    grad_out: torch.Tensor, grad_last: Optional[torch.Tensor]) -> None:
    """Raise ValueError on the forward's bad shapes, and on grad_out ≠ (N, D, L) or grad_last ≠ (N, D, S)."""
    _check(u, delta, A, B, C, D, z, delta_bias)
    if grad_out.shape != u.shape:
        raise ValueError(f"selective scan backward: grad_out must be (N, D, L) = {tuple(u.shape)}, "
                         f"got {tuple(grad_out.shape)}")
    last = (u.shape[0], u.shape[1], A.shape[1])
    if grad_last is not None and grad_last.shape != last:
        raise ValueError(f"selective scan backward: grad_last must be (N, D, S) = {last}, got {tuple(grad_last.shape)}")


def _launch_bwd(kernel: Any, u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                D: Optional[torch.Tensor], z: Optional[torch.Tensor], delta_bias: Optional[torch.Tensor],
                grad_out: torch.Tensor, grad_last: Optional[torch.Tensor], delta_softplus: bool, chunk: int) -> Grads:
    """Run the backward ``kernel``; returns the gradients as the backward op (empty (0,) for absent operands)."""
    batch, dim, length = u.shape
    state = A.shape[1]
    B4 = B if B.dim() == 4 else B.unsqueeze(1)
    C4 = C if C.dim() == 4 else C.unsqueeze(1)
    groups = B4.shape[1]
    size = block_d(batch, dim)
    block_s = max(triton.next_power_of_2(state), 2)
    # Short sequences take one chunk of the next power of two (a few kernel variants, no padded steps).
    chunk = max(1, min(chunk, triton.next_power_of_2(max(length, 1))))
    n_chunks = triton.cdiv(length, chunk)
    f32 = {"dtype": torch.float32, "device": u.device}
    du = torch.empty((batch, dim, length), dtype=u.dtype, device=u.device)
    ddelta = torch.empty((batch, dim, length), dtype=delta.dtype, device=u.device)
    dz = torch.empty((batch, dim, length), dtype=z.dtype, device=u.device) if z is not None else u.new_empty(0)
    db = torch.zeros((batch, groups, length, state), **f32)  # (L, S) order: each step's atomics are contiguous
    dc = torch.zeros((batch, groups, length, state), **f32)
    da = torch.zeros((batch, dim, state), **f32)  # zeros: with L = 0 nothing is launched
    dskip = torch.zeros((batch, dim), **f32)
    dbias = torch.zeros((batch, dim), **f32)
    if length > 0:
        ck = torch.empty((batch, n_chunks, dim, state), **f32)
        hs = torch.empty((batch, chunk, dim, state), **f32)
        # Unused operands get u as a valid pointer (the constexpr flags skip them); never an output buffer, which
        # would be passed twice and confuse the functionalisation of the launch under torch.compile.
        glast = grad_last.to(torch.float32).contiguous() if grad_last is not None else u
        zz = u if z is None else z
        grid = (batch, triton.cdiv(dim, size), 1)
        kernel[grid](
            u, delta, A.contiguous(), B4, C4, u if D is None else D.contiguous(), zz,
            u if delta_bias is None else delta_bias.contiguous(), grad_out, glast,
            du, ddelta, dz if z is not None else u, db, dc, da, dskip, dbias, ck, hs,
            dim, length, state, dim // groups, groups, n_chunks,
            u.stride(0), u.stride(1), u.stride(2), delta.stride(0), delta.stride(1), delta.stride(2),
            zz.stride(0), zz.stride(1), zz.stride(2), grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
            B4.stride(0), B4.stride(1), B4.stride(2), B4.stride(3), C4.stride(0), C4.stride(1), C4.stride(2),
            C4.stride(3),
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=delta_softplus,
            HAS_GLAST=grad_last is not None, ONE_GROUP=(dim // groups) % size == 0, BLOCK_D=size,
            BLOCK_S=block_s, CHUNK=chunk, num_warps=max(1, min(4, size * block_s // 64)),
        )

    def projection(g: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        g = g.transpose(-1, -2)
        return (g if like.dim() == 4 else g.squeeze(1)).contiguous().to(like.dtype)

    dD = dskip.sum(0).to(D.dtype) if D is not None else A.new_empty(0)
    dbias_sum = dbias.sum(0).to(delta_bias.dtype) if delta_bias is not None else A.new_empty(0)
    return du, ddelta, da.sum(0).to(A.dtype), projection(db, B), projection(dc, C), dD, dz, dbias_sum


def selective_scan_backward_chunked(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor],
    z: Optional[torch.Tensor],
    delta_bias: Optional[torch.Tensor],
    grad_out: Optional[torch.Tensor],
    grad_last: Optional[torch.Tensor],
    delta_softplus: bool,
    wanted: Optional[Sequence[bool]] = None,
) -> Tuple[Optional[torch.Tensor], ...]:
    """The scan's gradients by recomputing the chunked PyTorch scan and back-propagating through it.

    The plain backward (the op's before the kernel, kept to check it and for devices without it).
    Operands as :func:`dgss_perception.ops.selective_scan.selective_scan_reference`; grad_out (N, D, L) and
    grad_last (N, D, S) are the gradients of out and of the last state (either may be None). Returns the
    gradients of (u, delta, A, B, C, D, z, delta_bias), shaped and typed like them; None for absent operands
    and for those ``wanted`` (8 flags, default all) leaves out.
    """
    tensors = (u, delta, A, B, C, D, z, delta_bias)
    flags = [t is not None and (wanted is None or bool(w)) for t, w in zip(tensors, wanted or [True] * 8)]
    primals = [t.detach() for t, f in zip(tensors, flags) if f]
    if not primals:
        return (None,) * 8

    def scan(*leaves: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        given = iter(leaves)
        ops = [next(given) if f else t for t, f in zip(tensors, flags)]
        return selective_scan_chunked(*ops[:5], D=ops[5], z=ops[6], delta_bias=ops[7], delta_softplus=delta_softplus,
                                      return_last_state=True)

    if _below_autograd():  # inside an op's implementation: autograd is switched off, functorch's vjp is not
        (out, last), vjp = torch.func.vjp(scan, *primals)
        cotangents = (torch.zeros_like(out) if grad_out is None else grad_out.to(out.dtype),
                      torch.zeros_like(last) if grad_last is None else grad_last.to(last.dtype))
        found = iter(vjp(cotangents))
    else:  # plain autograd, which also traces (torch.compile's AOTAutograd records it)
        with torch.enable_grad():
            leaves = [t.requires_grad_(True) for t in primals]
            out, last = scan(*leaves)
            pairs = [(o, g) for o, g in ((out, grad_out), (last, grad_last)) if g is not None]
            grads = (torch.autograd.grad([o for o, _ in pairs], leaves, [g.to(o.dtype) for o, g in pairs],
                                         allow_unused=True) if pairs else [None] * len(leaves))
        found = iter(torch.zeros_like(t) if g is None else g for t, g in zip(leaves, grads))
    return tuple(next(found) if f else None for f in flags)


def _below_autograd() -> bool:
    """Whether autograd is switched off by the dispatcher (inside an operator's implementation)."""
    key = getattr(torch._C.DispatchKey, "AutogradFunctionality", None)
    return key is not None and torch._C._dispatch_tls_is_dispatch_key_excluded(key)


def _traced(t: torch.Tensor) -> bool:
    """Whether ``t`` stands for data being traced (a fake, functional or meta tensor), not data."""
    from torch._subclasses.fake_tensor import is_fake

    return t.device.type == "meta" or is_fake(t)


def _selective_scan_bwd_impl(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor],
    z: Optional[torch.Tensor],
    delta_bias: Optional[torch.Tensor],
    grad_out: torch.Tensor,
    grad_last: Optional[torch.Tensor],
    delta_softplus: bool,
    chunk: int,
) -> Grads:
    """Body of ``dgss::selective_scan_backward``: the gradients of (u, delta, A, B, C, D, z, delta_bias).

    Operands as the forward op, plus grad_out (N, D, L) and grad_last (N, D, S) or None, and the kernel's
    chunk length. Each gradient has its operand's shape and dtype; absent operands get an empty (0,)
    tensor (an op cannot return None). CUDA runs the kernel (also when traced: torch.compile sees it).
    Elsewhere this is also the fake implementation, giving shapes only, and for data on devices other than
    CPU (whose eager calls run the interpreted kernel) it back-propagates through the chunked scan. The
    op's autograd never calls it traced off CUDA (it differentiates the chunked scan there), so a
    decomposition of it (torch.compile tracing through it) off CUDA is refused rather than given shapes.
    """
    _check_backward(u, delta, A, B, C, D, z, delta_bias, grad_out, grad_last)
    if u.device.type != "cuda":
        if _traced(u):
            from torch._subclasses.functional_tensor import FunctionalTensor

            if isinstance(u, FunctionalTensor):
                raise NotImplementedError("dgss::selective_scan_backward compiles on CUDA only; elsewhere "
                                          "differentiate selective_scan_chunked")
            return tuple(torch.empty_like(t) if t is not None else A.new_empty(0)  # type: ignore[return-value]
                         for t in (u, delta, A, B, C, D, z, delta_bias))
        grads = selective_scan_backward_chunked(u, delta, A, B, C, D, z, delta_bias, grad_out, grad_last,
                                                delta_softplus)
        # Cloned: some are views of one buffer (dB and dC), and an op's outputs may not alias each other.
        du, ddelta, dA, dB, dC, dD, dz, dbias = (g.clone() if g is not None else A.new_empty(0) for g in grads)
        return du, ddelta, dA, dB, dC, dD, dz, dbias
    return _launch_bwd(torch.library.wrap_triton(_scan_bwd_kernel), u, delta, A, B, C, D, z, delta_bias, grad_out,
                       grad_last, delta_softplus, chunk)


def _selective_scan_bwd_cpu(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor],
    z: Optional[torch.Tensor],
    delta_bias: Optional[torch.Tensor],
    grad_out: torch.Tensor,
    grad_last: Optional[torch.Tensor],
    delta_softplus: bool,
    chunk: int,
) -> Grads:
    """CPU kernel of the backward op: the chunked scan's gradients (in interpreted_kernels: the Triton kernel)."""
    _check_backward(u, delta, A, B, C, D, z, delta_bias, grad_out, grad_last)
    if not _INTERPRET_ON_CPU.get():
        grads = selective_scan_backward_chunked(u, delta, A, B, C, D, z, delta_bias, grad_out, grad_last,
                                                delta_softplus)
        # Cloned: some are views of one buffer (dB and dC), and an op's outputs may not alias each other.
        return tuple(g.clone() if g is not None else A.new_empty(0) for g in grads)  # type: ignore[return-value]
    return _launch_bwd(_interpreted_bwd_kernel(), u, delta, A, B, C, D, z, delta_bias, grad_out, grad_last,
                       delta_softplus, chunk)


def _setup_context(ctx: Any, inputs: Tuple[Any, ...], output: Any) -> None:
    """Keep the inputs: the backward recomputes the forward."""
    ctx.inputs = inputs


def _backward(ctx: Any, grad_out: Optional[torch.Tensor], grad_last: Optional[torch.Tensor]) -> Tuple[Any, ...]:
    """Gradients of (u, delta, A, B, C, D, z, delta_bias) by the backward op (the fused kernel on CUDA and CPU)."""
    u, delta, A, B, C, D, z, delta_bias, delta_softplus = ctx.inputs
    tensors = (u, delta, A, B, C, D, z, delta_bias)
    wanted = [t is not None and need for t, need in zip(tensors, ctx.needs_input_grad[:8])]
    if not any(wanted) or (grad_out is None and grad_last is None):
        return (None,) * 9
    if not (u.is_cuda or (u.device.type == "cpu" and not _traced(u))):
        # Traced off CUDA (the CPU kernel is eager-only) or another device: the chunked scan's autograd.
        return selective_scan_backward_chunked(*tensors, grad_out, grad_last, delta_softplus, wanted) + (None,)
    if grad_out is None:  # only the last state was used
        grad_out = torch.zeros_like(u)
    # Detached: the backward op has no gradient of its own (no double backward).
    operands = [t.detach() if t is not None else None for t in tensors]
    grads = torch.ops.dgss.selective_scan_backward(*operands, grad_out, grad_last, delta_softplus, BWD_CHUNK)
    return tuple(g if w else None for g, w in zip(grads, wanted)) + (None,)


def _keep_opaque_off_cuda(op) -> None:
    """Let torch.compile decompose the op into its Triton kernel on CUDA only; elsewhere keep it one call.

    ``triton_op`` makes AOTDispatcher (under FunctionalTensorMode) trace the op's body, so inductor can
    inline the kernel launch. Off CUDA that body is the chunked scan, and inductor's CPU code for it
    fused into the surrounding MFuser graph corrupts the heap (torch 2.14, a dynamic window count:
    "double free or corruption" on the first frame). Kept opaque, inductor calls the op's CPU kernel
    (the eager chunked scan) as an extern kernel; the compiled graph around it is unchanged.
    """
    from torch._subclasses.functional_tensor import FunctionalTensorMode

    # The triton_op's own rule, kept for CUDA. A custom_op (older torch) has none and is already opaque; a
    # torch that renamed this private table would leave the CPU decomposition on, which
    # test_compile_keeps_the_op_whole_off_cuda_and_inlines_the_kernel_on_cuda catches.
    decompose = getattr(op, "_torch_dispatch_fns", {}).get(FunctionalTensorMode)
    if decompose is None:
        return

    def functional_rule(mode, func, types, args, kwargs):  # noqa: ANN001 (torch_dispatch signature)
        u = args[0] if args else kwargs["u"]
        if u.device.type == "cuda":
            return decompose(mode, func, types, args, kwargs)
        return mode.__torch_dispatch__(func, types, args, kwargs)

    op.register_torch_dispatch(FunctionalTensorMode, functional_rule)


if TRITON_AVAILABLE:
    if hasattr(torch.library, "triton_op") and hasattr(torch.library, "wrap_triton"):
        selective_scan_op = torch.library.triton_op(OP_NAME, _selective_scan_impl, mutates_args=())
        selective_scan_backward_op = torch.library.triton_op(BWD_OP_NAME, _selective_scan_bwd_impl, mutates_args=())
    else:  # older torch: an opaque custom op (export keeps it; torch.compile cannot look inside)
        selective_scan_op = torch.library.custom_op(OP_NAME, _selective_scan_impl, mutates_args=())
        selective_scan_backward_op = torch.library.custom_op(BWD_OP_NAME, _selective_scan_bwd_impl, mutates_args=())

        @selective_scan_op.register_fake
        def _fake(u, delta, A, B, C, D, z, delta_bias, delta_softplus):  # noqa: D103 (shapes only)
            return _empty_outputs(u, A)

        @selective_scan_backward_op.register_fake
        def _fake_bwd(u, delta, A, B, C, D, z, delta_bias, grad_out, grad_last, softplus, chunk):  # noqa: D103
            return tuple(torch.empty_like(t) if t is not None else A.new_empty(0)
                         for t in (u, delta, A, B, C, D, z, delta_bias))

    selective_scan_op.register_kernel("cpu", _selective_scan_cpu)
    selective_scan_op.register_autograd(_backward, setup_context=_setup_context)
    _keep_opaque_off_cuda(selective_scan_op)
    selective_scan_backward_op.register_kernel("cpu", _selective_scan_bwd_cpu)


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

    Arguments and result as :func:`dgss_perception.ops.selective_scan.selective_scan_reference`: u, delta, z
    (N, D, L); A (D, S); B, C (N, S, L) or (N, G, S, L); D, delta_bias (D,). Returns out (N, D, L) in u's
    dtype, and with ``return_last_state`` the last state (N, D, S) in float32. On CPU tensors the kernel
    are the chunked scan's (in :func:`interpreted_kernels`: the kernel in Triton's interpreter).
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
    chunk: int = DEFAULT_CHUNK,
) -> ScanOutput:
    """Selective scan on the fastest path for the tensors' device and for what is tracing the call.

    - ONNX export and TorchScript tracing: the chunked PyTorch scan (``chunk``), flat and loop-free, since
      neither format can hold the Triton kernel;
    - torch.export and torch.compile: the ``dgss::selective_scan`` op (one node in the program; on CUDA its
      Triton kernel is compiled in, elsewhere it is the chunked scan), so that a ``.pt2`` package exported
      on any machine runs the kernel on the car's GPU;
    - eager on CUDA: mamba_ssm's ``selective_scan_fn`` where it imports, else the op;
    - eager elsewhere, and without Triton: the chunked scan.

    Arguments and result as :func:`dgss_perception.ops.selective_scan.selective_scan_reference` (u, delta,
    z (N, D, L); A (D, S); B, C (N, S, L) or (N, G, S, L); D, delta_bias (D,) → out (N, D, L) [, last
    state (N, D, S)]), plus the chunked scan's ``chunk``.
    """
    kwargs = dict(D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus, return_last_state=return_last_state)
    if torch.onnx.is_in_onnx_export() or torch.jit.is_tracing() or torch.jit.is_scripting():
        return selective_scan_chunked(u, delta, A, B, C, chunk=chunk, **kwargs)
    if torch.compiler.is_exporting() or torch.compiler.is_compiling():
        if TRITON_AVAILABLE:
            return selective_scan_triton(u, delta, A, B, C, **kwargs)
        return selective_scan_chunked(u, delta, A, B, C, chunk=chunk, **kwargs)
    if u.is_cuda:
        if kernel_available():
            return _load_kernel()(u, delta, A, B, C, **kwargs)
        if TRITON_AVAILABLE:
            return selective_scan_triton(u, delta, A, B, C, **kwargs)
    return selective_scan_chunked(u, delta, A, B, C, chunk=chunk, **kwargs)


__all__ = ["BWD_CHUNK", "BWD_OP_NAME", "OP_NAME", "TRITON_AVAILABLE", "interpreted_kernels",
           "selective_scan_backward_chunked", "selective_scan_fast", "selective_scan_reference",
           "selective_scan_triton"]
