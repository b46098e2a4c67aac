"""Export a trained model to a model package: ONNX + TorchScript + card.json.

    python -m training.export --run runs/demo_vfmnet_tiny --out model_pkg

Every graph is checked against eager PyTorch on fresh random input; the
export fails (exit code 1) when a graph differs beyond tolerance, printing
the maximum difference either way.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dgss_perception.card import write_card
from dgss_perception.labels import CITYSCAPES_CLASSES, CITYSCAPES_PALETTE

from .backbones.lora import merge_lora
from .build import build_vfmnet
from .checkpoint import load_state_dict_file
from .config import TrainConfig, load_config
from .export_wrappers import SegmentationGraph

GRAPH = "whole"


class ParityError(RuntimeError):
    """An exported graph that does not reproduce eager PyTorch."""


def fit_state_to_model(state: dict[str, torch.Tensor], model: nn.Module,
                       trained_size: tuple[int, int]) -> dict[str, torch.Tensor]:
    """Resample absolute positional embeddings from the training grid to the model's (export at another size)."""
    from timm.layers import resample_abs_pos_embed

    own = model.state_dict()
    state = dict(state)
    for key, value in state.items():
        if key.endswith("pos_embed") and key in own and own[key].shape != value.shape:
            vit = model.get_submodule(key.rsplit(".", 1)[0])
            prefix = 0 if getattr(vit, "no_embed_class", False) else vit.num_prefix_tokens
            patch = vit.patch_embed.patch_size
            old = [trained_size[0] // patch[0], trained_size[1] // patch[1]]
            state[key] = resample_abs_pos_embed(value, new_size=list(vit.patch_embed.grid_size), old_size=old,
                                                num_prefix_tokens=prefix, verbose=False)
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"checkpoint does not fit the configured model: missing {missing[:8]} ({len(missing)}), "
                         f"unexpected {unexpected[:8]} ({len(unexpected)})")
    return state


def load_export_model(cfg: TrainConfig, weights: Path, size: tuple[int, int]) -> nn.Module:
    """The trained model at ``size`` with LoRA merged into the backbone, in eval mode."""
    model = build_vfmnet(cfg.model, img_size=size, with_lora=True, load_weights=False)
    model.load_state_dict(fit_state_to_model(load_state_dict_file(weights), model, tuple(cfg.model.img_size)))
    merge_lora(model)
    return model.eval()


def export_onnx(graph: nn.Module, example: torch.Tensor, path: Path, output_names: list[str], opset: int) -> None:
    import onnx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(graph, (example,), dynamo=True, opset_version=opset,
                                    input_names=["image"], output_names=output_names, verbose=False)
    program.save(str(path))
    onnx.checker.check_model(str(path))


def export_torchscript(graph: nn.Module, example: torch.Tensor, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(graph, (example,), check_trace=False)
    traced.save(str(path))


def compare(name: str, got: list[np.ndarray], ref: list[np.ndarray], ref_probs: np.ndarray, output_kind: str,
            atol: float) -> dict[str, Any]:
    """Compare a graph's outputs with eager ones; labels may differ only where the top-2 classes tie."""
    if output_kind == "logits":
        diff = float(np.abs(got[0] - ref[0]).max())
        return {"graph": name, "max_abs_diff": diff, "ok": diff <= atol * max(1.0, float(np.abs(ref[0]).max()))}
    conf_diff = float(np.abs(got[1].astype(np.float32) - ref[1]).max())
    mismatch = got[0] != ref[0]
    top2 = np.sort(ref_probs, axis=1)[:, -2:]
    tie = (top2[:, 1] - top2[:, 0]) <= 2 * atol
    bad = int((mismatch & ~tie).sum())
    return {"graph": name, "max_abs_diff": conf_diff, "label_mismatch": int(mismatch.sum()),
            "label_mismatch_not_tied": bad, "ok": conf_diff <= atol and bad == 0}


def run_parity(graph: nn.Module, onnx_path: Path | None, ts_path: Path | None, size: tuple[int, int],
               output_kind: str, atol: float, seed: int, batch: int = 1) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, size=(batch, *size, 3), dtype=np.uint8)
    with torch.no_grad():
        ref = [t.numpy() for t in graph(torch.from_numpy(image))]
        probs_graph = SegmentationGraph(graph.model, graph.mean, graph.std, "logits")
        ref_probs = torch.softmax(probs_graph(torch.from_numpy(image))[0], dim=1).numpy()
    results = []
    if onnx_path is not None:
        import onnxruntime as ort

        sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        results.append(compare("onnx", sess.run(None, {"image": image}), ref, ref_probs, output_kind, atol))
    if ts_path is not None:
        module = torch.jit.load(str(ts_path))
        with torch.no_grad():
            out = [t.numpy() for t in module(torch.from_numpy(image))]
        results.append(compare("torchscript", out, ref, ref_probs, output_kind, atol))
    for r in results:
        r["seed"] = seed
    return results


def tensor_specs(size: tuple[int, int], num_classes: int, output_kind: str, batch: int = 1) -> tuple[list, list]:
    h, w = size
    n = batch
    inputs = [{"name": "image", "dtype": "uint8", "shape": [n, h, w, 3]}]
    if output_kind == "logits":
        outputs = [{"name": "logits", "dtype": "float32", "shape": [n, num_classes, h, w]}]
    else:
        outputs = [{"name": "labels", "dtype": "uint8", "shape": [n, h, w]},
                   {"name": "confidence", "dtype": "float32", "shape": [n, h, w]}]
    return inputs, outputs


