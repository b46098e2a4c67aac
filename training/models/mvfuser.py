"""MVFuser: the selective-scan token mixer that fuses the two backbones' tokens (and the text queries).

One MVFuser sits after every pair of backbone blocks (d_model 1024, input the concatenated token
sequences) and one inside the text enhancer (d_model 256, dt_rank 16). Its forward, on h (B, L, d_model):

1. in_proj (no bias) → split channels into x and z (d_model/2 each), channels-first.
2. x = SiLU(depthwise conv k=3, same padding, no bias); z likewise with its own conv.
3. x_proj(x) → dt (dt_rank), B (d_state), C (d_state); dt = dt_proj(dt) (with bias).
4. y = selective_scan(x, dt, A = −exp(A_log), B, C, D, delta_bias = dt_proj.bias, softplus) — one
   forward-direction scan over the whole sequence, on the path that fits (``selective_scan_fast``: the fused
   kernel on a GPU and in torch.export programs, the loop-free chunked scan on a CPU and in ONNX).
5. y = RMSNormGated(y, z) = rmsnorm(y)·w ⊙ SiLU(z).
6. out = Dropout(out_proj(y)) · scale (scale a learnable scalar, init 1e-3).

Two quirks of the trained checkpoints are reproduced on purpose, because the weights were learned with
them: the dt bias is added twice (once by dt_proj, once as the scan's delta_bias), and z passes SiLU twice
(after its conv, and again as the norm's gate). Parameter names follow the checkpoints (``in_proj``,
``conv1d_x``, ``conv1d_z``, ``x_proj``, ``dt_proj``, ``A_log``, ``D``, ``norm.weight``, ``out_proj``,
``scale``) so they load by name.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from dgss_perception.ops.selective_scan import DEFAULT_CHUNK
from dgss_perception.ops.selective_scan_triton import selective_scan_fast

# dt initialisation range of Mamba-family mixers: softplus(dt bias) starts log-uniform in [DT_MIN, DT_MAX],
# i.e. the state forgets over roughly 10 to 1000 steps at the start of training.
DT_MIN = 1e-3
DT_MAX = 1e-1
DT_INIT_FLOOR = 1e-4


class RMSNormGated(nn.Module):
    """RMS norm over the last dimension, then a SiLU gate (norm before gate): rmsnorm(y)·weight ⊙ SiLU(z).

    Computed in float32 at least (the statistic of a half-precision input would lose digits) and cast
    back to y's dtype.

    Args:
        dim: size of the normalised (last) dimension.
        eps: added to the mean square before the reciprocal square root.
    """

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Normalise y and gate it with z.

        Args:
            y: (..., dim).
            z: gate, same shape as y.

        Returns:
            (..., dim), in y's dtype.
        """
        dtype = y.dtype
        ctype = torch.promote_types(dtype, torch.float32)
        y = y.to(ctype)
        y = y * torch.rsqrt(y.square().mean(dim=-1, keepdim=True) + self.eps) * self.weight.to(ctype)
        return (y * F.silu(z.to(ctype))).to(dtype)


