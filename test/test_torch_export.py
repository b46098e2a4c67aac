"""The torch.export path: ``.pt2`` programs in the package and the ``pt2`` backend that runs them.

Every mode's graphs (whole, resize-in-graph, batch, coarse-to-fine, slide windows, slide-in-graph) of every
family are exported as programs, parity-checked under their own key and checksummed by the card; the
backend moves a program to its device (no device of the export left in it), runs it eagerly, through
``torch.compile`` or AOTInductor, and gives the labels of the TorchScript graph of the same package.

Tolerance on the CPU in fp32: labels agree on ≥ 99.9% of pixels and the confidence within 1e-4 (eager
programs run TorchScript's operators; inductor's kernels may sum in another order). Compiling on two CPU
cores took 20 s (VFMNet's whole graph), 63 s (Rein's window graph), 81 s (DepthForge's) and 112 s (MFuser's)
(2, 2.5–3.5 and 4.5–10.5 min when those programs compiled in 7 to 12 pieces and MFuser's scan was compiled
rather than called), so the compiled runs take one graph per family and all but VFMNet's are ``slow``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from conftest import (TINY_C2F_CONFIG, TINY_CONFIG, TINY_REIN_CONFIG, edited_copy, make_tiny_depthforge_weights,
                      make_tiny_mfuser_weights, make_tiny_weights)
from dgss_perception.backends import BackendError
from dgss_perception.card import CardError, load_card, sha256_file
from dgss_perception.engine import Segmenter
from dgss_perception.torch_export import (AOTI_PACKAGE, CACHE_ENV, TorchExportBackend, autocast_program,
                                          device_literals, drop_dead_code, dynamic_dims, load_program,
                                          place_program, read_program, strip_metadata_asserts, torch_cache_dir)
from training.export import export_package, parse_formats

MIN_AGREEMENT = 0.999
CONFIDENCE_ATOL = 1e-4
BF16_GPU_AGREEMENT = 0.98
FORMATS = ("torchscript", "pt2")

SLIDE_CONFIG = {
    **TINY_CONFIG,
    "name": "tiny_slide_pt2_test",
    "model": {**TINY_CONFIG["model"], "img_size": [56, 56]},
    "inference": {"mode": "slide", "test_size": [112, 150], "window": 56, "stride": 37},
}


def _export(factory: pytest.TempPathFactory, name: str, make, **kwargs) -> Path:
    """A package of TorchScript graphs and programs (``kwargs`` as export_package's), weights beside it."""
    work = factory.mktemp(name)
    cfg = make(work / "weights.safetensors")
    export_package(cfg, work / "weights.safetensors", work / "package", parity_seed=0,
                   **{"formats": FORMATS, **kwargs})
    return work / "package"


@pytest.fixture(scope="module")
def whole_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny VFMNet as one whole graph, in all three formats."""
    return _export(tmp_path_factory, "pt2_whole", make_tiny_weights, formats=("onnx", "torchscript", "pt2"))


@pytest.fixture(scope="module")
def resize_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _export(tmp_path_factory, "pt2_resize", make_tiny_weights, resize_in_graph=True)


@pytest.fixture(scope="module")
def batch_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _export(tmp_path_factory, "pt2_batch", make_tiny_weights, batch=2)


@pytest.fixture(scope="module")
def c2f_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _export(tmp_path_factory, "pt2_c2f",
                   lambda p: make_tiny_weights(p, seed=3, config=TINY_C2F_CONFIG, sharpen=20.0))


@pytest.fixture(scope="module")
def slide_in_graph_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _export(tmp_path_factory, "pt2_slide_in_graph",
                   lambda p: make_tiny_weights(p, seed=5, config=SLIDE_CONFIG, sharpen=30.0),
                   mode="slide", slide_in_graph=True, window_batch=5)


@pytest.fixture(scope="module")
def mfuser_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _export(tmp_path_factory, "pt2_mfuser", make_tiny_mfuser_weights)


@pytest.fixture(scope="module")
def depthforge_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _export(tmp_path_factory, "pt2_depthforge", make_tiny_depthforge_weights)


@pytest.fixture(scope="module")
def rein_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Seed 4: seeds 0 to 2 give a random Rein that labels these frames with one class, which would test nothing.
    return _export(tmp_path_factory, "pt2_rein",
                   lambda p: make_tiny_depthforge_weights(p, seed=4, config=TINY_REIN_CONFIG))


# Every mode of every family; the first of each family is its smallest graph (the compiled runs take those).
PACKAGES = ("whole_dir", "resize_dir", "batch_dir", "c2f_dir", "slide_in_graph_dir", "mfuser_dir",
            "depthforge_dir", "rein_dir")
FAMILY_PACKAGES = ("whole_dir", "mfuser_dir", "depthforge_dir", "rein_dir")


@pytest.fixture(autouse=True)
def torch_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Compiled programs go to a directory of this test session, not the user's cache."""
    base = tmp_path_factory.getbasetemp() / "torch_cache"
    monkeypatch.setenv(CACHE_ENV, str(base))
    return base


def frame(shape: tuple[int, int], seed: int) -> np.ndarray:
    """Smooth colour blobs with noise, so labels vary over the frame."""
    rng = np.random.default_rng(seed)
    small = torch.from_numpy(rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)).permute(2, 0, 1)[None].float()
    big = torch.nn.functional.interpolate(small, size=shape, mode="bilinear", align_corners=False)[0]
    return np.clip(big.permute(1, 2, 0).numpy() + rng.normal(0, 10, (*shape, 3)), 0, 255).astype(np.uint8)


