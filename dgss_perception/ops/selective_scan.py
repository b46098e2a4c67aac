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
  (D, S)), so the Mamba-2 trick of contracting C·Bᵀ over the state first does not apply: every
  (n, d, s) is its own scalar recurrence, and any intra-chunk decay-matrix form costs Q times the
  N·D·S·L states in memory traffic. Instead the sequence is cut into K chunks of Q steps laid out
  step-major, and the recurrence is stepped Q times over all chunks at once (one contiguous slice per
  step); the chunk-entry states come from a log-depth doubling scan over the K chunk ends; a second
  pass of Q steps from those states yields y, contracting each step's state with C. Decays are only
  ever exp of a non-positive number or products of such, so strong decays cannot overflow, and the
  operations are the reference's own multiply-adds, so the result matches it to rounding.
* :func:`selective_scan` picks mamba_ssm's fused CUDA kernel when it is installed, the tensors are on
  CUDA and nothing is being exported or traced, and the chunked form otherwise.

All arithmetic runs in float32 at least (float64 stays float64); the output has the dtype of u.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from typing import Callable, Optional, Tuple, Union

import torch
import torch.nn.functional as F

ScanOutput = Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]

# Largest chunk length Q of the chunked scan: Q steps per pass (two passes), each over all K = L/Q chunks, plus
# ⌈log₂ K⌉ doubling steps on (N, D, S, K) tensors. Measured on a 2-core CPU at MVFuser's size (D 512, S 16,
# L 2594), scan alone, single thread: 0.20 / 0.17 / 0.12 s for Q = 8 / 16 / 32; with 2 threads on a
# shared machine, fewer and larger operations win: the whole MVFuser forward over a ViT-L block on the
# same tokens ran 0.72 / 0.72 / 0.79 / 0.91 for Q = 4 / 8 / 16 / 32, and on a quiet machine 0.44 / 0.38 / 0.32 /
# 0.30 (scripts/bench_scan.py, BENCHMARKS.md): 8 holds up under load, where larger chunks lose.
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


