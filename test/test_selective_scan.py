"""Selective scan: the chunked form against the sequential reference, stability, ONNX export, and the kernel.

Tolerances, as max|got − ref| ≤ tol · max|ref| per tensor:
* float64: 1e-10 (outputs, last state and all gradients) — the two forms are the same function.
* float32: 1e-5 (outputs and gradients w.r.t. u, delta, A, B, C, D, z, delta_bias; observed ≤ 1e-6), also
  under strong decays (Δ·|A| up to 50 per step).
* bfloat16 inputs (compute stays float32, the output is rounded to bfloat16): 1e-2 against the reference
  run on the same bfloat16 inputs (one bfloat16 rounding of the output, 2⁻⁸ relative), 5e-2 against the
  float32 reference on the unrounded inputs.
* ONNX Runtime and TorchScript against eager: 1e-4 / 1e-6.
"""

from __future__ import annotations

import sys
import warnings
from typing import Dict, Optional

import pytest
import torch
from torch import nn

from onnxutil import op_types
from dgss_perception.ops.selective_scan import (
    DEFAULT_CHUNK,
    kernel_available,
    selective_scan,
    selective_scan_chunked,
    selective_scan_reference,
)


def _inputs(batch: int = 2, dim: int = 4, state: int = 3, length: int = 64, groups: Optional[int] = None,
            dtype: torch.dtype = torch.float32, seed: int = 0) -> Dict[str, torch.Tensor]:
    """Random scan arguments, MVFuser-like: A = −(1..S) scaled per channel, delta around softplus' knee."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)

    bc_shape = (batch, state, length) if groups is None else (batch, groups, state, length)
    scale = 0.5 + torch.rand(dim, 1, generator=gen, dtype=torch.float64)
    a = -torch.arange(1, state + 1, dtype=torch.float64) * scale
    return {
        "u": randn(batch, dim, length),
        "delta": randn(batch, dim, length) * 0.5 - 1.0,
        "A": a.to(dtype),
        "B": randn(*bc_shape),
        "C": randn(*bc_shape),
        "D": randn(dim),
        "z": randn(batch, dim, length),
        "delta_bias": randn(dim) * 0.1,
    }


def _rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max|got − ref| / max|ref|, in float64."""
    got, ref = got.detach().double(), ref.detach().double()
    return float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


@pytest.mark.parametrize("length, chunk", [(64, 16), (64, 32), (100, 16), (100, 32), (7, 16), (1, 16), (300, 4),
                                           (64, DEFAULT_CHUNK), (65, DEFAULT_CHUNK), (129, DEFAULT_CHUNK),
                                           (37, 1), (200, 200), (5, 64)])
@pytest.mark.parametrize("groups", [None, 2])
def test_chunked_matches_reference_float64(length: int, chunk: int, groups: Optional[int]) -> None:
    args = _inputs(length=length, groups=groups, dtype=torch.float64)
    ref, ref_state = selective_scan_reference(**args, delta_softplus=True, return_last_state=True)
    got, got_state = selective_scan_chunked(**args, delta_softplus=True, return_last_state=True, chunk=chunk)
    assert got.dtype == torch.float64 and got.shape == ref.shape
    assert _rel_err(got, ref) < 1e-10
    assert _rel_err(got_state, ref_state) < 1e-10


@pytest.mark.parametrize("length, chunk", [(64, 16), (100, 16), (100, 32), (7, 16)])
@pytest.mark.parametrize("optional", ["all", "none", "no_z", "bias_only"])
def test_chunked_matches_reference_float32_with_gradients(length: int, chunk: int, optional: str) -> None:
    args = _inputs(length=length)
    softplus = optional != "none"
    if optional == "none":
        args.update(D=None, z=None, delta_bias=None)
        args["delta"] = args["delta"].abs()  # a raw Δ must be positive
    elif optional == "no_z":
        args["z"] = None
    elif optional == "bias_only":
        args.update(D=None, z=None)
    leaves = {k: v for k, v in args.items() if v is not None}
    upstream = torch.randn(2, 4, length, generator=torch.Generator().manual_seed(1))
    results = {}
    for name, fn in (("ref", selective_scan_reference), ("chunked", selective_scan_chunked)):
        inputs = {k: v.clone().requires_grad_(True) for k, v in leaves.items()}
        kwargs = {"chunk": chunk} if name == "chunked" else {}
        out = fn(**{**args, **inputs}, delta_softplus=softplus, **kwargs)
        out.backward(upstream)
        results[name] = (out.detach(), {k: v.grad for k, v in inputs.items()})
    (ref, ref_grads), (got, got_grads) = results["ref"], results["chunked"]
    assert _rel_err(got, ref) < 1e-5
    assert set(got_grads) == set(ref_grads) >= {"u", "delta", "A", "B", "C"}
    for key in ref_grads:
        assert torch.isfinite(got_grads[key]).all(), key
        assert _rel_err(got_grads[key], ref_grads[key]) < 1e-5, key


