"""Measure every benchmark family on one GPU machine, against its compute floor, in one budgeted run.

    python3 scripts/gpu_figures.py --out figures [--budget-s 420]
    python3 scripts/gpu_figures.py --out /tmp/figures_dry --dry          # CPU, shrunk towers, a few frames

Run from the repository root; nothing needs installing (the root goes on ``sys.path`` here). It first times
MFuser's selective scan alone at one fuser's official shape (the ``dgss::selective_scan`` Triton op, its
fused backward, the exportable chunked scan, mamba-ssm where installed; each checked against the chunked
scan in float64). Then, for each family (VFMNet-L/16 512x1024, VFMSeg coarse-to-fine 1024x2048,
DepthForge 512x1024 and 1024x2048, MFuser 512x1024), it

1. exports a benchmark package with ``training.bench_models.export_bench`` (random weights, TorchScript
   and, unless ``--pt2 off``, torch.export programs; the ONNX path is not measured here, ONNX Runtime
   being CPU-only on the GPU machine);
2. runs the product's engine benchmark on it (``dgss-perception bench --no-node``, 1920x1080 rgb8 frames):
   the TorchScript backend at each precision the bench takes (``--precision bf16`` and ``fp32``; "n/a"
   when the bench has no such flag), and the pt2 backend in bf16 for each of ``--pt2`` (``inductor_cg``:
   ``--torch-compile inductor --cuda-graph``, TorchInductor with CUDA graphs; ``inductor``; ``aoti``:
   AOTInductor compiled on this machine; ``none``: the program run eagerly); the figure is the engine's
   inference median, and the pt2 rows also give the seconds their compile took (a cold cache under
   ``--work``);
3. times, as reference, eager PyTorch of the same graph (the export wrapper around the model: uint8
   frame at the graph's input size, already on the device, in; labels on the device out) in fp32 and
   under bf16 autocast, and later, where the budget allows, ``torch.compile`` under bf16 autocast, with
   CUDA events: warm-up, then the median of N runs.

The steps run in tiers, so that a short budget still brings the product's own figures of every family:
the peak and the scan; then each family's package, its TorchScript bf16 bench and its first pt2 mode;
then the other compiled pt2 modes; then the eager references, fp32 and the eager program; last the
``torch.compile`` references.

Each figure is set against a compute floor: the card's FLOPs per frame (``export.flops``: ``whole``;
``coarse`` + mean windows refined × ``refine_per_window``; windows × ``window`` for slide) over the
matrix throughput measured at the start of the run (8192³ matmuls timed with CUDA events; the best of
several: bf16, tf32 and fp32 with TF32 off); ratio = measured ms / floor ms.

Every step runs in its own process (forked from this one, which has the heavy modules imported and
never touches the GPU; ``--isolation spawn`` starts a fresh interpreter instead) under its own timeout
and within ``--budget-s`` overall, most important first; a failing step's error (its last lines) is
recorded and the run goes on. The exports (CPU work) run one after another beside the other steps (the
GPU's, in order, each waiting for the package it needs; on a GPU the exports get all cores but two);
``--serial`` runs one step at a time. ``OUT/gpu_figures.json`` and ``OUT/gpu_figures.md`` are rewritten
after every step, so a cut run still reports. Packages and step logs go to ``--work``.

``--dry``: the same steps on the CPU with shrunk towers (``embed_dim=64 depth=4 num_heads=2``), small
networks and windows (the slide heads shrunk too, a config edit; VFMSeg as the ``tiny_c2f`` preset, the
paper's 512-pixel windows not shrinking) and a few frames; ``torch.compile`` uses the ``aot_eager``
backend there (no C++ build). ``--families`` and ``--compile`` choose what runs (``--help``).

MFuser's text tower needs open_clip: where it does not import, MFuser's rows say so and are skipped.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import importlib.util
import json
import math
import multiprocessing
import os
import shlex
import signal
import statistics
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout, not installed
    sys.path.insert(0, str(ROOT))

SCHEMA = "dgss_perception.gpu_figures/1"
FRAME = (1080, 1920)  # (height, width) of the camera frames the bench feeds the engine
POOL = 4  # distinct frames cycled through, as the bench
DRY_OVERRIDES = {"embed_dim": 64, "depth": 4, "num_heads": 2}
TAIL_LINES = 15
POLL_S = 0.05  # how often running steps are looked at
# The pt2 backend's ways to run a program, as the bench is told them, and their labels in the report.
PT2_MODES: dict[str, tuple[list[str], str]] = {
    "inductor_cg": (["--torch-compile", "inductor", "--cuda-graph"], "torch.compile + CUDA graphs"),
    "inductor": (["--torch-compile", "inductor"], "torch.compile"),
    "aoti": (["--torch-compile", "aoti"], "AOTInductor"),
    "none": (["--torch-compile", "none"], "eager program"),
}
PT2_DEFAULT = "inductor_cg,aoti,none"
PT2_DRY_DEFAULT = "none"  # the compilers build C++ on a CPU: minutes on two cores (test_torch_export runs them)
# One MVFuser's selective scan at the official size, (N, D, L, S): batch 1, d_inner 512 (d_model 1024 / 2),
# the 2594 joined tokens, 16 states; and the dry run's, small enough for Triton's interpreter.
SCAN_SHAPE = (1, 512, 2594, 16)
DRY_SCAN_SHAPE = (1, 8, 45, 4)
# A step whose timeout would be under this is not started (it could not finish).
MIN_STEP_S = 10.0
DRY_MIN_STEP_S = 3.0

# Dry-run heads for the slide families: the Mask2Former head keeps its official widths under tower
# overrides, and at 512-pixel windows it dominates a CPU run (minutes), so the dry run shrinks it too.
_DF_DRY = {"model": {"img_size": [64, 64],
                     "depthforge": {"token_length": 10, "rank": 4, "conv_dim": 32, "mask_dim": 32,
                                    "pixel_decoder_layers": 2, "pixel_ffn_dim": 64, "decoder_layers": 3, "heads": 4,
                                    "ffn_dim": 64, "num_points": 64}},
           "inference": {"window": 64, "stride": 43}}
_MF_DRY = {"model": {"img_size": [56, 56],
                     "mfuser": {"vlm": {"embed_dim": 24},
                                "text": {"overrides": {"width": 32, "layers": 2, "heads": 2, "output_dim": 24}},
                                "enhancer_width": 16, "enhancer_heads": 2, "conv_dim": 32, "mask_dim": 32,
                                "pixel_decoder_layers": 2, "decoder_layers": 3, "heads": 4, "ffn_dim": 64,
                                "num_points": 64}},
           "inference": {"window": 56, "stride": 37}}


@dataclass(frozen=True)
class Family:
    """One measured package: a bench_models preset at a size, and its shrunk form for ``--dry``.

    Attributes:
        key: the family's name in reports and ``--families``.
        preset: the bench_models preset; ``size`` its graph input (H, W), None for the preset's own.
        dry_preset, dry_size, dry_config: the same for ``--dry``; ``dry_config`` is merged into the
            preset's training config (heads and windows the tower overrides do not reach).
        frames, warmup: engine frames measured and warm-up frames (bench), also eager runs and warm-up.
        caps: per-step time limits in seconds (export, bench: TorchScript, pt2: a pt2 bench with its compile,
            eager, compile).
        compile: whether a ``torch.compile`` step is planned.
        needs: modules the family's model needs; a missing one skips its steps at once.
    """

    key: str
    preset: str
    size: tuple[int, int] | None
    dry_preset: str
    dry_size: tuple[int, int] | None
    dry_config: dict[str, Any] | None = None
    frames: int = 30
    warmup: int = 10
    # The export runs on the CPU (TorchScript, then torch.export), each form checked against eager; a pt2
    # bench includes compiling the programs on the target (minutes for max-autotune or AOTInductor).
    caps: dict[str, float] = field(default_factory=lambda: {"export": 180, "bench": 90, "pt2": 240, "eager": 90,
                                                            "compile": 150})
    compile: bool = True
    needs: tuple[str, ...] = ()


FAMILIES: tuple[Family, ...] = (
    Family("vfmnet_l16_512x1024", "vfmnet_vitl16_512x1024", None, "vfmnet_vitl16_512x1024", (64, 128)),
    Family("vfmseg_l16_c2f_1024x2048", "vfmseg_vitl16_c2f_1024x2048", None, "tiny_c2f", None, frames=20, warmup=6),
    Family("depthforge_l16_512x1024", "depthforge_vitl16_slide_512x1024", None, "depthforge_vitl16_slide_512x1024",
           (64, 128), _DF_DRY, frames=20, warmup=6),
    Family("depthforge_l16_1024x2048", "depthforge_vitl16_slide_1024x2048", None,
           "depthforge_vitl16_slide_1024x2048", (128, 256), _DF_DRY, frames=10, warmup=4),
    # Slow before the fused scan (2.4 s a frame): the last family of every tier, short limits, few frames.
    Family("mfuser_l14_512x1024", "mfuser_eva02l_slide_1024x2048", (512, 1024), "mfuser_eva02l_slide_1024x2048",
           (56, 112), _MF_DRY, frames=5, warmup=2,
           caps={"export": 180, "bench": 60, "pt2": 180, "eager": 60, "compile": 0}, compile=False,
           needs=("open_clip",)),
)
FAMILY_KEYS = tuple(f.key for f in FAMILIES)


@dataclass
class Step:
    """One isolated unit of work and the report rows it fills.

    ``kind``: peak | export | bench | eager | compile; ``rows``: ids of the rows it fills; ``cap_s``:
    its own time limit; ``args``: JSON-able keyword arguments of its function.
    """

    name: str
    kind: str
    family: str | None
    rows: list[str]
    cap_s: float
    args: dict[str, Any]
    after: str | None = None  # a step whose failure makes this one pointless (its package)


# -- shared helpers ------------------------------------------------------------------------------------
def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``extra`` merged in, nested dicts merged key by key (a copy)."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def resolve(family: str, dry: bool) -> tuple[Any, dict[str, Any], tuple[int, int] | None]:
    """The bench_models preset (dry config applied), tower overrides and size a family is built with."""
    from training import bench_models

    fam = family_of(family)
    preset = bench_models.get_preset(fam.dry_preset if dry else fam.preset)
    if dry and fam.dry_config:
        preset = dataclasses.replace(preset, config=_merge(preset.config, fam.dry_config))
    return preset, (dict(DRY_OVERRIDES) if dry else {}), (fam.dry_size if dry else fam.size)


def family_of(key: str) -> Family:
    """The family called ``key``; ValueError listing the known ones otherwise."""
    for fam in FAMILIES:
        if fam.key == key:
            return fam
    raise ValueError(f"unknown family {key!r} (known: {', '.join(FAMILY_KEYS)})")


def frame_flops(flops: dict[str, Any], mode: str, windows_refined_mean: float | None,
                slide_windows: int | None) -> float | None:
    """FLOPs one frame costs from a card's ``export.flops`` (as training.bench_models.describe_flops composes them).

    whole: ``whole`` (the graph's whole batch); coarse_to_fine: ``coarse`` + mean windows refined ×
    ``refine_per_window``; slide: the frame's windows × ``window``. None where a term is missing.
    """
    if mode == "whole":
        return float(flops["whole"]) if "whole" in flops else None
    if mode == "slide":
        return float(slide_windows * flops["window"]) if "window" in flops and slide_windows else None
    if "coarse" in flops and "refine_per_window" in flops and windows_refined_mean is not None:
        return float(flops["coarse"] + windows_refined_mean * flops["refine_per_window"])
    return None


def floor_and_ratio(flops: float | None, peak_tflops: float | None,
                    ms: float | None) -> tuple[float | None, float | None]:
    """Compute floor in ms (FLOPs / peak) and the ratio measured ms / floor ms; None where an input is."""
    if not flops or not peak_tflops or ms is None:
        return None, None
    floor_ms = flops / (peak_tflops * 1e12) * 1e3
    return floor_ms, ms / floor_ms


def _tail(text: str, lines: int = TAIL_LINES) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def _log_tail(path: Path, lines: int = TAIL_LINES) -> str:
    try:
        return _tail(path.read_text(errors="replace"), lines)
    except OSError:
        return ""


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Write atomically: a reader (or a cut run) never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def _cuda_device(device: str) -> Any:
    """``cuda`` or ``cuda:N`` as a torch device with its index (``cuda`` is GPU 0), made current.

    Raises:
        RuntimeError: torch sees no CUDA device, or not that one.
    """
    import torch

    dev = torch.device(device if ":" in device else f"{device}:0")
    if not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} asked, but torch sees no CUDA device")
    if dev.index >= torch.cuda.device_count():
        raise RuntimeError(f"device {device!r} asked, but torch sees {torch.cuda.device_count()} CUDA device(s)")
    torch.cuda.set_device(dev)
    return dev


def _precision_peak(precision: str | None) -> str | None:
    """The matmul peak that bounds a precision: bf16 autocast → bf16, fp16 → fp16, fp32 → fp32 (TF32 off)."""
    return {"fp32": "fp32", "bf16": "bf16", "fp16": "fp16"}.get(precision or "")


# -- steps (each runs in its own process) --------------------------------------------------------------
def step_peak(device: str, dry: bool) -> dict[str, Any]:
    """Matrix throughput per precision (TFLOP/s, best and median of several square matmuls) and the device.

    CUDA: 8192³ products timed one by one with CUDA events after warm-up; fp32 with TF32 off, tf32, bf16
    and fp16. CPU: 512³ (dry) or 2048³ products timed by the wall clock, fp32 and bf16.
    """
    import torch

    cuda = device.startswith("cuda")
    n = 8192 if cuda else (512 if dry else 2048)
    reps = 10 if cuda else 5
    info: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": device,
                            "threads": torch.get_num_threads()}
    if cuda:
        dev = _cuda_device(device)
        device = str(dev)
        info["gpu"] = torch.cuda.get_device_name(dev)
        info["sm"] = torch.cuda.get_device_properties(dev).multi_processor_count
    peaks: dict[str, Any] = {}
    saved = torch.backends.cuda.matmul.allow_tf32
    kinds = (("fp32", torch.float32, False), ("tf32", torch.float32, True), ("bf16", torch.bfloat16, False),
             ("fp16", torch.float16, False)) if cuda else (("fp32", torch.float32, False),
                                                           ("bf16", torch.bfloat16, False))
    try:
        for name, dtype, tf32 in kinds:
            torch.backends.cuda.matmul.allow_tf32 = tf32
            a = torch.randn(n, n, device=device, dtype=dtype)
            b = torch.randn(n, n, device=device, dtype=dtype)
            for _ in range(3):
                torch.matmul(a, b)
            seconds = []
            for _ in range(reps):
                if cuda:
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    torch.matmul(a, b)
                    end.record()
                    end.synchronize()
                    seconds.append(start.elapsed_time(end) / 1e3)
                else:
                    t0 = time.perf_counter()
                    torch.matmul(a, b)
                    seconds.append(time.perf_counter() - t0)
            seconds.sort()
            flop = 2.0 * n ** 3
            # Six significant digits: a CPU's peak is a small fraction of a TFLOP/s.
            peaks[name] = {"best_tflops": float(f"{flop / seconds[0] / 1e12:.6g}"),
                           "median_tflops": float(f"{flop / seconds[len(seconds) // 2] / 1e12:.6g}")}
            del a, b
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
    return {"rows": {"peak": {"status": "ok", "peaks": peaks, "size": n, "reps": reps,
                              "timer": "CUDA events" if cuda else "wall clock"}}, "info": info}


def step_export(family: str, dry: bool, package: str, formats: list[str], threads: int | None = None) -> dict[str, Any]:
    """Export the family's benchmark package (``formats``, random weights, parity checked) to ``package``.

    ``threads``: torch's CPU threads for it (the cores the GPU steps running beside it do not need).
    """
    import torch

    from training import bench_models

    if threads:
        torch.set_num_threads(threads)
    preset, overrides, size = resolve(family, dry)
    start = time.perf_counter()
    card = bench_models.export_bench(preset, Path(package), size, overrides, formats=tuple(formats), overwrite=True)
    seconds = time.perf_counter() - start
    files = [g[f] for g in card["graphs"].values() for f in formats if g.get(f)]
    size_mb = sum((Path(package) / f).stat().st_size for f in files) / 1e6
    windows = card["inference"]["params"].get("windows")
    return {"rows": {"export": {
        "status": "ok", "seconds_export": round(seconds, 1), "mode": card["inference"]["mode"],
        "input": [card["input"]["height"], card["input"]["width"]], "flops": card["export"]["flops"],
        "windows": len(windows) if windows else None, "package_mb": round(size_mb, 1),
        "parity_ok": all(r["ok"] for r in card["export"]["parity"]), "formats": formats,
        "flops_text": bench_models.describe_flops(card["export"]["flops"], len(windows) if windows else None)}}}


def bench_parser() -> argparse.ArgumentParser:
    """``dgss-perception bench``'s own parser, without the rest of the command line.

    The full ``dgss-perception`` parser imports every sub-command, the bag tool's rosbags among them,
    which the GPU machine lacks; the bench itself needs neither rosbags nor rclpy.
    """
    from dgss_perception import bench

    parser = argparse.ArgumentParser(prog="dgss-perception")
    sub = parser.add_subparsers(dest="command", required=True)
    bench.add_parser(sub)
    return parser


def bench_takes_precision() -> bool:
    """Whether this checkout's bench has a ``--precision`` option (its ``--help`` lists it)."""
    sub = next(a for a in bench_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return "--precision" in sub.choices["bench"].format_help()


def step_bench(package: str, device: str, precision: str, frames: int, warmup: int, report: str,
               peak_gflops: float | None, row: str, backend: str = "torchscript",
               options: list[str] | None = None) -> dict[str, Any]:
    """``dgss-perception bench`` on the package (engine only; ``backend`` with bench ``options``); its key figures."""
    # The raw floor (DDS publishing) is not what this run measures, and a ROS 2 install on the GPU machine
    # would make it cost minutes: the bench skips it when rclpy does not import.
    sys.modules["rclpy"] = None  # type: ignore[assignment]
    from dgss_perception import bench

    argv = ["bench", "--model", package, "--backend", backend, *(options or []), "--device", device, "--no-node",
            "--width", str(FRAME[1]), "--height", str(FRAME[0]), "--frames", str(frames), "--warmup", str(warmup),
            "--json", report]
    if precision != "n/a":
        argv += ["--precision", precision]
    if peak_gflops:
        argv += ["--peak-gflops", f"{peak_gflops:.6g}"]
    args = bench_parser().parse_args(argv)
    code = bench.run_bench(args)
    if not Path(report).exists():
        raise RuntimeError(f"dgss-perception bench exited {code} without a report")
    r = json.loads(Path(report).read_text())
    eng, be, cf = r["engine"], r["backend"], r["compute_floor"]
    return {"rows": {row: {
        "status": "ok", "exit_code": code, "command": r["command"], "ms": eng["stages_ms"]["inference"]["median"],
        "ms_p90": eng["stages_ms"]["inference"]["p90"], "total_ms": eng["stages_ms"]["total"]["median"],
        "stages_ms": {k: v["median"] for k, v in eng["stages_ms"].items()}, "frames": eng["frames"],
        "warmup": eng["warmup"], "throughput_fps": eng["throughput_fps"],
        "windows_refined_mean": eng["windows_refined_mean"], "ran_at": be.get("precision"),
        "device_report": be.get("device_report"), "precision_note": be.get("precision_note"),
        "cuda_graph": be.get("cuda_graph"), "cuda_graph_notes": be.get("cuda_graph_notes") or None,
        "compile_seconds": be.get("compile_seconds"),
        "bench_floor_ms": cf.get("floor_ms"), "bench_ratio": cf.get("ratio"), "report": report}}}


def _graphs(cfg: Any, mode: str, size: tuple[int, int], weights: Path, device: str) -> dict[str, Any]:
    """The export wrappers of a package, eager, on ``device``: what its graphs compute (the card's interface)."""
    from training.export import load_export_model
    from training.export_wrappers import CoarseGraph, RefineGraph, SegmentationGraph, SlideGraph
    from training.inference import window_grid

    mean, std = cfg.model.mean, cfg.model.std
    if mode == "whole":
        return {"whole": SegmentationGraph(load_export_model(cfg, weights, size), mean, std).eval().to(device)}
    if mode == "slide":
        # One graph for the frame's windows, all in one batch, merged on the device: the engine's slide path
        # on a GPU (window graph over all windows, merge where the scores are).
        window = cfg.inference.window
        windows = window_grid(size[0], size[1], window, cfg.inference.stride)
        return {"slide": SlideGraph(load_export_model(cfg, weights, (window, window)), mean, std, size, windows,
                                    window).eval().to(device)}
    inf, window = cfg.inference, cfg.model.refine.window
    windows = window_grid(size[0], size[1], window, inf.stride)
    coarse_size = tuple(inf.coarse_size)
    return {"coarse": CoarseGraph(load_export_model(cfg, weights, coarse_size), mean, std, coarse_size, windows,
                                  window).eval().to(device),
            "refine": RefineGraph(load_export_model(cfg, weights, (window, window)), mean, std, size, windows,
                                  window).eval().to(device)}


def step_eager(family: str, dry: bool, device: str, variants: list[str], warmup: int, runs: int,
               compile_backend: str, package: str, emit: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Eager PyTorch of the family's graph(s): uint8 frame at the input size on the device → labels there.

    ``variants``: fp32 | bf16 (autocast) | compile_bf16 (``torch.compile`` with ``compile_backend``, bf16
    autocast). The model is the package's: the same config and seed-0 random weights as the export.
    Timed with CUDA events on a GPU (each run between two events, then synchronised), the wall clock on
    the CPU; coarse-to-fine picks its windows as the engine does (confident share below ``c_tau``).
    """
    import tempfile

    import cv2
    import torch

    from dgss_perception.benchutil import make_frames
    from training import bench_models

    preset, overrides, size = resolve(family, dry)
    cfg, size = bench_models.bench_config(preset, overrides, size)
    mode = preset.mode
    cuda = device.startswith("cuda")
    if cuda:
        device = str(_cuda_device(device))
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu_figures_") as tmp:
        weights = Path(tmp) / "weights.safetensors"
        bench_models.random_weights(cfg, weights, seed=0)  # export_bench's seed: the package's weights
        graphs = _graphs(cfg, mode, size, weights, device)
    build_s = time.perf_counter() - start
    card_path = Path(package) / "card.json"
    if card_path.exists():
        flops, flops_source = json.loads(card_path.read_text())["export"]["flops"], "card"
    else:  # no package (its export failed): the FLOPs it would carry, counted on the meta device
        flops, flops_source = bench_models.meta_flops(cfg, mode, size), "meta_flops"
    slide_windows = None
    if mode == "slide":
        from training.inference import window_grid

        slide_windows = len(window_grid(size[0], size[1], cfg.inference.window, cfg.inference.stride))
    frames = [cv2.resize(f, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
              for f in make_frames(FRAME[1], FRAME[0], POOL)]
    inputs = [torch.from_numpy(f)[None].to(device) for f in frames]
    theta = torch.tensor([cfg.inference.theta], device=device) if mode == "coarse_to_fine" else None
    c_tau = cfg.inference.c_tau if mode == "coarse_to_fine" else None
    rows: dict[str, Any] = {}
    for variant in variants:
        modules = graphs
        if variant.startswith("compile"):
            modules = {k: torch.compile(g, backend=compile_backend) for k, g in graphs.items()}
        refined: list[int] = []

        def run(x: torch.Tensor, modules: dict[str, Any] = modules, refined: list[int] = refined) -> Any:
            if mode != "coarse_to_fine":
                return next(iter(modules.values()))(x)[0]
            labels, _, coarse, fractions = modules["coarse"](x, theta)
            windows = torch.nonzero(fractions[0] < c_tau).flatten()
            refined.append(int(windows.numel()))  # the engine's host round trip, here a sync
            return modules["refine"](x, coarse, windows)[0] if refined[-1] else labels

        autocast = torch.autocast(device_type="cuda" if cuda else "cpu", dtype=torch.bfloat16,
                                  enabled=variant != "fp32")
        with torch.inference_mode(), autocast:
            timing = _timed(lambda i, run=run: run(inputs[i % POOL]), warmup, runs, cuda, after_warmup=refined.clear)
        rows[variant] = {
            "status": "ok", **timing, "frames": runs, "warmup": warmup, "build_s": round(build_s, 1),
            "windows_refined_mean": round(sum(refined) / len(refined), 3) if refined else None,
            "flops": flops, "flops_source": flops_source, "mode": mode, "windows": slide_windows,
            "graph": "+".join(type(g).__name__ for g in graphs.values()),
            "input": [1, size[0], size[1], 3],
            "compile_backend": compile_backend if variant.startswith("compile") else None,
            "timer": "CUDA events" if cuda else "wall clock"}
        emit(rows)
        if cuda:
            torch.cuda.empty_cache()
    return {"rows": rows}


def _timed(fn: Callable[[int], Any], warmup: int, runs: int, cuda: bool,
           after_warmup: Callable[[], Any] | None = None) -> dict[str, float]:
    """``fn(i)`` ``warmup`` times, then ``runs`` timed calls: median, min and p90 in ms, and the warm-up's seconds.

    On a GPU each call sits between two CUDA events and is synchronised; on the CPU the wall clock times it.
    """
    import torch

    t0 = time.perf_counter()
    for i in range(warmup):
        fn(i)
    if cuda:
        torch.cuda.synchronize()
    warmup_s = time.perf_counter() - t0
    if after_warmup is not None:
        after_warmup()
    times: list[float] = []
    for i in range(runs):
        if cuda:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn(i)
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end))
        else:
            t1 = time.perf_counter()
            fn(i)
            times.append((time.perf_counter() - t1) * 1e3)
    times.sort()
    return {"ms": round(statistics.median(times), 4), "ms_min": round(times[0], 4),
            "ms_p90": round(times[min(len(times) - 1, int(0.9 * len(times)))], 4), "warmup_s": round(warmup_s, 2)}


SCAN_ROWS = ("triton.fwd.fp32", "triton.fwd.bf16", "chunked.fwd.fp32", "mamba.fwd.fp32", "triton.fwdbwd.fp32",
             "chunked.fwdbwd.fp32")


def _scan_operands(shape: tuple[int, int, int, int], dtype: Any, device: str,
                   param_dtype: Any = None) -> dict[str, Any]:
    """MVFuser's scan operands at ``shape`` (N, D, L, S), seed 0: u, delta (N, D, L) and B, C (N, S, L) in
    ``dtype``; A (D, S) < 0, D and delta_bias (D,) in ``param_dtype`` (default float32, as the module's
    parameters), all on ``device``."""
    import torch

    n, d, length, s = shape
    g = torch.Generator().manual_seed(0)
    act = {"u": torch.randn(n, d, length, generator=g), "delta": torch.randn(n, d, length, generator=g) - 1.0,
           "B": torch.randn(n, s, length, generator=g), "C": torch.randn(n, s, length, generator=g)}
    # MVFuser's A: −(1 … S) per channel, the S4D-real start its A_log is initialised to.
    par = {"A": -torch.arange(1, s + 1, dtype=torch.float32).repeat(d, 1) * torch.rand(d, 1, generator=g).add(0.5),
           "D": torch.randn(d, generator=g), "delta_bias": torch.randn(d, generator=g) * 0.5}
    params = {k: v.to(device=device, dtype=param_dtype or torch.float32) for k, v in par.items()}
    return {**{k: v.to(device=device, dtype=dtype) for k, v in act.items()}, **params}


def step_scan(device: str, dry: bool, warmup: int, runs: int, emit: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """MFuser's selective scan alone at one fuser's shape (:data:`SCAN_SHAPE`; dry: :data:`DRY_SCAN_SHAPE`).

    Rows (``SCAN_ROWS``): the ``dgss::selective_scan`` op (on CUDA its Triton kernel; on the CPU, dry, the same
    kernel in Triton's interpreter) forward in fp32 and bf16, and forward + backward (its fused backward op);
    the exportable chunked scan (the ONNX / TorchScript path) forward and forward + backward; mamba-ssm's
    ``selective_scan_fn`` forward where it imports on CUDA. Each gives its error against the chunked scan in
    float64 on the same device: max |out − ref| / max |ref| (and the same over the eight gradients' worst).
    """
    import contextlib

    import torch

    from dgss_perception.ops.selective_scan import _load_kernel, selective_scan_chunked
    from dgss_perception.ops.selective_scan_triton import TRITON_AVAILABLE, interpreted_kernels, selective_scan_triton

    cuda = device.startswith("cuda")
    if cuda:
        device = str(_cuda_device(device))
    shape = DRY_SCAN_SHAPE if dry else SCAN_SHAPE
    names = ("u", "delta", "A", "B", "C", "D", "delta_bias")
    ref_in = {k: v.requires_grad_() for k, v in _scan_operands(shape, torch.float64, device, torch.float64).items()}
    ref_out = selective_scan_chunked(**ref_in, delta_softplus=True)
    grad_out = torch.randn(ref_out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(device)
    ref_grads = torch.autograd.grad(ref_out, [ref_in[k] for k in names], grad_out)
    ref_out = ref_out.detach()

    def error(got: torch.Tensor, want: torch.Tensor) -> float:
        return float((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-30))

    scans: dict[str, Callable[..., Any] | None] = {
        "triton": selective_scan_triton if TRITON_AVAILABLE else None,
        "chunked": selective_scan_chunked,
        "mamba": _load_kernel() if cuda else None,
    }
    why_not = {"triton": "Triton is not installed", "mamba": "mamba_ssm's kernel does not import here"
               if cuda else "mamba_ssm's kernel needs CUDA"}
    rows: dict[str, Any] = {}
    for rid in SCAN_ROWS:
        impl, kind, precision = rid.split(".")
        scan = scans[impl]
        if scan is None:
            rows[f"scan.{rid}"] = {"status": "skipped", "error": why_not[impl]}
            emit(rows)
            continue
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        x = _scan_operands(shape, dtype, device)
        # The interpreter is how the kernels run on CPU tensors (dry); elsewhere the op's CPU kernel is chunked.
        ctx = interpreted_kernels() if (impl == "triton" and not cuda) else contextlib.nullcontext()
        with ctx:
            if kind == "fwd":
                with torch.inference_mode():
                    out = scan(**x, delta_softplus=True)
                    timing = _timed(lambda i: scan(**x, delta_softplus=True), warmup, runs, cuda)
                err = error(out, ref_out)
            else:
                leaves = {k: v.requires_grad_() for k, v in x.items()}
                grad = grad_out.to(dtype)

                def step(i: int) -> Any:
                    return torch.autograd.grad(scan(**leaves, delta_softplus=True), [leaves[k] for k in names], grad)

                grads = step(0)
                timing = _timed(step, warmup, runs, cuda)
                err = max(error(g, r) for g, r in zip(grads, ref_grads))
        rows[f"scan.{rid}"] = {"status": "ok", **timing, "frames": runs, "warmup": warmup,
                               "max_rel_error": float(f"{err:.3g}"), "shape": list(shape),
                               "dtype": str(dtype).replace("torch.", ""),
                               "timer": "CUDA events" if cuda else "wall clock"}
        emit(rows)
    return {"rows": rows}


STEP_FUNCTIONS: dict[str, Callable[..., dict[str, Any]]] = {
    "peak": step_peak, "scan": step_scan, "export": step_export, "bench": step_bench, "eager": step_eager,
    "compile": step_eager}


# -- isolation -----------------------------------------------------------------------------------------
def child_main(kind: str, args: dict[str, Any], log: str, result: str) -> None:
    """Run one step with its output in ``log``; write ``{"rows": …, "error": …}`` to ``result``.

    Rows are written as they are measured (``emit``), so a step killed at its timeout keeps those.
    """
    try:
        os.setpgrp()  # the step and whatever it starts (compile workers) are killed together
    except OSError:  # spawned: already the leader of a session of its own
        pass
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    out: dict[str, Any] = {"rows": {}, "error": None}

    def emit(rows: dict[str, Any]) -> None:
        out["rows"].update(copy.deepcopy(rows))
        _write_json(Path(result), out)

    try:
        fn = STEP_FUNCTIONS[kind]
        extra = {"emit": emit} if kind in ("eager", "compile", "scan") else {}
        done = fn(**args, **extra)
        out["rows"].update(done.get("rows", {}))
        out["info"] = done.get("info")
    except BaseException:  # noqa: BLE001 - every failure is the step's result, recorded with its trace
        out["error"] = _tail(traceback.format_exc())
        print(traceback.format_exc(), file=sys.stderr, flush=True)
    _write_json(Path(result), out)


@dataclass
class Running:
    """A step started in its own process, and when it must end."""

    step: Step
    proc: Any
    isolation: str
    log: Path
    result: Path
    start: float
    timeout: float


def launch(step: Step, timeout: float, logs: Path, isolation: str) -> Running:
    """Start ``step`` in its own process (a fork of this one, or a fresh interpreter), to run at most ``timeout`` s."""
    log = logs / f"{step.name}.log"
    result = logs / f"{step.name}.result.json"
    for p in (log, result):
        p.unlink(missing_ok=True)
    start = time.perf_counter()
    if isolation == "fork":
        proc: Any = multiprocessing.get_context("fork").Process(
            target=child_main, args=(step.kind, step.args, str(log), str(result)), daemon=False)
        proc.start()
    else:
        spec = logs / f"{step.name}.spec.json"
        _write_json(spec, {"kind": step.kind, "args": step.args, "log": str(log), "result": str(result)})
        proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--child", str(spec)], cwd=ROOT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    return Running(step, proc, isolation, log, result, start, timeout)


def poll(run: Running) -> tuple[dict[str, Any], str, float] | None:
    """None while the step runs within its time; else its result, an outcome and the seconds it took.

    Outcome: ``done`` (the step's result says whether it failed), ``timeout`` (killed, with what it had
    written) or ``died`` (a signal, or an exit without a result).
    """
    fork = run.isolation == "fork"
    alive = run.proc.is_alive() if fork else run.proc.poll() is None
    if alive and time.perf_counter() - run.start < run.timeout:
        return None
    if alive:
        _kill_group(run.proc.pid)
        if fork:
            run.proc.join()
        else:
            run.proc.wait()
    elif fork:
        run.proc.join()  # reaped: its exit code is set
    seconds = time.perf_counter() - run.start
    try:
        data = json.loads(run.result.read_text())
    except (OSError, ValueError):
        data = {"rows": {}, "error": None}
    code = run.proc.exitcode if fork else run.proc.returncode
    if alive:
        outcome = "timeout"
    elif code != 0 or not run.result.exists():
        outcome = "died"
        data["error"] = data.get("error") or f"the step's process exited with {code}\n{_log_tail(run.log)}"
    else:
        outcome = "done"
    return data, outcome, seconds


def run_isolated(step: Step, timeout: float, logs: Path, isolation: str) -> tuple[dict[str, Any], str, float]:
    """Run ``step`` in its own process for at most ``timeout`` s and wait: :func:`poll`'s answer."""
    running = launch(step, timeout, logs, isolation)
    while (done := poll(running)) is None:
        time.sleep(POLL_S)
    return done


def _kill_group(pid: int) -> None:
    """SIGKILL the process group a step leads (the step and what it started)."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# -- plan, run, report ---------------------------------------------------------------------------------
def plan(families: list[Family], dry: bool, device: str, work: Path, precisions: list[str],
         compile_backend: str, compiled: set[str] | None = None,
         pt2_modes: list[str] | None = None) -> tuple[list[Step], list[dict[str, Any]]]:
    """Steps, most important first, and the report's rows (one per figure the steps make), all pending.

    ``compiled``: the families that get a ``torch.compile`` step (default: those whose :class:`Family` says so).
    ``pt2_modes``: the pt2 backend's runs per family (keys of :data:`PT2_MODES`; none: no pt2 program exported).
    Tiers (each family by family): 0 the peak and the scan; 1 each package, its first TorchScript bench and
    its first pt2 mode; 2 the other compiled pt2 modes; 3 eager references, the other precisions, the
    eager program; 4 the ``torch.compile`` references.
    """
    pt2_modes = list(pt2_modes or [])
    scan_runs, scan_warmup = (3, 1) if dry else (20, 5)
    tiers: list[list[Step]] = [[Step("peak", "peak", None, ["peak"], 60.0, {"device": device, "dry": dry}),
                                Step("scan", "scan", None, [f"scan.{r}" for r in SCAN_ROWS], 120.0,
                                     {"device": device, "dry": dry, "warmup": scan_warmup, "runs": scan_runs})],
                               [], [], [], []]
    rows = [{"id": "peak", "family": None, "step": "peak", "backend": "torch matmul", "precision": "all"}]
    rows += [{"id": f"scan.{r}", "family": None, "step": "scan", "precision": r.split(".")[2],
              "backend": f"{r.split('.')[0]} selective scan, {'forward' if r.split('.')[1] == 'fwd' else 'fwd + bwd'}"}
             for r in SCAN_ROWS]
    for fam in families:
        package = str(work / "packages" / fam.key)
        frames, warmup = (2, 1) if dry else (fam.frames, fam.warmup)
        runs, ewarm = (3, 1) if dry else (fam.frames, fam.warmup)
        formats = ["torchscript"] + (["pt2"] if pt2_modes else [])
        export = Step(f"{fam.key}.export", "export", fam.key, [f"{fam.key}.export"], fam.caps["export"],
                      {"family": fam.key, "dry": dry, "package": package, "formats": formats})
        tiers[1].append(export)
        rows.append({"id": f"{fam.key}.export", "family": fam.key, "step": "export", "backend": "+".join(formats),
                     "precision": "fp32"})
        bench = {"package": package, "device": device, "frames": frames, "warmup": warmup, "peak_gflops": None}
        for i, p in enumerate(precisions):
            rid = f"{fam.key}.bench.{p}"
            tiers[1 if i == 0 else 3].append(Step(
                rid, "bench", fam.key, [rid], fam.caps["bench"],
                {**bench, "precision": p, "report": str(work / "reports" / f"{fam.key}.{p}.json"), "row": rid},
                after=export.name))
            rows.append({"id": rid, "family": fam.key, "step": "bench", "backend": "torchscript (engine)",
                         "precision": p})
        for i, mode in enumerate(pt2_modes):
            rid = f"{fam.key}.pt2.{mode}"
            precision = precisions[0]  # bf16 where the bench takes it: the GPU's arithmetic
            options, label = PT2_MODES[mode]
            tier = 1 if i == 0 else 3 if mode == "none" else 2
            tiers[tier].append(Step(
                rid, "bench", fam.key, [rid], fam.caps["pt2"],
                {**bench, "precision": precision, "report": str(work / "reports" / f"{fam.key}.pt2.{mode}.json"),
                 "row": rid, "backend": "pt2", "options": options}, after=export.name))
            rows.append({"id": rid, "family": fam.key, "step": "bench", "backend": f"pt2 (engine, {label})",
                         "precision": precision})
        eager = {"family": fam.key, "dry": dry, "device": device, "warmup": ewarm, "runs": runs,
                 "compile_backend": compile_backend, "package": package}
        tiers[3].append(Step(f"{fam.key}.eager", "eager", fam.key, [f"{fam.key}.eager.fp32", f"{fam.key}.eager.bf16"],
                             fam.caps["eager"], {**eager, "variants": ["fp32", "bf16"]}))
        rows += [{"id": f"{fam.key}.eager.{v}", "family": fam.key, "step": "eager", "backend": "eager PyTorch",
                  "precision": v} for v in ("fp32", "bf16")]
        if fam.key in (compiled if compiled is not None else {f.key for f in FAMILIES if f.compile}):
            tiers[4].append(Step(f"{fam.key}.compile", "compile", fam.key, [f"{fam.key}.eager.compile_bf16"],
                                 fam.caps["compile"], {**eager, "variants": ["compile_bf16"]}))
            rows.append({"id": f"{fam.key}.eager.compile_bf16", "family": fam.key, "step": "compile",
                         "backend": f"torch.compile ({compile_backend})", "precision": "bf16"})
    steps = [s for tier in tiers for s in tier]
    for r in rows:
        r.update(status="pending", ms=None, floor_ms=None, ratio=None, error=None)
    # Shown family by family (peak and scan first), in the order of their steps.
    order = {rid: i for i, rid in enumerate(rid for s in steps for rid in s.rows)}
    rank = {f.key: i for i, f in enumerate(families)}
    rows.sort(key=lambda r: (-1 if r["family"] is None else rank[r["family"]], order[r["id"]]))
    return steps, rows


class Report:
    """The run's JSON and markdown, rewritten after every step."""

    def __init__(self, out: Path, meta: dict[str, Any], rows: list[dict[str, Any]]) -> None:
        self.out = out
        self.meta = meta
        self.rows = {r["id"]: r for r in rows}
        self.start = time.perf_counter()

    def row(self, rid: str) -> dict[str, Any]:
        return self.rows[rid]

    def peak_tflops(self, precision: str | None) -> float | None:
        key = _precision_peak(precision)
        peak = (self.meta.get("peak_tflops") or {}).get(key) if key else None
        return peak

    def fill_floor(self, row: dict[str, Any], card: dict[str, Any] | None) -> None:
        """FLOPs per frame, the peak at the row's arithmetic, the floor and the ratio (from the card if any)."""
        if row.get("ms") is None:
            return
        flops_dict, mode, windows = row.get("flops"), row.get("mode"), row.get("windows")
        if card is not None:
            flops_dict, mode = card["export"]["flops"], card["inference"]["mode"]
            windows = len(card["inference"]["params"].get("windows") or []) or None
        if not flops_dict or not mode:
            return
        precision = row.get("ran_at") or row["precision"]
        row["flops_per_frame"] = frame_flops(flops_dict, mode, row.get("windows_refined_mean"), windows)
        row["peak_key"] = _precision_peak(precision)
        row["peak_tflops"] = self.peak_tflops(precision)
        floor, ratio = floor_and_ratio(row["flops_per_frame"], row["peak_tflops"], row["ms"])
        row["floor_ms"] = None if floor is None else round(floor, 4)
        row["ratio"] = None if ratio is None else round(ratio, 3)

    def write(self) -> None:
        data = {"schema": SCHEMA, **self.meta, "elapsed_s": round(time.perf_counter() - self.start, 1),
                "rows": list(self.rows.values())}
        _write_json(self.out / "gpu_figures.json", data)
        tmp = self.out / "gpu_figures.md.tmp"
        tmp.write_text(markdown(data))
        os.replace(tmp, self.out / "gpu_figures.md")


def _num(value: Any, digits: int = 2) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        if value and abs(value) < 10 ** -digits:
            return f"{value:.2g}"
        return f"{value:.{digits}f}"
    return str(value)


def markdown(data: dict[str, Any]) -> str:
    """The report as markdown: what ran where, then one table row per figure (or its error)."""
    info = data.get("device_info") or {}
    peaks = data.get("peak_tflops") or {}
    lines = [
        "# GPU figures" + (" (dry run: CPU, shrunk towers; not figures)" if data["dry"] else ""),
        "",
        f"- device: {info.get('gpu') or data['device']} ({data['device']}); host: {data['host']['summary']}",
        f"- date: {data['date']}; elapsed {data['elapsed_s']} s of a {data['budget_s']:g} s budget",
        f"- torch {info.get('torch') or data.get('torch')}" + (f", CUDA {info['cuda']}" if info.get("cuda") else ""),
        f"- command: `{data['command']}`",
        "- peak (TFLOP/s, best of the timed matmuls): " + (", ".join(f"{k} {v:.4g}" for k, v in peaks.items())
                                                           or "n/a"),
        f"- frames: {FRAME[1]}x{FRAME[0]} rgb8. bench = the engine's inference median (`dgss-perception bench "
        "--no-node`, frame upload and label download included; the commands below); eager = the export "
        "wrapper in eager PyTorch, uint8 frame at the graph's input size already on the device → labels on "
        "the device, median of the timed runs (CUDA events on a GPU). scan = one MFuser fuser's selective scan "
        "alone, error against the chunked scan in float64.",
        "- floor = FLOPs per frame (card `export.flops`) / peak at the row's precision (fp32: TF32 off); "
        "ratio = ms / floor.",
        *(f"- {note}" for note in data.get("notes", [])),
        "",
        "| family | step | backend | precision | ms | floor ms | ratio | status |",
        "| --- | --- | --- | --- | ---: | ---: | ---: | --- |",
    ]
    for r in data["rows"]:
        if r["step"] == "peak" and r["status"] == "ok":
            status = "ok: " + ", ".join(f"{k} {v['best_tflops']:.4g} (median {v['median_tflops']:.4g})"
                                        for k, v in r["peaks"].items())
        elif r["status"] == "ok":
            extra = []
            if r.get("seconds_export") is not None:
                extra.append(f"{r['seconds_export']} s, {r.get('package_mb')} MB, parity "
                             f"{'ok' if r.get('parity_ok') else 'failed'}; {r.get('flops_text')}")
            if r.get("ran_at") and r["ran_at"] != r["precision"]:
                extra.append(f"ran at {r['ran_at']}")
            if r.get("windows_refined_mean") is not None:
                extra.append(f"{r['windows_refined_mean']} windows refined")
            if r.get("total_ms") is not None:
                extra.append(f"engine total {_num(r['total_ms'])} ms")
            if r.get("warmup_s") is not None and r["step"] == "compile":
                extra.append(f"warm-up (compile) {r['warmup_s']} s")
            if r.get("compile_seconds"):
                extra.append(f"load + compile {sum(r['compile_seconds'].values()):.1f} s")
            if r.get("cuda_graph"):
                extra.append("CUDA graphs")
            if r.get("max_rel_error") is not None:
                extra.append(f"max rel. error {r['max_rel_error']:.2g} ({r['dtype']}, shape {r['shape']})")
            status = "ok" + (f" ({'; '.join(extra)})" if extra else "")
        else:
            error = (r.get("error") or "").strip().splitlines()
            status = r["status"] + (f": {error[-1]}" if error else "")
        status = status.replace("|", "\\|")
        lines.append(f"| {r['family'] or '—'} | {r['step']} | {r['backend']} | {r['precision']} | {_num(r['ms'])} | "
                     f"{_num(r['floor_ms'], 3)} | {_num(r['ratio'])} | {status} |")
    commands = [(r["id"], r["command"]) for r in data["rows"] if r.get("command")]
    if commands:
        lines += ["", "Commands:", ""] + [f"- {rid}: `{cmd}`" for rid, cmd in commands]
    errors = [(r["id"], r["error"]) for r in data["rows"] if r.get("error")]
    if errors:
        lines += ["", "Errors (last lines):", ""]
        for rid, err in errors:
            lines += [f"{rid}:", "", "```", err.strip(), "```", ""]
    return "\n".join(lines).rstrip() + "\n"


def export_command(fam: Family, dry: bool, package: str, formats: list[str]) -> str:
    """The bench_models command line that makes the same package (dry: plus the config edit it cannot say)."""
    preset, overrides, size = (fam.dry_preset, DRY_OVERRIDES, fam.dry_size) if dry else (fam.preset, {}, fam.size)
    cmd = ["python3", "-m", "training.bench_models", "--preset", preset, "--out", package, "--formats",
           ",".join(formats), "--overwrite"]
    if size:
        cmd += ["--height", str(size[0]), "--width", str(size[1])]
    if overrides:
        cmd += ["--override", *(f"{k}={v}" for k, v in overrides.items())]
    text = shlex.join(cmd)
    if dry and fam.dry_config:
        text += f"  # plus config {json.dumps(fam.dry_config, separators=(',', ':'))}"
    return text


def run(args: argparse.Namespace) -> int:
    """Plan the steps, run them in order within the budget, and keep the report current."""
    start = time.perf_counter()
    deadline = start + args.budget_s
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    logs = work / "logs"
    for d in (logs, work / "reports", work / "packages"):
        d.mkdir(parents=True, exist_ok=True)
    for old in (work / "reports").glob("*.json"):  # the bench never overwrites a report
        old.unlink()
    device = args.device or ("cpu" if args.dry else "cuda")
    compile_backend = args.compile_backend or ("aot_eager" if args.dry else "inductor")
    families = [family_of(k) for k in args.families.split(",")] if args.families else list(FAMILIES)
    notes = ["ONNX Runtime is not measured: on the GPU machine it is the CPU-only build, and the PyTorch paths "
             "(TorchScript, pt2) are the ones measured on the GPU (packages are exported without ONNX)."]
    pt2_modes = [] if args.pt2 == "off" else (args.pt2 or (PT2_DRY_DEFAULT if args.dry else PT2_DEFAULT)).split(",")
    # A cold cache of compiled programs of this run's own: the pt2 rows' compile seconds are what a first
    # start on this machine costs.
    os.environ.setdefault("DGSS_TORCH_CACHE", str(work / "torch_cache"))
    try:
        takes_precision = bench_takes_precision()
    except Exception as exc:  # noqa: BLE001 - the bench's own steps will record what is wrong with it
        takes_precision = False
        notes.append(f"the bench's parser could not be built: {exc}")
    precisions = ["bf16", "fp32"] if takes_precision else ["n/a"]
    if not takes_precision:
        notes.append("this bench has no --precision flag: bench rows ran at its default precision (n/a)")
    if args.isolation == "fork":
        _preimport()
        import torch

        # A fork copies no threads (locks they held would stay held) and no usable CUDA context.
        if threading.active_count() > 1 or torch.cuda.is_initialized():
            args.isolation = "spawn"
            notes.append("the imports started threads or CUDA: each step ran in a fresh interpreter, not a fork")
    compiled = None if args.compile == "all" else set() if args.compile == "none" else set(args.compile.split(","))
    steps, rows = plan(families, args.dry, device, work, precisions, compile_backend, compiled, pt2_modes)
    export_threads = None
    if not args.serial and device.startswith("cuda"):
        # Two cores left to the GPU steps beside the exports: their frames' decoding and their launches.
        export_threads = max(1, (os.cpu_count() or 2) - 2)
        notes.append(f"the packages were exported on {export_threads} CPU threads while the GPU steps ran "
                     "(--serial: one step at a time)")
    for s in steps:
        if s.kind == "export":
            s.args["threads"] = export_threads
    from dgss_perception.benchutil import device_info

    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": shlex.join(["python3", "scripts/gpu_figures.py", *sys.argv[1:]]), "dry": args.dry,
            "device": device, "host": device_info(), "torch": _version("torch"), "budget_s": args.budget_s,
            "isolation": args.isolation, "compile_backend": compile_backend, "bench_precision_flag": takes_precision,
            "pt2_modes": pt2_modes, "torch_cache": os.environ["DGSS_TORCH_CACHE"], "serial": args.serial,
            "frame": [FRAME[0], FRAME[1]], "work": str(work), "notes": notes, "peak_tflops": None,
            "device_info": None}
    report = Report(out, meta, rows)
    report.start = start
    for s in steps:
        if s.kind == "export":
            report.row(s.rows[0])["command"] = export_command(family_of(s.family), args.dry, s.args["package"],
                                                              s.args["formats"])
    report.write()
    failed: set[str] = set()
    finished: set[str] = set()
    min_step = DRY_MIN_STEP_S if args.dry else MIN_STEP_S
    # Two lanes: the exports (CPU work) one after another, and everything else (the GPU's) in order, each
    # step waiting for the package it needs; --serial runs one step at a time.
    lanes = [[s for s in steps if s.kind == "export"], [s for s in steps if s.kind != "export"]]
    if args.serial:
        lanes = [list(steps)]
    running: list[Running | None] = [None] * len(lanes)

    def skip_reason(step: Step) -> str | None:
        left = deadline - time.perf_counter()
        missing = [m for m in (family_of(step.family).needs if step.family else ())
                   if importlib.util.find_spec(m) is None]
        if missing:
            return f"{', '.join(missing)} not importable here"
        if step.after in failed:
            return f"{step.after} failed"
        if left < min(step.cap_s, min_step):
            return f"out of budget ({max(left, 0.0):.0f} s left)"
        return None

    def begin(step: Step) -> Running | None:
        reason = skip_reason(step)
        if reason:
            failed.add(step.name)
            finished.add(step.name)
            for rid in step.rows:
                report.row(rid).update(status="skipped", error=reason)
            report.write()
            return None
        if step.kind == "bench":
            peak = report.peak_tflops(step.args["precision"])
            step.args["peak_gflops"] = peak * 1e3 if peak else None
        for rid in step.rows:
            report.row(rid).update(status="running", started_s=round(time.perf_counter() - start, 2))
        report.write()
        limit = min(step.cap_s, deadline - time.perf_counter())
        print(f"[{time.perf_counter() - start:6.1f} s] {step.name} (limit {limit:.0f} s) …", flush=True)
        return launch(step, limit, logs, args.isolation)

    def end(step: Step, data: dict[str, Any], outcome: str, seconds: float) -> None:
        if step.kind == "peak" and not data["rows"] and device.startswith("cuda") and args.isolation == "fork":
            # The first GPU step failed in a fork: should CUDA not start in forks here, a fresh interpreter
            # saves the run (the retry fails the same way where the GPU itself is the trouble).
            left = deadline - time.perf_counter()
            retry, retry_outcome, retry_s = run_isolated(step, min(step.cap_s, left), logs, "spawn")
            if retry["rows"]:
                data, outcome, seconds = retry, retry_outcome, retry_s
                args.isolation = "spawn"
                notes.append("the peak step failed in a fork and ran in a fresh interpreter: every step was spawned")
        # The log's tail: the traceback (printed last) and what the step said before it (the bench's own error).
        tail = _log_tail(logs / f"{step.name}.log")
        error = None
        if outcome == "timeout":
            error = f"timed out after {seconds:.0f} s\n{tail}"
        elif data.get("error"):
            error = tail or data["error"]
        if step.kind == "peak" and "peak" in data["rows"]:
            peaks = data["rows"]["peak"]["peaks"]
            meta["peak_tflops"] = {k: v["best_tflops"] for k, v in peaks.items()}
            meta["device_info"] = data.get("info")
        card_path = work / "packages" / step.family / "card.json" if step.family else None
        card = json.loads(card_path.read_text()) if card_path and card_path.exists() else None
        for rid in step.rows:
            row = report.row(rid)
            got = data["rows"].get(rid.rsplit(".", 1)[-1] if step.kind in ("eager", "compile") else
                                   ("export" if step.kind == "export" else rid))
            if got:
                row.update(got)
                row["seconds"] = round(seconds, 1)
                report.fill_floor(row, card if step.kind in ("bench", "eager", "compile") else None)
            else:
                row.update(status="timeout" if outcome == "timeout" else "error",
                           error=error or "the step ended without this figure", seconds=round(seconds, 1))
                failed.add(step.name)
        for rid in step.rows:
            report.row(rid)["ended_s"] = round(time.perf_counter() - start, 2)
        finished.add(step.name)
        print(f"[{time.perf_counter() - start:6.1f} s] {step.name}: {outcome} in {seconds:.1f} s"
              + ("" if not error else f" — {error.strip().splitlines()[-1]}"), flush=True)
        report.write()

    while any(lanes) or any(running):
        for i, lane in enumerate(lanes):
            current = running[i]
            if current is not None:
                done = poll(current)
                if done is None:
                    continue
                running[i] = None
                end(current.step, *done)
            # The lane's next step, unless it waits for a package still being made.
            while lane and running[i] is None and (lane[0].after is None or lane[0].after in finished):
                running[i] = begin(lane.pop(0))
        time.sleep(POLL_S)
    report.write()
    print(f"wrote {out / 'gpu_figures.json'} and {out / 'gpu_figures.md'} in {time.perf_counter() - start:.0f} s")
    return 0


def _version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _preimport() -> None:
    """Import what the steps use once, here, so that each forked step starts without paying for it.

    Nothing here touches the GPU: CUDA is initialised in the steps only (a CUDA context does not survive
    a fork). Where the imports start threads, forking is unsafe: :func:`run` then spawns instead.
    """
    # Should an import ask whether CUDA is there, NVML answers without initialising the driver in this process.
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    for name in ("torch", "cv2", "training.bench_models", "training.export", "training.export_wrappers",
                 "dgss_perception.bench", "dgss_perception.engine", "dgss_perception.backends"):
        try:
            __import__(name)
        except Exception:  # noqa: BLE001 - the steps that need it record the error
            pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 scripts/gpu_figures.py", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="directory for gpu_figures.json and gpu_figures.md")
    parser.add_argument("--dry", action="store_true", help="CPU, shrunk towers, a few frames (the test's mode)")
    parser.add_argument("--budget-s", type=float, default=420.0, help="wall-clock budget of the run (default 420)")
    parser.add_argument("--device", help="cuda | cuda:N | cpu (default cuda; cpu with --dry)")
    parser.add_argument("--families", help=f"comma list of families to run (default all: {', '.join(FAMILY_KEYS)})")
    parser.add_argument("--work", help="packages, bench reports and step logs (default /tmp/gpu_figures_work)")
    parser.add_argument("--isolation", choices=("fork", "spawn"), default="fork",
                        help="run each step in a fork of this process (default: no import per step) or a fresh "
                             "interpreter")
    parser.add_argument("--compile", default="all", metavar="FAMILIES",
                        help="families that get a torch.compile step: all (default: all but MFuser), none, or a "
                             "comma list")
    parser.add_argument("--compile-backend", help="torch.compile backend (default inductor; aot_eager with --dry)")
    parser.add_argument("--pt2", metavar="MODES",
                        help=f"the pt2 backend's runs per family, a comma list of {', '.join(PT2_MODES)}, or off (no "
                             f"pt2 programs exported); default {PT2_DEFAULT} ({PT2_DRY_DEFAULT} with --dry)")
    parser.add_argument("--serial", action="store_true",
                        help="one step at a time (default: the packages are exported on the CPU beside the GPU steps)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        spec = json.loads(Path(args.child).read_text())
        child_main(spec["kind"], spec["args"], spec["log"], spec["result"])
        return 0
    if not args.out:
        parser.error("--out is required")
    if not (math.isfinite(args.budget_s) and args.budget_s > 0):
        parser.error(f"--budget-s must be positive, got {args.budget_s}")
    try:
        for text in (args.families, None if args.compile in ("all", "none") else args.compile):
            [family_of(k) for k in (text.split(",") if text else [])]
    except ValueError as exc:
        parser.error(str(exc))
    if args.pt2 and args.pt2 != "off":
        modes = args.pt2.split(",")
        unknown = [m for m in modes if m not in PT2_MODES]
        if unknown or len(set(modes)) != len(modes):
            parser.error(f"--pt2 {args.pt2!r}: a comma list of distinct {', '.join(PT2_MODES)}, or off")
    args.work = args.work or "/tmp/gpu_figures_work"
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