def export_package(cfg: TrainConfig, weights: Path, out: Path, size: tuple[int, int] | None = None,
                   output_kind: str = "labels_confidence", formats: tuple[str, ...] = ("onnx", "torchscript"),
                   opset: int = 18, atol: float = 1e-4, overwrite: bool = False, name: str | None = None,
                   batch: int = 1) -> dict:
    """Write a model package to ``out``; raise ParityError when a graph disagrees with eager PyTorch.

    ``batch`` fixes the graphs' batch size: a node serving several cameras runs up to that many
    frames in one inference.
    """
    if batch < 1:
        raise ValueError(f"batch must be ≥ 1, got {batch}")
    size = tuple(size or cfg.model.img_size)
    if out.exists():
        if not overwrite:
            raise FileExistsError(f"{out} exists (pass --overwrite to replace it)")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    model = load_export_model(cfg, weights, size)
    graph = SegmentationGraph(model, cfg.model.mean, cfg.model.std, output_kind).eval()
    inputs, outputs = tensor_specs(size, cfg.model.num_classes, output_kind, batch)
    example = torch.zeros((batch, *size, 3), dtype=torch.uint8)
    onnx_name = f"{GRAPH}.onnx" if "onnx" in formats else None
    ts_name = f"{GRAPH}.ts" if "torchscript" in formats else None
    if onnx_name:
        export_onnx(graph, example, out / onnx_name, [o["name"] for o in outputs], opset)
    if ts_name:
        export_torchscript(graph, example, out / ts_name)
    seed = int.from_bytes(os.urandom(4), "little")
    parity = run_parity(graph, out / onnx_name if onnx_name else None, out / ts_name if ts_name else None,
                        size, output_kind, atol, seed, batch)

    import onnx
    import timm

    n = cfg.model.num_classes
    classes = list(CITYSCAPES_CLASSES) if n == 19 else [f"class_{i}" for i in range(n)]
    palette = [list(c) for c in CITYSCAPES_PALETTE][: cfg.model.num_classes]
    card = {
        "name": name or cfg.name,
        "family": cfg.model.family,
        "backbones": [cfg.model.backbone.name],
        "classes": classes,
        "palette": palette,
        "ignore_index": 255,
        "input": {"height": size[0], "width": size[1], "channel_order": "RGB", "layout": "NHWC",
                  "dtype": "uint8", "resize": "stretch", "normalization": "in_graph",
                  "mean": list(cfg.model.mean), "std": list(cfg.model.std)},
        "inference": {"mode": GRAPH, "params": {}},
        "graphs": {GRAPH: {"onnx": onnx_name, "torchscript": ts_name, "inputs": inputs, "outputs": outputs,
                           "output_kind": output_kind}},
        "precision": "fp32",
        "export": {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                   "torch": torch.__version__, "timm": timm.__version__, "onnx": onnx.__version__,
                   "opset": opset, "weights": str(weights), "parity": parity,
                   "backbone": {"name": cfg.model.backbone.name, "overrides": cfg.model.backbone.overrides,
                                "lora": "merged" if cfg.model.backbone.lora else None}},
    }
    failed = [r for r in parity if not r["ok"]]
    if failed:
        # No card: the runtime must not load graphs that failed parity.
        (out / "parity_report.json").write_text(json.dumps(parity, indent=2) + "\n")
        raise ParityError(f"exported graph(s) differ from eager PyTorch beyond tolerance {atol}: {failed}")
    write_card(out, card)
    return card


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", help="training run directory (config.yaml + model.safetensors)")
    parser.add_argument("--config", help="training config (default <run>/config.yaml)")
    parser.add_argument("--weights", help="weights file (default <run>/model.safetensors)")
    parser.add_argument("--out", required=True, help="model package directory to write")
    parser.add_argument("--height", type=int, help="export input height (default: training size)")
    parser.add_argument("--width", type=int, help="export input width (default: training size)")
    parser.add_argument("--output-kind", choices=("labels_confidence", "logits"), default="labels_confidence")
    parser.add_argument("--formats", default="onnx,torchscript", help="comma list of onnx, torchscript")
    parser.add_argument("--batch", type=int, default=1, help="fixed batch size of the graphs (cameras per inference)")
    parser.add_argument("--opset", type=int, default=18)
    parser.add_argument("--atol", type=float, default=1e-4, help="parity tolerance")
    parser.add_argument("--name", help="package name (default: the config's name)")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    if not (args.run or (args.config and args.weights)):
        parser.error("give --run, or both --config and --weights")
    try:
        cfg = load_config(args.config or Path(args.run) / "config.yaml")
        weights = Path(args.weights or Path(args.run) / "model.safetensors")
        size = (args.height or cfg.model.img_size[0], args.width or cfg.model.img_size[1])
        formats = tuple(f.strip() for f in args.formats.split(",") if f.strip())
        if not formats or set(formats) - {"onnx", "torchscript"}:
            parser.error(f"--formats must list onnx and/or torchscript, got {args.formats!r}")
        card = export_package(cfg, weights, Path(args.out), size, args.output_kind, formats, args.opset,
                              args.atol, args.overwrite, args.name, args.batch)
    except ParityError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (FileNotFoundError, FileExistsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for r in card["export"]["parity"]:
        print(f"parity {r['graph']}: max abs diff {r['max_abs_diff']:.3g} "
              f"({'ok' if r['ok'] else 'FAILED'})")
    print(f"wrote {args.out}: {json.dumps(card['graphs'][GRAPH])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