def package_frame(package: Path, seed: int = 1) -> np.ndarray:
    """A frame of the package's working size (a slide package cuts its windows from exactly that)."""
    card = load_card(package)
    return frame((card.input_height, card.input_width), seed)


def assert_same(got, want, min_agreement: float = MIN_AGREEMENT, atol: float | None = CONFIDENCE_ATOL,
                varied: bool = True) -> None:
    """Labels agree on ``min_agreement`` of pixels and the confidence within ``atol`` (None: not compared).

    ``varied``: ``want`` holds two labels at least (else the caller checks that over several frames).
    """
    assert got.labels.shape == want.labels.shape
    assert not varied or len(np.unique(want.labels)) >= 2, "a constant label map would let wrong outputs pass"
    agreement = float(np.mean(got.labels == want.labels))
    assert agreement >= min_agreement, f"labels agree on {agreement:.4%} of pixels"
    if atol is not None:
        assert np.abs(got.network_confidence - want.network_confidence).max() <= atol


# -- export -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("package", PACKAGES)
def test_every_graph_has_a_checked_program(package, request):
    """Each graph of each mode has its .pt2 in the card, checksummed, and parity records of its own."""
    path = request.getfixturevalue(package)
    card = load_card(path)
    data = json.loads((path / "card.json").read_text())
    for name, spec in card.graphs.items():
        assert spec.pt2 == f"{name}.pt2" and spec.pt2 in spec.files
        assert data["checksums"][spec.pt2] == sha256_file(path / spec.pt2)
    records = {r["graph"]: r for r in card.export["parity"]}
    prefix = "" if set(card.graphs) == {"whole"} else "{}/"
    for name in card.graphs:
        pt2 = [r for g, r in records.items() if g == prefix.format(name) + "pt2"]
        assert pt2 and all(r["ok"] and r["label_agreement"] >= MIN_AGREEMENT for r in pt2)
        # The program is checked under bf16 autocast as the TorchScript graph is (its dtype checks stripped).
        assert all("bf16_error" not in r and r["label_agreement_bf16"] > 0.9 for r in pt2)
    assert card.torch_gpu_precision in ("bf16", "fp32")


def test_pt2_alone_sets_gpu_precision(tmp_path):
    """A package of programs only: its bf16 check decides torch_gpu_precision, and auto runs the programs."""
    cfg = make_tiny_weights(tmp_path / "weights.safetensors")
    card = export_package(cfg, tmp_path / "weights.safetensors", tmp_path / "package", formats=("pt2",),
                          parity_seed=0)
    assert [r["graph"] for r in card["export"]["parity"]] == ["pt2"]
    assert card["torch_gpu_precision"] == ("bf16" if card["export"]["parity"][0]["label_agreement_bf16"] >= 0.98
                                           else "fp32")
    # The checksums are written by write_card into card.json, not into the dict export_package returns.
    assert set(load_card(tmp_path / "package").checksums) == {"whole.pt2"}
    seg = Segmenter(tmp_path / "package", device="cpu")
    assert seg.backend.name == "pt2"


def test_parse_formats():
    parser = argparse.ArgumentParser()
    assert parse_formats(parser, "onnx, pt2") == ("onnx", "pt2")
    with pytest.raises(SystemExit):
        parse_formats(parser, "onnx,tflite")