def test_default_chunk_and_grouped_gradients() -> None:
    args = _inputs(dim=6, length=3 * DEFAULT_CHUNK + 5, groups=3)
    ref_in = {k: v.clone().requires_grad_(True) for k, v in args.items()}
    got_in = {k: v.clone().requires_grad_(True) for k, v in args.items()}
    ref = selective_scan_reference(**ref_in, delta_softplus=True)
    got = selective_scan_chunked(**got_in, delta_softplus=True)
    assert _rel_err(got, ref) < 1e-5
    ref.square().sum().backward()
    got.square().sum().backward()
    for key in args:
        assert _rel_err(got_in[key].grad, ref_in[key].grad) < 1e-5, key


def test_bfloat16_inputs() -> None:
    args32 = _inputs(length=100)
    # As in the model: activations in bfloat16, parameters (A, D, delta_bias) in float32.
    args16 = {k: v.to(torch.bfloat16) if k in ("u", "delta", "B", "C", "z") else v for k, v in args32.items()}
    got, state = selective_scan_chunked(**args16, delta_softplus=True, return_last_state=True, chunk=16)
    assert got.dtype == torch.bfloat16 and state.dtype == torch.float32
    same_inputs = selective_scan_reference(**args16, delta_softplus=True)
    assert same_inputs.dtype == torch.bfloat16
    assert _rel_err(got, same_inputs) < 1e-2
    assert _rel_err(got, selective_scan_reference(**args32, delta_softplus=True)) < 5e-2


@pytest.mark.parametrize("chunk", [DEFAULT_CHUNK, 64])
def test_long_sequence_strong_decay_stays_finite(chunk: int) -> None:
    args = _inputs(batch=1, dim=4, state=4, length=512, seed=3)
    gen = torch.Generator().manual_seed(4)
    # Δ up to 5 with A down to −10 (log-decays to −50 per step, −25600 over the sequence), mixed with
    # tiny steps, so chunks hold both near-1 and underflowing decays next to each other.
    delta = torch.rand(1, 4, 512, generator=gen) * 5.0
    delta = torch.where(torch.rand(1, 4, 512, generator=gen) < 0.5, delta, delta * 1e-3)
    args.update(delta=delta, A=-10.0 * torch.rand(4, 4, generator=gen) - 1e-2, delta_bias=None)
    leaves = {k: v.clone().requires_grad_(True) for k, v in args.items() if v is not None}
    got = selective_scan_chunked(**{**args, **leaves}, chunk=chunk)
    got.sum().backward()
    assert torch.isfinite(got).all()
    for key, value in leaves.items():
        assert torch.isfinite(value.grad).all(), key
    with torch.no_grad():
        ref = selective_scan_reference(**args)
    assert _rel_err(got.detach(), ref) < 1e-4


@pytest.mark.parametrize("length, chunk, groups", [(96, DEFAULT_CHUNK, None), (101, DEFAULT_CHUNK, 2), (101, 16, None)])
def test_strong_decay_gradients_match_reference(length: int, chunk: int, groups: Optional[int]) -> None:
    """Δ·|A| up to 50 per step next to near-1 decays: outputs and every gradient as the reference's, in float32."""
    args = _inputs(batch=1, dim=4, state=4, length=length, groups=groups, seed=6)
    gen = torch.Generator().manual_seed(7)
    delta = torch.rand(1, 4, length, generator=gen) * 5.0
    args["delta"] = torch.where(torch.rand(1, 4, length, generator=gen) < 0.5, delta, delta * 1e-3)
    args.update(A=-10.0 * torch.rand(4, 4, generator=gen) - 1e-2, delta_bias=None)
    upstream = torch.randn(1, 4, length, generator=gen)
    results = {}
    runs = (("ref", selective_scan_reference, {}), ("chunked", selective_scan_chunked, {"chunk": chunk}))
    for name, fn, kwargs in runs:
        leaves = {k: v.clone().requires_grad_(True) for k, v in args.items() if v is not None}
        out, last = fn(**{**args, **leaves}, return_last_state=True, **kwargs)
        (out * upstream).sum().backward()
        results[name] = (out.detach(), last.detach(), {k: v.grad for k, v in leaves.items()})
    (ref, ref_last, ref_grads), (got, got_last, got_grads) = results["ref"], results["chunked"]
    assert _rel_err(got, ref) < 1e-5
    assert _rel_err(got_last, ref_last) < 1e-5
    for key in ref_grads:
        assert torch.isfinite(got_grads[key]).all(), key
        assert _rel_err(got_grads[key], ref_grads[key]) < 1e-5, key


