"""The selective-scan Triton kernels compile for NVIDIA GPUs, on a machine without one.

Triton's interpreter (which the kernel-equality tests run) accepts code that its GPU compiler refuses,
and says nothing of registers: a kernel can pass every CPU test and still fail to build, or spill its
state to local memory, on the car's GPU. Here each kernel is compiled to a cubin — Triton's own
front end, LLVM and the ptxas it ships, no driver involved — with the very arguments its launcher passes
(captured, not written out again), for the GPUs the runtime targets: sm_80 (A100), sm_87 (Jetson AGX
Orin) and sm_90 (H100/H200). The cubin's resource usage (``cuobjdump --dump-resource-usage``) must show
no local memory, i.e. no spilled registers or stack arrays.
"""

from __future__ import annotations

import inspect
import os
import re
import subprocess
from typing import Any, Callable, Dict, List, Optional, Tuple

import pytest
import torch

triton = pytest.importorskip("triton")
pytest.importorskip("triton.backends.nvidia")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from dgss_perception.ops import selective_scan_triton as kernels  # noqa: E402

# sm_80 A100, sm_87 Jetson AGX Orin, sm_90 H100 / H200.
ARCHS = (80, 87, 90)
DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


class LaunchCapture:
    """Stands for a Triton kernel in a launcher: ``kernel[grid](*args, **meta)`` records the call, runs nothing."""

    def __init__(self) -> None:
        self.calls: List[Tuple[Any, Tuple[Any, ...], Dict[str, Any]]] = []

    def __getitem__(self, grid: Any) -> Callable[..., None]:
        def launch(*args: Any, **meta: Any) -> None:
            self.calls.append((grid, args, meta))
        return launch


def compile_launch(body: Callable[..., Any], jit: Any, args: Tuple[Any, ...], meta: Dict[str, Any],
                   arch: int) -> Any:
    """Compile ``jit`` for sm_``arch`` with a launch's arguments: tensors as typed pointers, ints as i32/i64.

    The keyword arguments are the kernel's constexprs, except ``num_warps`` (a compile option).
    """
    names = list(inspect.signature(body).parameters)
    meta = dict(meta)
    warps = meta.pop("num_warps")
    signature: Dict[str, str] = {}
    constexprs: Dict[Tuple[int, ...], Any] = {}
    for name, value in zip(names, args):
        if isinstance(value, torch.Tensor):
            signature[name] = "*" + DTYPES[value.dtype]
        else:
            signature[name] = "i32" if -2 ** 31 <= int(value) < 2 ** 31 else "i64"
    for name, value in meta.items():
        signature[name] = "constexpr"
        constexprs[(names.index(name),)] = value
    assert len(signature) == len(names), "every kernel parameter gets an argument"
    source = ASTSource(fn=jit, signature=signature, constexprs=constexprs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps})