# -- card ---------------------------------------------------------------------------------------------------
def test_card_refuses_tampered_program(whole_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(whole_dir, bad)
    data = bytearray((bad / "whole.pt2").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bad / "whole.pt2").write_bytes(bytes(data))
    with pytest.raises(CardError, match="checksum of whole.pt2"):
        load_card(bad)
    (bad / "whole.pt2").unlink()
    with pytest.raises(CardError, match="whole.pt2 is missing"):
        load_card(bad)


def test_card_pt2_names_a_plain_file(whole_dir, tmp_path):
    bad = edited_copy(whole_dir, tmp_path / "bad", lambda d: d["graphs"]["whole"].update(pt2="../whole.pt2"))
    with pytest.raises(CardError, match="plain names"):
        load_card(bad)


def test_package_without_programs(whole_dir, tmp_path):
    """pt2 asked of a package without programs is a card error; auto keeps preferring ONNX, then TorchScript."""
    def without(*kinds: str):
        return lambda d: [g.update({kind: None for kind in kinds}) for g in d["graphs"].values()]

    plain = edited_copy(whole_dir, tmp_path / "plain", without("pt2"))
    with pytest.raises(CardError, match="no pt2 file"):
        Segmenter(plain, backend="pt2", device="cpu")
    assert Segmenter(whole_dir, device="cpu").backend.name == "onnxruntime"
    assert Segmenter(edited_copy(whole_dir, tmp_path / "ts", without("onnx")), device="cpu").backend.name \
        == "torchscript"
    only_pt2 = edited_copy(whole_dir, tmp_path / "pt2", without("onnx", "torchscript"))
    assert Segmenter(only_pt2, device="cpu").backend.name == "pt2"
    # Another arithmetic than the exported one is the PyTorch path's: the programs where there is no TorchScript.
    onnx_pt2 = edited_copy(whole_dir, tmp_path / "onnx_pt2", without("torchscript"))
    assert Segmenter(onnx_pt2, device="cpu", precision="bf16").backend.name == "pt2"


# -- device portability -------------------------------------------------------------------------------------
@pytest.mark.parametrize("package", PACKAGES)
def test_programs_move_to_another_device(package, request):
    """Moved to the meta device, a program names no other device and runs there: every tensor it makes
    follows its inputs (a constant or literal left on the CPU would mix devices and fail)."""
    path = request.getfixturevalue(package)
    for spec in load_card(path).graphs.values():
        program = load_program(path / spec.pt2, "meta")
        assert device_literals(program) <= {"meta"}
        assert all(t.device.type == "meta" for t in (*program.state_dict.values(), *program.constants.values())
                   if isinstance(t, torch.Tensor))
        args, _ = program.example_inputs
        with torch.no_grad():
            out = program.module()(*args)
        assert all(t.device.type == "meta" for t in (out if isinstance(out, (tuple, list)) else (out,)))


@pytest.mark.parametrize("package", PACKAGES)
def test_programs_compile_as_one_graph(package, request):
    """torch.compile takes each program whole: a graph break would leave Python between compiled pieces and a
    CUDA graph per piece. (Unused ``aten.promote_types`` calls the export kept split DepthForge's window graph
    into 7 graphs and MFuser's into 12, until loading dropped them.)"""
    path = request.getfixturevalue(package)
    for spec in load_card(path).graphs.values():
        program = load_program(path / spec.pt2, "cpu")
        explained = torch._dynamo.explain(program.module())(*program.example_inputs[0])
        assert (explained.graph_count, explained.graph_break_count) == (1, 0), [
            str(b.reason).splitlines()[0] for b in explained.break_reasons]


class _PicksItsDtype(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ctype = torch.promote_types(x.dtype, torch.float32)  # recorded by the export, its value used by nothing
        torch._check(x.max().item() < 100)  # a run-time assertion: it has no users either, and must stay
        return x.to(ctype) * 2


def test_unused_operators_go_and_assertions_stay():
    program = torch.export.export(_PicksItsDtype(), (torch.ones(4, 3, dtype=torch.int32),))
    targets = {str(n.target) for n in program.graph.nodes}
    assert "aten.promote_types.default" in targets
    assert drop_dead_code(program) == 1
    assert {str(n.target) for n in program.graph.nodes} == targets - {"aten.promote_types.default"}
    assert program.module()(torch.ones(4, 3, dtype=torch.int32)).dtype == torch.float32
    with pytest.raises(RuntimeError, match="assertion"):
        program.module()(torch.full((4, 3), 200, dtype=torch.int32))


@contextlib.contextmanager
def _fake_cuda() -> Iterator[None]:
    """CUDA tensors without a GPU, for tracing only: fake tensors, with a shape environment as torch.compile has
    (sizes known only at run time trace, to be caught), and CUDA autocast, which turns itself off where no GPU is."""
    from unittest import mock

    from torch._subclasses import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    with FakeTensorMode(allow_non_fake_inputs=True, shape_env=ShapeEnv()), \
            mock.patch("torch.cuda.amp.common.amp_definitely_not_available", return_value=False), \
            mock.patch("torch.cuda.is_bf16_supported", return_value=True):
        yield


def _program_on_fake_cuda(path: Path) -> Any:
    """The program at ``path`` as :func:`load_program` gives it for CUDA; call inside :func:`_fake_cuda`.

    It is read with real tensors (torch.export.load needs them), then placed on the fake GPU.
    """
    from torch._subclasses import FakeTensorMode

    with torch._subclasses.fake_tensor.unset_fake_temporarily():
        program = read_program(path)
    assert isinstance(torch._guards.detect_fake_mode(), FakeTensorMode), "call inside _fake_cuda()"
    return place_program(program, "cuda", str(path))


def _cuda_inference_graph(path: Path) -> torch.fx.GraphModule:
    """The inference graph AOTDispatcher hands TorchInductor for the program at ``path`` on CUDA, traced with
    fake CUDA tensors (no GPU needed): what ``torch.compile(mode="reduce-overhead")`` would capture."""
    from functorch.compile import aot_function, make_boxed_func

    graphs = []

    def capture(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    with _fake_cuda():
        program = _program_on_fake_cuda(path)
        module = program.module()
        state = {**dict(module.named_parameters()), **dict(module.named_buffers())}
        args = program.example_inputs[0]
        with torch.no_grad():
            aot_function(lambda s, *x: torch.func.functional_call(module, s, x), fw_compiler=capture)(state, *args)
    return graphs[-1]


def _cuda_graph_refusals(graph: torch.fx.GraphModule) -> list[str]:
    """Why TorchInductor would not capture ``graph`` in a CUDA graph: a tensor off the GPU (it skips CUDA graphs
    for any CPU tensor), an operator it refuses to capture (host syncs, sizes known only at run time), an
    update of an input. Empty: nothing in the graph stops the capture."""
    from torch._inductor.utils import get_first_incompatible_cudagraph_node

    why = []
    nodes = list(graph.graph.nodes)
    devices = {str(n.meta["val"].device) for n in nodes if isinstance(n.meta.get("val"), torch.Tensor)}
    if devices != {"cuda:0"}:
        why.append(f"tensors on {sorted(devices)}")
    refused = get_first_incompatible_cudagraph_node(graph)
    if refused is not None:
        why.append(f"{refused.target} ({(refused.meta.get('stack_trace') or '').strip()})")
    placeholders = set(graph.graph.find_nodes(op="placeholder"))
    why += [f"{n.target} updates an input" for n in nodes if n.op == "call_function" and n.args
            and n.args[0] in placeholders and getattr(getattr(n.target, "_schema", None), "is_mutable", False)]
    return why


@pytest.mark.parametrize("package", PACKAGES)
def test_programs_on_cuda_can_be_captured_in_cuda_graphs(package, request):
    """On CUDA each program is one graph inductor can capture. The CPU cannot run the capture; these are its
    conditions, checked on the graph inductor would get."""
    path = request.getfixturevalue(package)
    for spec in load_card(path).graphs.values():
        assert _cuda_graph_refusals(_cuda_inference_graph(path / spec.pt2)) == [], spec.pt2


class _Select(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nonzero(x)  # how many rows: known only once the GPU has counted them


def test_the_cuda_graph_conditions_catch_a_run_time_size(tmp_path):
    path = tmp_path / "select.pt2"
    torch.export.save(torch.export.export(_Select(), (torch.ones(2, 3, dtype=torch.uint8),)), str(path))
    assert any("nonzero" in why for why in _cuda_graph_refusals(_cuda_inference_graph(path)))


# The operators that carry a network's arithmetic, each of which autocast runs in half precision on CUDA.
AUTOCAST_HEAVY = {"aten.linear.default", "aten.conv1d.default", "aten.conv2d.default", "aten.conv_transpose2d.input",
                  "aten.matmul.default", "aten.einsum.default", "aten.scaled_dot_product_attention.default"}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("package", FAMILY_PACKAGES + ("c2f_dir",))
def test_programs_run_under_cuda_autocast(package, dtype, request):
    """On a GPU the pt2 backend runs each program under CUDA autocast (eagerly or compiled), and AOTInductor
    compiles it exported again under autocast. CUDA's autocast casts other operators than the CPU's, so a graph
    that mixes dtypes only there would fail only on the car; traced here on fake CUDA tensors, both ways run,
    run their matrix products, convolutions and attention in ``dtype`` and give labels as uint8 and scores in
    float32 or ``dtype``."""
    path = request.getfixturevalue(package)
    for spec in load_card(path).graphs.values():
        with _fake_cuda():
            program = _program_on_fake_cuda(path / spec.pt2)
            with torch.no_grad(), torch.autocast("cuda", dtype=dtype):
                outputs = program.module()(*program.example_inputs[0])
            again = autocast_program(program, "cuda", dtype)
        outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
        assert all(o.device.type == "cuda" for o in outputs)
        assert {o.dtype for o in outputs} <= {torch.uint8, torch.float32, dtype}, spec.pt2
        heavy = [(str(n.target), n.meta["val"].dtype) for m in again.graph_module.modules()
                 if isinstance(m, torch.fx.GraphModule) for n in m.graph.nodes if str(n.target) in AUTOCAST_HEAVY]
        assert heavy and all(d == dtype for _, d in heavy), f"{spec.pt2}: {sorted(set(heavy))}"
        assert dynamic_dims(again)[0].keys() == dynamic_dims(program)[0].keys()


class _Zeros(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float() + torch.zeros(x.shape[-1], device=x.device)


def test_load_program_rewrites_and_checks_device_literals(tmp_path, monkeypatch):
    """A factory's device (recorded as the export's) is rewritten; one left behind is refused by name."""
    path = tmp_path / "zeros.pt2"
    torch.export.save(torch.export.export(_Zeros(), (torch.zeros(2, 3, dtype=torch.uint8),)), str(path))
    assert "cpu" in device_literals(torch.export.load(str(path)))
    assert device_literals(load_program(path, "meta")) == {"meta"}
    monkeypatch.setattr("torch.export.passes.move_to_device_pass", lambda program, device: program)
    with pytest.raises(BackendError, match=r"still names device\(s\) \['cpu'\]"):
        load_program(path, "meta")


def test_mfuser_program_carries_the_scan_op_and_loads_without_training(mfuser_dir, tmp_path):
    """MFuser's program keeps the selective scan as one dgss op (the car's GPU compiles its Triton kernel), and
    the runtime alone registers it: a process that never imports training/ loads and runs the program."""
    import subprocess
    import sys

    from dgss_perception.ops.selective_scan_triton import TRITON_AVAILABLE

    if not TRITON_AVAILABLE:
        pytest.skip("Triton is not installed: programs are exported with the chunked scan instead of the op")
    program = torch.export.load(str(mfuser_dir / "window.pt2"))
    assert sum(str(n.target) == "dgss.selective_scan.default" for n in program.graph.nodes) > 0
    script = (
        "import sys, numpy as np\n"
        "from pathlib import Path\n"
        "from dgss_perception.engine import Segmenter\n"
        "seg = Segmenter(Path(sys.argv[1]), backend='pt2', device='cpu', torch_compile='none')\n"
        "rgb = np.random.default_rng(1).integers(0, 256, (seg.card.input_height, seg.card.input_width, 3), "
        "dtype=np.uint8)\n"
        "np.save(sys.argv[2], seg.segment(rgb).labels)\n"
        "assert 'training' not in sys.modules, 'the runtime imported training/'\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", script, str(mfuser_dir), str(tmp_path / "labels.npy")], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    card = load_card(mfuser_dir)
    rgb = np.random.default_rng(1).integers(0, 256, (card.input_height, card.input_width, 3), dtype=np.uint8)
    want = Segmenter(mfuser_dir, backend="torchscript", device="cpu").segment(rgb).labels
    assert np.mean(np.load(tmp_path / "labels.npy") == want) >= MIN_AGREEMENT


def test_metadata_asserts_stripped(mfuser_dir):
    """The export's dtype checks before .float() would refuse autocast's bf16; the casts themselves stay."""
    program = torch.export.load(str(mfuser_dir / "window.pt2"))
    casts = sum(n.target is torch.ops.aten.to.dtype for n in program.graph.nodes)
    assert strip_metadata_asserts(program) > 0
    assert not any(n.target is torch.ops.aten._assert_tensor_metadata.default for n in program.graph.nodes)
    assert sum(n.target is torch.ops.aten.to.dtype for n in program.graph.nodes) == casts > 0
    windows = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (3, 56, 56, 3), dtype=np.uint8))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        scores = program.module()(windows)
    assert (scores[0] if isinstance(scores, (tuple, list)) else scores).shape[0] == 3


# -- the backend, eager -------------------------------------------------------------------------------------
@pytest.mark.parametrize("package", PACKAGES)
def test_eager_program_matches_torchscript(package, request):
    path = request.getfixturevalue(package)
    seg = Segmenter(path, backend="pt2", device="cpu", torch_compile="none")
    assert all(b.name == "pt2" and b.compile == "none" for b in seg.backends.values())
    ts = Segmenter(path, backend="torchscript", device="cpu")
    rgb = package_frame(path) if package != "resize_dir" else frame((97, 131), 1)  # any size: resized in the graph
    frames = [rgb, package_frame(path, 2)] if package == "batch_dir" else [rgb]
    for got, want in zip(seg.segment_batch(frames), ts.segment_batch(frames)):
        assert_same(got, want)


def test_backend_contract(whole_dir, c2f_dir):
    """describe, device residency, outputs kept as tensors, cuda_graph's note and the compile modes' check."""
    seg = Segmenter(whole_dir, backend="pt2", device="cpu", cuda_graph=True)
    backend = seg.backend
    assert seg.device_report == "cpu (torch.export, eager, fp32 graph)" == backend.describe()
    assert not backend.holds_device_results and not backend.cuda_graph and "CPU" in backend.cuda_graph_note
    assert backend.cache_dir is None  # nothing compiled, nothing cached
    c2f = Segmenter(c2f_dir, backend="pt2", device="cpu")
    image = package_frame(c2f_dir)[None]
    labels, _, logits, _ = c2f.backend.run([image, np.array([0.5], np.float32)], keep_on_device=(2,))
    assert isinstance(logits, torch.Tensor) and isinstance(labels, np.ndarray) and labels.dtype == np.uint8
    # A kept tensor is as valid an input of the next graph as its numpy form.
    windows = np.arange(3, dtype=np.int64)
    kept = c2f.backends["refine"].run([image, logits, windows])
    host = c2f.backends["refine"].run([image, logits.numpy(), windows])
    assert all(np.array_equal(a, b) for a, b in zip(kept, host))
    with pytest.raises(ValueError, match="unknown torch_compile"):
        Segmenter(whole_dir, backend="pt2", device="cpu", torch_compile="jit")
    with pytest.raises(ValueError, match="unknown compile mode"):
        TorchExportBackend(whole_dir / "whole.pt2", device="cpu", compile="tvm")


def test_a_compile_run_without_the_cuda_graphs_asked_for_is_noted(resize_dir, torch_cache):
    """TorchInductor only logs a warning when it skips CUDA graphs; the backend turns that into its note (which the
    node logs and the bench reports). The CPU compiles no CUDA graph: the backend is put in its GPU state, and its
    module bumps inductor's own skip counter the way inductor does when it refuses a capture."""
    from torch._inductor.cudagraph_utils import log_cudagraph_skip_and_bump_counter

    backend = TorchExportBackend(resize_dir / "whole.pt2", device="cpu", compile="none")
    plain = backend._module
    skip = {"now": False}

    def module(*tensors: torch.Tensor) -> object:
        if skip["now"]:
            log_cudagraph_skip_and_bump_counter("skipping cudagraphs due to cpu device (simulated)")
        return plain(*tensors)

    backend._module, backend.compile, backend.cuda_graph, backend.cache_dir = module, "inductor", True, torch_cache
    image = frame((40, 60), 1)[None]
    backend.run([image])
    assert backend.cuda_graph_note == ""  # a shape captured as asked leaves no note
    skip["now"] = True
    backend.run([image])
    assert backend.cuda_graph_note == ""  # a shape already compiled compiles nothing now
    backend.run([frame((44, 60), 2)[None]])
    assert "shapes [[1, " in backend.cuda_graph_note and "without CUDA graphs" in backend.cuda_graph_note


def test_bf16_autocast_on_cpu(whole_dir):
    """bf16 asked on the CPU runs autocast there (as TorchScript's does); outputs keep the card's dtypes."""
    seg = Segmenter(whole_dir, backend="pt2", device="cpu", precision="bf16", torch_compile="none")
    assert seg.precision == "bf16" and "bf16 autocast" in seg.device_report
    labels, confidence = seg.backend.run([package_frame(whole_dir)[None]])
    assert labels.dtype == np.uint8 and confidence.dtype == np.float32
    rgb = package_frame(whole_dir)
    ts = Segmenter(whole_dir, backend="torchscript", device="cpu", precision="bf16").segment(rgb)
    assert_same(seg.segment(rgb), ts, min_agreement=0.98, atol=None)


def test_slide_merged_by_torch(mfuser_dir):
    """merge_on_device with the pt2 backend (torch tensors on the CPU here) equals the host merge."""
    rgb = package_frame(mfuser_dir)
    on_device = Segmenter(mfuser_dir, backend="pt2", device="cpu", merge_on_device=True, window_batch=5)
    host = Segmenter(mfuser_dir, backend="pt2", device="cpu", window_batch=5)
    assert on_device.merge_on_device and not host.merge_on_device
    assert_same(on_device.segment(rgb), host.segment(rgb), min_agreement=1.0)


# -- compiled -----------------------------------------------------------------------------------------------
def test_cache_key_fields(tmp_path):
    """The compile cache's directory changes with each field of its key: graph, device, torch, precision."""
    base = torch_cache_dir(tmp_path, "sha256:" + "ab" * 32, "nvidia-h200-sm90", "2.14.1+cu130", "bf16")
    assert base.parent == tmp_path and base.name == "abababababababab-nvidia-h200-sm90-torch2.14.1-cu130-bf16"
    others = {torch_cache_dir(tmp_path, "sha256:" + "cd" * 32, "nvidia-h200-sm90", "2.14.1+cu130", "bf16"),
              torch_cache_dir(tmp_path, "sha256:" + "ab" * 32, "nvidia-a100-sm80", "2.14.1+cu130", "bf16"),
              torch_cache_dir(tmp_path, "sha256:" + "ab" * 32, "nvidia-h200-sm90", "2.15.0+cu130", "bf16"),
              torch_cache_dir(tmp_path, "sha256:" + "ab" * 32, "nvidia-h200-sm90", "2.14.1+cu130", "fp32")}
    assert len(others) == 4 and base not in others


def _compiled_matches_eager(path: Path, torch_cache: Path, compile: str) -> TorchExportBackend:
    seg = Segmenter(path, backend="pt2", device="cpu", torch_compile=compile)
    backend = seg.backend
    assert backend.compile == compile and backend.cache_dir is not None
    checksum = load_card(path).checksums[f"{next(iter(seg.backends))}.pt2"]
    assert backend.cache_dir.parent == torch_cache and "-cpu-" in backend.cache_dir.name
    assert backend.cache_dir.name.startswith(checksum.split(":")[-1][:16])
    assert backend.cache_dir.name.endswith(f"-torch{torch.__version__.replace('+', '-')}-fp32")
    assert any(backend.cache_dir.iterdir()), "the compile left nothing in its cache directory"
    eager = Segmenter(path, backend="pt2", device="cpu", torch_compile="none")
    labels = []
    for seed in (1, 2):  # the second frame runs the compiled code without compiling
        rgb = package_frame(path, seed)
        want = eager.segment(rgb)
        assert_same(seg.segment(rgb), want, varied=False)
        labels.append(want.labels)
    assert len(np.unique(np.stack(labels))) >= 2, "constant label maps would let wrong outputs pass"
    print(f"{path.parent.name}: {compile} load and compile {backend.compile_seconds:.1f} s")
    return backend


def test_inductor_whole(whole_dir, torch_cache):
    backend = _compiled_matches_eager(whole_dir, torch_cache, "inductor")
    assert backend.describe() == "cpu (torch.export + inductor default, fp32 graph)"


@pytest.mark.slow
@pytest.mark.timeout(2400)  # MFuser's window graph: 112 s on two quiet CPU cores, up to 10.5 min before
@pytest.mark.parametrize("package", FAMILY_PACKAGES[1:])
def test_inductor_slide_families(package, request, torch_cache):
    """The window graph of each slide family, compiled once for any window count (its free dimension)."""
    path = request.getfixturevalue(package)
    _compiled_matches_eager(path, torch_cache, "inductor")
    # 12 or 6 windows per frame after an example of 2: one dynamic compile, no shape after it compiles again.
    assert dynamic_dims(load_program(path / "window.pt2", "cpu"))[0].keys() == {0}


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_aoti_compiles_once_and_is_cached(whole_dir, torch_cache):
    backend = _compiled_matches_eager(whole_dir, torch_cache, "aoti")
    assert not backend.aoti_cached and (backend.cache_dir / AOTI_PACKAGE).is_file()
    assert not [p for p in backend.cache_dir.iterdir() if "partial" in p.name]
    again = Segmenter(whole_dir, backend="pt2", device="cpu", torch_compile="aoti").backend
    assert again.aoti_cached and again.compile_seconds < backend.compile_seconds
    rgb = package_frame(whole_dir)
    assert np.array_equal(again.run([rgb[None]])[0], backend.run([rgb[None]])[0])


def test_autocast_program_keeps_free_dimensions(c2f_dir):
    """The program AOTInductor compiles for bf16: the refine graph under autocast, its window count still free."""
    program = load_program(c2f_dir / "refine.pt2", "cpu")
    half = autocast_program(program, "cpu", torch.bfloat16)
    assert [{i: b[1:] for i, b in d.items()} for d in dynamic_dims(half)] == \
        [{i: b[1:] for i, b in d.items()} for d in dynamic_dims(program)]
    assert dynamic_dims(program)[2]  # the window indices
    card = load_card(c2f_dir)
    image = package_frame(c2f_dir)[None]
    coarse = load_program(c2f_dir / "coarse.pt2", "cpu").module()
    with torch.no_grad():
        logits = coarse(torch.from_numpy(image), torch.tensor([0.5]))[2]
        windows = torch.arange(min(5, len(card.inference_params["windows"])))
        got = half.module()(torch.from_numpy(image), logits, windows)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            want = program.module()(torch.from_numpy(image), logits, windows)
    assert torch.equal(got[0], want[0])


# -- GPU ----------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("compile", ["none", "inductor"])
@pytest.mark.parametrize("package", FAMILY_PACKAGES + ("c2f_dir",))
def test_gpu_bf16_matches_cpu_fp32(package, compile, request):
    """Each family's programs on CUDA in bf16 (eager, or compiled by inductor) against the CPU in fp32."""
    path = request.getfixturevalue(package)
    gpu = Segmenter(path, backend="pt2", device="cuda", precision="bf16", torch_compile=compile)
    assert gpu.backend.holds_device_results and gpu.device_report.startswith("cuda:0 (")
    assert "bf16 autocast" in gpu.device_report
    cpu = Segmenter(path, backend="pt2", device="cpu", precision="fp32", torch_compile="none")
    labels = []
    for seed in (1, 2):
        rgb = package_frame(path, seed)
        want = cpu.segment(rgb)
        assert_same(gpu.segment(rgb), want, min_agreement=BF16_GPU_AGREEMENT, atol=None, varied=False)
        labels.append(want.labels)
    assert len(np.unique(np.stack(labels))) >= 2, "constant label maps would let wrong outputs pass"
    print(f"{path.parent.name} on {gpu.device_report}: load and compile {gpu.backend.compile_seconds:.1f} s")


def test_cache_root_from_environment(monkeypatch, tmp_path):
    from dgss_perception.torch_export import torch_cache_root

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "x"))
    assert torch_cache_root() == tmp_path / "x"
    monkeypatch.delenv(CACHE_ENV)
    assert torch_cache_root() == Path(os.path.expanduser("~")) / ".cache" / "dgss_perception" / "inductor"


# -- command line and bench ---------------------------------------------------------------------------------
def test_command_line_and_bench_take_pt2(whole_dir, tmp_path, ros_domain_id, capsys):
    import cv2

    from dgss_perception.cli import main

    image = tmp_path / "frame.png"
    cv2.imwrite(str(image), package_frame(whole_dir)[:, :, ::-1])
    assert main(["segment", str(image), "--model", str(whole_dir), "--out", str(tmp_path / "out"),
                 "--backend", "pt2", "--device", "cpu", "--torch-compile", "none"]) == 0
    assert "cpu (torch.export, eager, fp32 graph)" in capsys.readouterr().err
    labels = cv2.imread(str(tmp_path / "out" / "frame_labels.png"), cv2.IMREAD_UNCHANGED)
    want = Segmenter(whole_dir, backend="torchscript", device="cpu").segment(package_frame(whole_dir)).labels
    assert np.array_equal(labels, want)
    report_path = tmp_path / "bench.json"
    assert main(["bench", "--model", str(whole_dir), "--backend", "pt2", "--device", "cpu", "--frames", "3",
                 "--warmup", "1", "--no-node", "--peak-gflops", "50", "--json", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    assert report["backend"]["name"] == "pt2" and report["error"] is None
    assert "torch.export" in report["backend"]["device_report"]
    assert set(report["backend"]["compile_seconds"]) == {"whole"}
    with pytest.raises(SystemExit):
        main(["segment", str(image), "--model", str(whole_dir), "--torch-compile", "jit"])