def test_empty_sequence() -> None:
    args = _inputs(length=0)
    out, last = selective_scan_chunked(**args, delta_softplus=True, return_last_state=True)
    assert out.shape == (2, 4, 0) and torch.equal(last, torch.zeros(2, 4, 3))


def test_bad_chunk_is_refused() -> None:
    with pytest.raises(ValueError, match="chunk"):
        selective_scan_chunked(**_inputs(length=8), chunk=0)


def test_dispatch_falls_back_on_cpu() -> None:
    args = _inputs(length=40)
    out = selective_scan(**args, delta_softplus=True)
    assert torch.equal(out, selective_scan_chunked(**args, delta_softplus=True))
    if not kernel_available():
        with pytest.raises(RuntimeError, match="not installed"):
            selective_scan(**args, use_kernel=True)
    with pytest.raises(RuntimeError):  # the kernel needs CUDA tensors either way
        selective_scan(**args, use_kernel=True)


class _ScanModule(nn.Module):
    """A minimal MVFuser-like SSM core: parameters A_log, D and the Δ bias around the chunked scan."""

    def __init__(self, dim: int, state: int, chunk: int) -> None:
        super().__init__()
        self.A_log = nn.Parameter(torch.log(torch.arange(1, state + 1, dtype=torch.float32)).repeat(dim, 1))
        self.D = nn.Parameter(torch.ones(dim))
        self.delta_bias = nn.Parameter(torch.linspace(-2.0, 0.5, dim))
        self.chunk = chunk

    def forward(self, u: torch.Tensor, delta: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                z: torch.Tensor) -> torch.Tensor:
        return selective_scan_chunked(u, delta, -torch.exp(self.A_log), B, C, D=self.D, z=z,
                                      delta_bias=self.delta_bias, delta_softplus=True, chunk=self.chunk)


@pytest.mark.parametrize("groups", [None, 2])
def test_onnx_export_has_no_loops_and_matches_eager(groups: Optional[int]) -> None:
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    module = _ScanModule(dim=8, state=4, chunk=8).eval()
    args = _inputs(dim=8, state=4, length=100, groups=groups, seed=5)
    example = (args["u"], args["delta"], args["B"], args["C"], args["z"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module, example, dynamo=True, opset_version=18,
                                    input_names=["u", "delta", "B", "C", "z"], output_names=["y"])
    model = program.model_proto
    onnx.checker.check_model(model)
    ops = op_types(model)
    assert not ops & {"Loop", "Scan"}, sorted(ops)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {name: t.numpy() for name, t in zip(["u", "delta", "B", "C", "z"], example)})
    with torch.no_grad():
        eager = module(*example)
    assert _rel_err(torch.from_numpy(got), eager) < 1e-4


def test_torchscript_trace_has_no_loops_and_matches_eager() -> None:
    """A trace (shapes fixed) reruns on other inputs of the same shapes, as eager does."""
    module = _ScanModule(dim=8, state=4, chunk=DEFAULT_CHUNK).eval()
    names = ["u", "delta", "B", "C", "z"]
    traced_on = _inputs(dim=8, state=4, length=61, groups=2, seed=8)
    run_on = _inputs(dim=8, state=4, length=61, groups=2, seed=9)
    with torch.no_grad():
        traced = torch.jit.trace(module, tuple(traced_on[n] for n in names), check_trace=False)
        got = traced(*(run_on[n] for n in names))
        eager = module(*(run_on[n] for n in names))
    kinds = {node.kind() for node in traced.inlined_graph.nodes()}
    assert not kinds & {"prim::Loop", "prim::If"}, sorted(kinds)
    assert _rel_err(got, eager) < 1e-6