def _prefix_scan(decay: torch.Tensor, x: torch.Tensor, dim: int) -> torch.Tensor:
    """All states of h_k = decay_k·h_{k−1} + x_k, h_{−1} = 0, along ``dim``, in ⌈log₂ n⌉ doubling steps.

    Step j adds to every position k ≥ 2^j the state 2^j positions back times the product of the decays in
    between, so after it every state sums the inputs of the last 2^(j+1) positions; the products are
    built the same way. Only products of decays ≤ 1 and sums are formed: nothing can overflow. Each step
    updates the tail of the sequence only, and the decay products are kept for the positions that still
    need them, so a step is two element-wise products and one concatenation.

    Args:
        decay: per-position decays (the first one is unused), any shape with n along ``dim``.
        x: inputs, same shape.
        dim: the scanned dimension.

    Returns:
        h, shape of x.
    """
    n = x.shape[dim]
    if n <= 1:
        return x
    # decay_span[i] is the product of the decays of the `offset` positions ending at k = offset + i.
    decay_span = decay.narrow(dim, 1, n - 1)
    offset = 1
    while offset < n:
        tail = torch.addcmul(x.narrow(dim, offset, n - offset), decay_span, x.narrow(dim, 0, n - offset))
        x = torch.cat([x.narrow(dim, 0, offset), tail], dim)
        if 2 * offset < n:
            decay_span = decay_span.narrow(dim, offset, n - 2 * offset) * decay_span.narrow(dim, 0, n - 2 * offset)
        offset *= 2
    return x


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

    Same function and arguments as :func:`selective_scan_reference`. The sequence is cut into K chunks
    of Q ≤ ``chunk`` steps (Q·K ≥ L; the tail is padded with Δ = 0, u = 0, which leaves the state
    unchanged), and every tensor is laid out step-major, (Q, N, G, K, D/G, S), so that step k of all
    chunks at once is one contiguous slice:

    1. the decays exp(Δ·A) and inputs Δ·u·B of all steps, each in one broadcast product;
    2. the states at the chunk ends, from a zero start: Q steps h ← a_k·h + x_k, each over all chunks;
    3. the states entering each chunk: the chunk-level recurrence (decay exp(A·ΣΔ) over the chunk) solved
       by :func:`_prefix_scan` in ⌈log₂ K⌉ steps;
    4. the Q steps again from the entering states, contracting each step's state with C by a matmul.

    About 3·Q + 3·⌈log₂ K⌉ + 20 operations in all, unrolled at trace time (so the exported graph is flat);
    every exponent is ≤ 0 (Δ ≥ 0, A ≤ 0), so no overflow is possible, and no decay matrix exists: the
    memory is two N·D·S·L tensors (decays and inputs) plus one chunk's states. The states are never
    stored whole; only the contracted y is.

    Args and returns as :func:`selective_scan_reference`, plus ``chunk``, the largest chunk length (≥ 1).
    """
    if chunk < 1:
        raise ValueError(f"selective_scan_chunked: chunk must be ≥ 1, got {chunk}")
    dtype = u.dtype
    u, delta, A, B, C = _prepare(u, delta, A, B, C, delta_bias, delta_softplus)
    batch, dim, length = u.shape
    groups, state = B.shape[1], A.shape[1]
    per_group = dim // groups
    if length == 0:
        out = _finish(u.new_zeros(batch, dim, 0), u, D, z, dtype)
        return (out, u.new_zeros(batch, dim, state)) if return_last_state else out
    n_chunks = -(-length // min(chunk, length))
    steps = -(-length // n_chunks)  # the smallest Q for that many chunks: the least padding
    pad = n_chunks * steps - length
    # Two stacks, so that padding and relayout are two operations instead of four.
    dd = torch.stack([delta, delta * u])  # (2, N, D, L): Δ and Δ·u
    bc = torch.stack([B, C])  # (2, N, G, S, L)
    if pad:
        dd = F.pad(dd, (0, pad))
        bc = F.pad(bc, (0, pad))
    # Step-major: (2, Q, N, G, K, D/G, 1) and (2, Q, N, G, K, S, 1).
    dd = dd.view(2, batch, groups, per_group, n_chunks, steps).permute(0, 5, 1, 2, 4, 3).unsqueeze(-1).contiguous()
    bc = bc.view(2, batch, groups, state, n_chunks, steps).permute(0, 5, 1, 2, 4, 3).unsqueeze(-1).contiguous()
    dt, dtu = dd[0], dd[1]  # (Q, N, G, K, D/G, 1)
    b_row, c_col = bc[0].transpose(-1, -2), bc[1]  # (Q, N, G, K, 1, S), (Q, N, G, K, S, 1)
    a_g = A.view(groups, 1, per_group, state)
    # In place: mul's backward does not need its output, and exp's needs only its own.
    decay = (dt * a_g).exp_()  # exp(Δ·A) ≤ 1, (Q, N, G, K, D/G, S)
    x = dtu * b_row  # Δ·u·B, same shape
    if n_chunks > 1:
        h = x[0]
        for k in range(1, steps):
            h = torch.addcmul(x[k], decay[k], h)  # (N, G, K, D/G, S): chunk-end states from a zero start
        chunk_decay = (dt.sum(0) * a_g).exp_()  # exp(A·Σ_chunk Δ): one chunk's total decay
        h_end = _prefix_scan(chunk_decay, h, dim=2)
        h = torch.cat([torch.zeros_like(h_end.narrow(2, 0, 1)), h_end.narrow(2, 0, n_chunks - 1)], 2)
    else:
        h = torch.zeros_like(x[0])
    ys = []
    for k in range(steps):
        h = torch.addcmul(x[k], decay[k], h)
        ys.append(torch.matmul(h, c_col[k]))  # C_t·h_t over the state: (N, G, K, D/G, 1)
    y = torch.stack(ys).squeeze(-1).permute(1, 2, 4, 3, 0).reshape(batch, dim, n_chunks * steps)[..., :length]
    out = _finish(y, u, D, z, dtype)
    if return_last_state:  # padded steps leave the state as it was, so the last chunk's end is the last state
        return out, h.select(2, n_chunks - 1).reshape(batch, dim, state)
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