def resource_usage(cubin: bytes, tmp_path: Any) -> Dict[str, int]:
    """The kernel's REG, STACK, SHARED and LOCAL bytes as ``cuobjdump`` reports them from the cubin."""
    import triton.backends.nvidia as nvidia

    tool = os.path.join(os.path.dirname(nvidia.__file__), "bin", "cuobjdump")
    if not os.path.exists(tool):
        pytest.skip("this Triton ships no cuobjdump")
    path = tmp_path / "kernel.cubin"
    path.write_bytes(cubin)
    report = subprocess.run([tool, "--dump-resource-usage", str(path)], capture_output=True, text=True,
                            check=True).stdout
    line = next(row for row in report.splitlines() if "REG:" in row)
    return {key: int(value) for key, value in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", line)}


def operands(dim: int, length: int, state: int, *, batch: int = 1, groups: int = 0,
             dtype: torch.dtype = torch.float32) -> Dict[str, torch.Tensor]:
    """Scan operands of the given shapes (values do not matter: nothing runs)."""
    bc = (batch, state, length) if groups == 0 else (batch, groups, state, length)
    return {"u": torch.zeros(batch, dim, length, dtype=dtype), "delta": torch.zeros(batch, dim, length, dtype=dtype),
            "z": torch.zeros(batch, dim, length, dtype=dtype), "B": torch.zeros(bc, dtype=dtype),
            "C": torch.zeros(bc, dtype=dtype), "A": torch.zeros(dim, state), "D": torch.zeros(dim),
            "delta_bias": torch.zeros(dim)}


def forward_launch(t: Dict[str, torch.Tensor], *, options: bool, softplus: bool) -> Tuple[Tuple[Any, ...], Dict]:
    """The forward launcher's call for these operands (D, z, delta_bias present when ``options``)."""
    capture = LaunchCapture()
    out, last = kernels._empty_outputs(t["u"], t["A"])
    pick = (lambda k: t[k] if options else None)  # noqa: E731
    kernels._launch(capture, t["u"], t["delta"], t["A"], t["B"], t["C"], pick("D"), pick("z"), pick("delta_bias"),
                    softplus, out, last)
    (_, args, meta), = capture.calls
    return args, meta


def backward_launch(t: Dict[str, torch.Tensor], *, options: bool, grad_last: bool) -> Tuple[Tuple[Any, ...], Dict]:
    """The backward launcher's call for these operands (and a last-state gradient when ``grad_last``)."""
    capture = LaunchCapture()
    pick = (lambda k: t[k] if options else None)  # noqa: E731
    batch, dim, _ = t["u"].shape
    glast: Optional[torch.Tensor] = torch.zeros(batch, dim, t["A"].shape[1]) if grad_last else None
    kernels._launch_bwd(capture, t["u"], t["delta"], t["A"], t["B"], t["C"], pick("D"), pick("z"), pick("delta_bias"),
                        torch.zeros_like(t["u"]), glast, True, kernels.BWD_CHUNK)
    (_, args, meta), = capture.calls
    return args, meta


# MVFuser's scan at the official size (d_inner 512, 2594 tokens, 16 states: 4 channels per program) in the
# precisions the runtime runs, with every option and with none; a grouped, odd-sized case (8 channels per
# program, S not a power of two) and a batch that takes 16 channels per program.
FORWARD_CASES = {
    "mvfuser_fp32": (dict(dim=512, length=2594, state=16), True, True),
    "mvfuser_bf16": (dict(dim=512, length=2594, state=16, dtype=torch.bfloat16), True, True),
    "mvfuser_fp16_plain": (dict(dim=512, length=2594, state=16, dtype=torch.float16), False, False),
    "grouped_odd_bf16": (dict(dim=1000, length=77, state=12, batch=4, groups=4, dtype=torch.bfloat16), True, True),
    "batch8_fp32": (dict(dim=512, length=300, state=16, batch=8), True, True),
}
BACKWARD_CASES = {
    "mvfuser_fp32": (dict(dim=512, length=2594, state=16), True, False),
    "mvfuser_bf16_grad_last": (dict(dim=512, length=2594, state=16, dtype=torch.bfloat16), True, True),
    "grouped_plain_fp16": (dict(dim=1000, length=77, state=12, batch=4, groups=4, dtype=torch.float16), False, True),
    "batch8_fp32": (dict(dim=512, length=300, state=16, batch=8), True, False),
}


def test_launch_capture_sees_the_launchers_choices() -> None:
    """The captured calls carry the launchers' block sizes, so the compiled variants are the ones that run."""
    args, meta = forward_launch(operands(512, 2594, 16), options=True, softplus=True)
    assert meta["BLOCK_D"] == kernels.block_d(1, 512) == 4 and meta["BLOCK_S"] == 16
    assert meta["HAS_D"] and meta["HAS_Z"] and meta["HAS_BIAS"] and meta["SOFTPLUS"]
    assert len(args) == len(inspect.signature(kernels._scan_fwd_body).parameters) - len(meta) + 1
    args, meta = backward_launch(operands(512, 300, 16, batch=8), options=False, grad_last=True)
    assert meta["BLOCK_D"] == 16 and meta["CHUNK"] == kernels.BWD_CHUNK and meta["HAS_GLAST"]
    assert not (meta["HAS_D"] or meta["HAS_Z"] or meta["HAS_BIAS"])


# Every case of both kernels, named by kernel: (forward|backward, case).
LAUNCHES = [("forward", c) for c in sorted(FORWARD_CASES)] + [("backward", c) for c in sorted(BACKWARD_CASES)]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kernel,case", LAUNCHES)
def test_kernel_compiles_without_spills(kernel: str, case: str, arch: int, tmp_path: Any) -> None:
    """ptxas makes a cubin of the launch for sm_``arch`` with no local memory or stack and at most 255 registers."""
    if kernel == "forward":
        shape, options, softplus = FORWARD_CASES[case]
        args, meta = forward_launch(operands(**shape), options=options, softplus=softplus)
        compiled = compile_launch(kernels._scan_fwd_body, kernels._scan_fwd_kernel, args, meta, arch)
    else:
        shape, options, grad_last = BACKWARD_CASES[case]
        args, meta = backward_launch(operands(**shape), options=options, grad_last=grad_last)
        compiled = compile_launch(kernels._scan_bwd_body, kernels._scan_bwd_kernel, args, meta, arch)
    assert compiled.asm["cubin"], "ptxas produced a cubin"
    use = resource_usage(compiled.asm["cubin"], tmp_path)
    assert use["LOCAL"] == 0 and use["STACK"] == 0, f"{kernel} {case} on sm_{arch} spills: {use}"
    assert use["REG"] <= 255