def test_dispatch_matches_mamba_ssm_kernel() -> None:
    pytest.importorskip("mamba_ssm")
    if not torch.cuda.is_available():
        pytest.skip("mamba_ssm's kernel needs CUDA")
    assert kernel_available()
    args = {k: v.cuda() for k, v in _inputs(dim=16, state=8, length=300, groups=2).items()}
    kernel_out = selective_scan(**args, delta_softplus=True, use_kernel=None)  # auto: the kernel on CUDA
    chunked = selective_scan_chunked(**args, delta_softplus=True)
    reference = selective_scan_reference(**args, delta_softplus=True)
    assert _rel_err(chunked, reference) < 1e-4
    assert _rel_err(kernel_out, reference) < 1e-3  # the kernel's own float32 summation order
    assert _rel_err(chunked, kernel_out) < 1e-3


def _fake_mamba(monkeypatch: pytest.MonkeyPatch, interface: object) -> None:
    """``mamba_ssm`` in sys.modules as an installed package whose selective_scan_interface is ``interface``."""
    import types

    package, ops = types.ModuleType("mamba_ssm"), types.ModuleType("mamba_ssm.ops")
    package.__path__, ops.__path__ = [], []  # packages, so their submodules resolve from sys.modules
    package.ops, ops.selective_scan_interface = ops, interface
    monkeypatch.setitem(sys.modules, "mamba_ssm", package)
    monkeypatch.setitem(sys.modules, "mamba_ssm.ops", ops)
    monkeypatch.setitem(sys.modules, "mamba_ssm.ops.selective_scan_interface", interface)


@pytest.fixture()
def fresh_loader():
    """The kernel loader without its cached answer, before and after the test."""
    from dgss_perception.ops import selective_scan as module

    module._load_kernel.cache_clear()
    yield module
    module._load_kernel.cache_clear()


def test_absent_mamba_ssm_falls_back_silently(fresh_loader, monkeypatch, caplog) -> None:
    monkeypatch.setitem(sys.modules, "mamba_ssm", None)  # the import system's "not installed"
    with caplog.at_level("WARNING"):
        assert not fresh_loader.kernel_available()
    assert not caplog.records
    args = _inputs(length=20)
    assert _rel_err(selective_scan(**args, delta_softplus=True),
                    selective_scan_reference(**args, delta_softplus=True)) < 1e-4


def test_broken_mamba_ssm_is_logged_with_its_reason(fresh_loader, monkeypatch, caplog) -> None:
    """An installed mamba_ssm whose CUDA extension cannot load: a warning naming why, then the chunked scan."""
    import types

    class BrokenExtension(types.ModuleType):
        def __getattr__(self, name: str) -> object:
            raise OSError("libcudart.so.11.0: cannot open shared object file")

    _fake_mamba(monkeypatch, BrokenExtension("mamba_ssm.ops.selective_scan_interface"))
    with caplog.at_level("WARNING", logger="dgss_perception.ops.selective_scan"):
        assert not fresh_loader.kernel_available()
    (record,) = caplog.records
    assert "OSError" in record.getMessage() and "libcudart.so.11.0" in record.getMessage()
    assert "pure-PyTorch" in record.getMessage()
    args = _inputs(length=20)
    assert _rel_err(selective_scan(**args, delta_softplus=True),
                    selective_scan_reference(**args, delta_softplus=True)) < 1e-4


def test_mamba_ssm_missing_a_dependency_is_logged_too(fresh_loader, monkeypatch, caplog) -> None:
    """A ModuleNotFoundError for something else than mamba_ssm itself is a broken install, not an absent one."""
    import types

    class MissingDependency(types.ModuleType):
        def __getattr__(self, name: str) -> object:
            raise ModuleNotFoundError("No module named 'causal_conv1d'", name="causal_conv1d")

    _fake_mamba(monkeypatch, MissingDependency("mamba_ssm.ops.selective_scan_interface"))
    with caplog.at_level("WARNING", logger="dgss_perception.ops.selective_scan"):
        assert not fresh_loader.kernel_available()
    assert len(caplog.records) == 1 and "causal_conv1d" in caplog.records[0].getMessage()


def test_a_working_mamba_ssm_is_taken(fresh_loader, monkeypatch, caplog) -> None:
    import types

    interface = types.ModuleType("mamba_ssm.ops.selective_scan_interface")
    interface.selective_scan_fn = lambda *args, **kwargs: "kernel"
    _fake_mamba(monkeypatch, interface)
    with caplog.at_level("WARNING"):
        assert fresh_loader._load_kernel() is interface.selective_scan_fn
    assert not caplog.records