class MVFuser(nn.Module):
    """Selective-scan token mixer (MambaVision's mixer as modified by MFuser), (B, L, d_model) → same.

    Args:
        d_model: token width; the SSM runs on d_model/2 channels (the other half is the gate).
        d_state: SSM state size per channel.
        d_conv: depthwise convolution width (odd: the padding keeps the length, like 'same').
        dt_rank: rank of the Δ projection; None → ceil(d_model / 16).
        proj_drop: dropout after out_proj.
        scale_init: initial value of the learnable output scale (small, so a fresh block barely
            perturbs the residual stream it is added to).
        chunk: chunk length of the chunked selective scan (CPU, ONNX and TorchScript path).
    """

    def __init__(
        self,
        d_model: int = 1024,
        d_state: int = 16,
        d_conv: int = 3,
        dt_rank: Optional[int] = None,
        proj_drop: float = 0.1,
        scale_init: float = 1e-3,
        chunk: int = DEFAULT_CHUNK,
    ) -> None:
        super().__init__()
        if d_model % 2:
            raise ValueError(f"MVFuser: d_model must be even (split into x and z), got {d_model}")
        if d_conv % 2 == 0:
            raise ValueError(f"MVFuser: d_conv must be odd for length-preserving padding, got {d_conv}")
        self.d_model = d_model
        self.d_state = d_state
        self.d_inner = d_model // 2  # SSM channels (expand 1, then split in half)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank is None else dt_rank
        self.chunk = chunk
        inner = self.d_inner

        self.in_proj = nn.Linear(d_model, d_model, bias=False)
        # Explicit symmetric padding instead of padding='same': identical for odd kernels, and exports cleanly.
        self.conv1d_x = nn.Conv1d(inner, inner, d_conv, padding=d_conv // 2, groups=inner, bias=False)
        self.conv1d_z = nn.Conv1d(inner, inner, d_conv, padding=d_conv // 2, groups=inner, bias=False)
        self.x_proj = nn.Linear(inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, inner, bias=True)
        # S4D-real init: A[d, s] = −(s + 1), stored as its log so A stays negative under training.
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(inner, 1))
        self.D = nn.Parameter(torch.ones(inner))
        self.norm = RMSNormGated(inner, eps=1e-5)
        self.out_proj = nn.Linear(inner, d_model, bias=False)
        self.proj_drop = nn.Dropout(proj_drop)
        self.scale = nn.Parameter(torch.tensor(float(scale_init)))
        self.reset_dt_parameters()

    @torch.no_grad()
    def reset_dt_parameters(self) -> None:
        """Mamba's Δ-projection init: weight U(±dt_rank^−½), bias = softplus⁻¹(dt), dt log-uniform in [1e-3, 1e-1].

        Kept apart from __init__ so a caller that re-initialises every Linear (the text enhancer's
        trunc-normal pass) can decide whether to restore it.
        """
        std = self.dt_rank ** -0.5
        nn.init.uniform_(self.dt_proj.weight, -std, std)
        log_dt = torch.rand(self.d_inner) * (math.log(DT_MAX) - math.log(DT_MIN)) + math.log(DT_MIN)
        dt = log_dt.exp().clamp(min=DT_INIT_FLOOR)
        # softplus⁻¹(dt) = log(expm1(dt)) = dt + log(1 − exp(−dt)), the second form stable for small dt.
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Mix the tokens of h.

        Args:
            h: (B, L, d_model).

        Returns:
            (B, L, d_model).
        """
        xz = self.in_proj(h).transpose(1, 2)  # (B, d_model, L): channels-first for the convs and the scan
        x, z = xz.chunk(2, dim=1)  # (B, d_inner, L) each
        x = F.silu(self.conv1d_x(x))
        z = F.silu(self.conv1d_z(z))
        x_dbl = self.x_proj(x.transpose(1, 2))  # (B, L, dt_rank + 2·d_state)
        dt, b, c = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = self.dt_proj(dt).transpose(1, 2)  # (B, d_inner, L); already includes dt_proj.bias
        b = b.transpose(1, 2)  # (B, d_state, L)
        c = c.transpose(1, 2)
        a = -torch.exp(self.A_log)
        # Quirk kept for checkpoint fidelity: dt_proj.bias is passed again as delta_bias, so it is added twice.
        y = selective_scan_fast(x, dt, a, b, c, D=self.D, z=None, delta_bias=self.dt_proj.bias,
                                delta_softplus=True, chunk=self.chunk)
        # Quirk kept for checkpoint fidelity: z already went through SiLU, and the gated norm applies SiLU again.
        y = self.norm(y.transpose(1, 2), z.transpose(1, 2))  # (B, L, d_inner)
        return self.proj_drop(self.out_proj(y)) * self.scale
