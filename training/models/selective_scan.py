"""Mamba-1 selective scan: a sequential reference, an exact chunked form that exports, and a dispatcher.

The scan (the SSM core of the MFuser family's MVFuser) runs, for every batch element n, channel d and
state s, the diagonal linear recurrence

    Δ_t = softplus(delta_t + delta_bias)   (bias and softplus optional)
    h_t = exp(Δ_t·A[d, s]) · h_{t−1} + Δ_t · B_t[s] · u_t,    h_{−1} = 0
    y_t = Σ_s C_t[s] · h_t[s] + D[d] · u_t,    out_t = y_t · silu(z_t)   (D and z optional)

with the argument layout of mamba_ssm's ``selective_scan_fn``: u, delta and z (N, D, L); A (D, S); B and C
(N, S, L), or (N, G, S, L) where each of the G groups serves D/G consecutive channels; D and delta_bias (D,).
Only real A and input-dependent (variable) B and C are supported, which is what the MFuser family uses.

* :func:`selective_scan_reference` is the textbook loop over time, kept to validate the others.
* :func:`selective_scan_chunked` is the same function without a time loop, and exports to ONNX with
  neither ``Loop`` nor ``Scan`` nodes. The decay exp(Δ·A) differs per channel *and* per state (A is
  (D, S), e.g. A[d, s] = −(s + 1) at MVFuser's init), so the Mamba-2 trick of contracting C·Bᵀ over the
  state first does not apply: every (n, d, s) is its own scalar recurrence. Those are solved chunk by
  chunk: inside a chunk of Q steps, h = M·x with M[t, τ] = exp(Σ_{τ<k≤t} log a_k) below the diagonal
  (the segment sums are formed by a masked cumulative sum, so no difference of large cumulative sums
  loses precision, and the upper triangle is set to −inf *before* the exponential, so nothing
  overflows); across chunks the chunk-end states obey the same kind of recurrence with the chunks'
  total log-decays, which is solved by the same function one level up (recursion depth ⌈log_Q L⌉,
  resolved at trace time, so the exported graph is flat). Memory: the decay matrices hold
  N·D·S·L·Q floats (×≈(1 + 1/Q) for the upper levels) plus a few N·D·S·L tensors; the cost grows
  linearly with Q, which buys nothing here (no tensor-core matmul), so Q is kept small.
* :func:`selective_scan` picks mamba_ssm's fused CUDA kernel when it is installed, the tensors are on
  CUDA and nothing is being exported or traced, and the chunked form otherwise.

All arithmetic runs in float32 at least (float64 stays float64); the output has the dtype of u.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import math
from typing import Callable, Optional, Tuple, Union

import torch
import torch.nn.functional as F

ScanOutput = Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]

# Chunk length of the chunked scan. Work and memory per step are ∝ Q (every (n, d, s) has its own Q×Q
# decay matrix per chunk; no tensor-core matmul to feed), while a smaller Q adds recursion levels of a
# dozen small ops each. On CPU, MVFuser's size (D 512, S 16, L 2594) ran 0.7 / 1.0 / 1.7 / 6.6 s with
# Q = 4 / 8 / 16 / 64; 8 keeps four levels for 2594 tokens (2594 → 325 → 41 → 6).
DEFAULT_CHUNK = 8


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Float32 for half types (and float32), float64 for float64: the accumulation type of the scan."""
    return torch.promote_types(dtype, torch.float32)


def _prepare(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    delta_bias: Optional[torch.Tensor],
    delta_softplus: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Check shapes, cast to the accumulation type, apply bias and softplus to Δ, make B and C grouped.

    Returns:
        u (N, D, L), Δ (N, D, L), A (D, S), B (N, G, S, L) and C (N, G, S, L), all in the accumulation type.
    """
    if A.is_complex():
        raise NotImplementedError("selective scan: only real A is supported")
    if u.dim() != 3 or delta.shape != u.shape:
        raise ValueError(f"selective scan: u and delta must be (N, D, L), got {tuple(u.shape)}, {tuple(delta.shape)}")
    batch, dim, length = u.shape
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"selective scan: A must be (D={dim}, S), got {tuple(A.shape)}")
    if B.dim() == 3:  # (N, S, L): one group shared by all channels
        B = B.unsqueeze(1)
    if C.dim() == 3:
        C = C.unsqueeze(1)
    state = A.shape[1]
    for name, t in (("B", B), ("C", C)):
        if t.dim() != 4 or t.shape[0] != batch or t.shape[2] != state or t.shape[3] != length:
            raise ValueError(f"selective scan: {name} must be (N, S, L) or (N, G, S, L) with N={batch}, S={state}, "
                             f"L={length}; got {tuple(t.shape)}")
    if B.shape[1] != C.shape[1] or dim % B.shape[1] != 0:
        raise ValueError(f"selective scan: B and C need the same group count G dividing D={dim}, "
                         f"got {B.shape[1]} and {C.shape[1]}")
    ctype = _compute_dtype(u.dtype)
    u = u.to(ctype)
    delta = delta.to(ctype)
    if delta_bias is not None:
        delta = delta + delta_bias.to(ctype)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    return u, delta, A.to(ctype), B.to(ctype), C.to(ctype)


def _finish(
    y: torch.Tensor,
    u: torch.Tensor,
    D: Optional[torch.Tensor],
    z: Optional[torch.Tensor],
    dtype: torch.dtype,
) -> torch.Tensor:
    """Add the skip D·u, gate with silu(z), cast to the input dtype: (N, D, L) → (N, D, L)."""
    if D is not None:
        y = y + u * D.to(y.dtype)[:, None]
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y.to(dtype)


def selective_scan_reference(
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
    """Selective scan as a plain loop over time (the reference; fp32 accumulation).

    Args:
        u: input, (N, D, L).
        delta: step sizes before bias and softplus, (N, D, L).
        A: state matrix diagonal, (D, S), real (negative in practice).
        B: input projection, (N, S, L) or (N, G, S, L) with G dividing D.
        C: output projection, same shape as B.
        D: skip weight, (D,).
        z: gate, (N, D, L); the output is multiplied by silu(z).
        delta_bias: added to delta, (D,).
        delta_softplus: apply softplus to delta (after the bias).
        return_last_state: also return the state after the last step.

    Returns:
        out (N, D, L) in u's dtype, and with ``return_last_state`` the last state (N, D, S) in the
        accumulation dtype (float32, or float64 for float64 inputs).
    """
    dtype = u.dtype
    u, delta, A, B, C = _prepare(u, delta, A, B, C, delta_bias, delta_softplus)
    batch, dim, length = u.shape
    groups = B.shape[1]
    # Expand the groups to channels: channel d reads group d // (D/G).
    B = B.repeat_interleave(dim // groups, dim=1)  # (N, D, S, L)
    C = C.repeat_interleave(dim // groups, dim=1)
    h = u.new_zeros(batch, dim, A.shape[1])
    ys = []
    for t in range(length):
        dt = delta[:, :, t, None]  # (N, D, 1)
        h = torch.exp(dt * A) * h + dt * B[..., t] * u[:, :, t, None]
        ys.append((h * C[..., t]).sum(-1))
    y = torch.stack(ys, dim=-1) if ys else u.new_zeros(batch, dim, 0)
    out = _finish(y, u, D, z, dtype)
    return (out, h) if return_last_state else out


def _segment_decay(log_a: torch.Tensor) -> torch.Tensor:
    """Decay matrices of one chunk: (..., Q) log-decays → (..., Q, Q).

    Entry [t, τ] is exp(log_a[τ+1] + … + log_a[t]) for τ ≤ t (1 on the diagonal) and 0 above it. Each
    entry is the sum of its own segment (a cumulative sum down the columns of a strictly-lower-masked
    copy), not a difference of two running sums, which would lose the small segments next to a large one
    to rounding; and the upper triangle is set to −inf before the exponential, so no entry overflows.
    """
    q = log_a.shape[-1]
    # Made from log_a, not with device=: a traced graph would hold the tracing device as a literal.
    ones = log_a.new_ones(q, q, dtype=torch.bool)
    strict = torch.tril(ones, diagonal=-1)  # [k, τ]: k > τ
    lower = torch.tril(ones)  # [t, τ]: t ≥ τ
    segments = log_a.unsqueeze(-1).expand(*log_a.shape, q).masked_fill(~strict, 0.0).cumsum(dim=-2)
    # In place: neither cumsum's nor masked_fill's backward needs its output, so this saves two decay-sized copies.
    return segments.masked_fill_(~lower, -math.inf).exp_()


def _diagonal_scan(log_a: torch.Tensor, x: torch.Tensor, chunk: int) -> torch.Tensor:
    """All states of h_t = exp(log_a_t)·h_{t−1} + x_t, h_{−1} = 0, without a loop over t.

    Args:
        log_a: log-decays, (..., T).
        x: inputs, (..., T), same shape.
        chunk: chunk length Q ≥ 2.

    Returns:
        h, (..., T).
    """
    length = x.shape[-1]
    if length <= chunk:  # one chunk: h = M·x
        return (_segment_decay(log_a) @ x.unsqueeze(-1)).squeeze(-1)
    n_chunks = -(-length // chunk)
    pad = n_chunks * chunk - length
    if pad:  # log a = 0 and x = 0 carry the state through unchanged; the padded tail is sliced off
        log_a = F.pad(log_a, (0, pad))
        x = F.pad(x, (0, pad))
    log_a = log_a.unflatten(-1, (n_chunks, chunk))  # (..., n_chunks, Q)
    x = x.unflatten(-1, (n_chunks, chunk))
    h_local = (_segment_decay(log_a) @ x.unsqueeze(-1)).squeeze(-1)  # states from this chunk's inputs alone
    # Log-decay from the chunk start to each position: a running sum of same-signed terms (A ≤ 0),
    # so it is accurate, and its exponential is ≤ 1.
    decay_in = log_a.cumsum(dim=-1)
    # The chunk-end states follow the same recurrence one level up: H_c = exp(Σ_chunk log a)·H_{c−1} + local end.
    h_end = _diagonal_scan(decay_in[..., -1], h_local[..., -1], chunk)  # (..., n_chunks)
    h_enter = F.pad(h_end[..., :-1], (1, 0))  # state entering each chunk (0 before the first)
    h = h_local + decay_in.exp() * h_enter.unsqueeze(-1)
    return h.flatten(-2)[..., :length]


def selective_scan_chunked(
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
    """Selective scan computed chunk by chunk, with no loop over time; exports to ONNX without Loop/Scan.

    Same function and arguments as :func:`selective_scan_reference`. Inside a chunk of ``chunk`` steps
    the states are decay-matrix products (see :func:`_segment_decay`); across chunks the chunk-end
    states are carried by the same scan at the chunk level, recursively, so the graph holds
    ⌈log_chunk L⌉ levels and no loop. Shapes (including L) are fixed when exported; L need not be a
    multiple of ``chunk`` (the tail is padded with Δ = 0, u = 0, which leaves the state unchanged).

    Memory: the decay matrices take N·D·S·L·chunk floats (×≈(1 + 1/chunk) over all levels), plus about
    five N·D·S·L tensors; e.g. MVFuser (D 512, S 16, L 2594) with chunk 8: ~0.7 GB of decay matrices per
    image in float32. Both work and memory grow linearly with ``chunk``.

    Args and returns as :func:`selective_scan_reference`, plus ``chunk``, the chunk length (≥ 2).
    """
    if chunk < 2:
        raise ValueError(f"selective_scan_chunked: chunk must be ≥ 2, got {chunk}")
    dtype = u.dtype
    u, delta, A, B, C = _prepare(u, delta, A, B, C, delta_bias, delta_softplus)
    batch, dim, length = u.shape
    groups, state = B.shape[1], A.shape[1]
    per_group = dim // groups
    # Work in (N, G, D/G, S, L): channels of a group share B and C by broadcasting, without copies.
    delta_g = delta.view(batch, groups, per_group, 1, length)
    log_a = delta_g * A.view(1, groups, per_group, state, 1)  # Δ·A, (N, G, D/G, S, L)
    x = (delta * u).view(batch, groups, per_group, 1, length) * B.unsqueeze(2)  # Δ·B·u, (N, G, D/G, S, L)
    h = _diagonal_scan(log_a, x, chunk)
    y = (h * C.unsqueeze(2)).sum(dim=3).reshape(batch, dim, length)  # contract the state: C_t·h_t
    out = _finish(y, u, D, z, dtype)
    if return_last_state:
        last = h[..., -1].reshape(batch, dim, state) if length else u.new_zeros(batch, dim, state)
        return out, last
    return out


@functools.lru_cache(maxsize=1)
def _load_kernel() -> Optional[Callable[..., ScanOutput]]:
    """mamba_ssm's fused ``selective_scan_fn``, or None where it is not installed or cannot load.

    Not installed (no ``mamba_ssm`` package) is the usual case off a GPU and passes silently. An installed
    mamba_ssm that fails to import (a CUDA extension built for another torch, a missing dependency or
    library) is worth knowing, since the scan is then several times slower: it is logged as a warning with
    the reason, once, and the pure-PyTorch chunked scan is used.
    """
    if not _installed("mamba_ssm"):
        return None
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception as exc:  # ImportError (undefined symbol, missing dependency), OSError, RuntimeError
        logging.getLogger(__name__).warning(
            "mamba_ssm is installed but its selective-scan kernel cannot be loaded (%s: %s); using the "
            "pure-PyTorch chunked scan", type(exc).__name__, exc)
        return None
    return selective_scan_fn


def _installed(name: str) -> bool:
    """Whether the top-level package ``name`` can be found (without importing it)."""
    try:
        return importlib.util.find_spec(name) is not None
    except ValueError:  # in sys.modules without a spec (a module made at run time): it is there
        return True


def kernel_available() -> bool:
    """Whether mamba_ssm's fused selective-scan kernel can be imported."""
    return _load_kernel() is not None


def _exporting() -> bool:
    """Whether the current call is being traced for export (ONNX, TorchScript, torch.export)."""
    return bool(torch.onnx.is_in_onnx_export() or torch.jit.is_tracing() or torch.jit.is_scripting()
                or torch.compiler.is_exporting())


def selective_scan(
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
    use_kernel: Optional[bool] = None,
    chunk: int = DEFAULT_CHUNK,
) -> ScanOutput:
    """Selective scan on the fastest path that applies: mamba_ssm's CUDA kernel, else the chunked form.

    Arguments and result as :func:`selective_scan_reference`. ``use_kernel`` None chooses the kernel
    when mamba_ssm imports, u is on CUDA and nothing is being exported or traced (the kernel neither
    exports nor traces); True insists on it (RuntimeError if mamba_ssm or CUDA tensors are missing);
    False always runs :func:`selective_scan_chunked` with ``chunk``.

    Args:
        u: input, (N, D, L).
        delta: step sizes before bias and softplus, (N, D, L).
        A: state matrix diagonal, (D, S), real.
        B: input projection, (N, S, L) or (N, G, S, L).
        C: output projection, same shape as B.
        D: skip weight, (D,).
        z: gate, (N, D, L).
        delta_bias: added to delta, (D,).
        delta_softplus: apply softplus to delta (after the bias).
        return_last_state: also return the last state (N, D, S).
        use_kernel: None (automatic), True (force the kernel) or False (force the chunked scan).
        chunk: chunk length of the chunked scan.

    Returns:
        out (N, D, L), and with ``return_last_state`` the last state (N, D, S).
    """
    if use_kernel is None:
        use_kernel = u.is_cuda and not _exporting() and kernel_available()
    if use_kernel:
        kernel = _load_kernel()
        if kernel is None:
            raise RuntimeError("selective_scan(use_kernel=True): mamba_ssm's selective-scan kernel is not "
                               "installed (pip install mamba-ssm); use use_kernel=None to fall back")
        if not u.is_cuda:
            raise RuntimeError("selective_scan(use_kernel=True): the mamba_ssm kernel needs CUDA tensors")
        return kernel(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus,
                      return_last_state=return_last_state)
    return selective_scan_chunked(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus,
                                  return_last_state=return_last_state, chunk=chunk)
