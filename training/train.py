"""Train a segmentation model from a config file.

    python -m training.train --config training/configs/demo_tiny.yaml --run-dir runs/demo

Writes to the run directory: config.yaml (the effective config), metrics.jsonl,
checkpoints/last.pt (resumable; loaded with weights_only=True), and
model.safetensors (the final weights, which ``training.export`` reads).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from dgss_perception.metrics import confusion_matrix, mean_iou

from .build import build_vfmnet
from .checkpoint import load_torch_file
from .config import TrainConfig, config_to_dict, load_config
from .data.datasets import Sample, find_samples, read_rgb, read_train_ids
from .data.transforms import eval_transform, train_transform
from .models.preprocess import normalize
from .objectives import compute_loss


class SegmentationDataset(Dataset):
    """Samples → (image uint8 (3,H,W), labels int64 (H,W)) after training augmentation."""

    def __init__(self, samples: list[Sample], cfg: TrainConfig) -> None:
        self.samples = samples
        self.size = tuple(cfg.model.img_size)
        self.data = cfg.data
        self.seed = cfg.seed

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        # Fresh randomness per draw; torch seeds each worker's stream, so runs are reproducible.
        rng = np.random.default_rng([self.seed, index, int(torch.randint(0, 2**31 - 1, (1,)))])
        sample = self.samples[index]
        image, labels = train_transform(read_rgb(sample.image), read_train_ids(sample.label), self.size,
                                        tuple(self.data.scale_range), self.data.flip, self.data.photometric, rng)
        return torch.from_numpy(image).permute(2, 0, 1), torch.from_numpy(labels.astype(np.int64))


def set_trainable(model: nn.Module, finetune: str) -> None:
    """Training policy lives here, not in the model: which backbone weights learn."""
    if finetune not in ("lora", "full", "frozen"):
        raise ValueError(f"backbone.finetune must be lora, full or frozen, got {finetune!r}")
    for name, p in model.backbone.named_parameters():
        p.requires_grad = finetune == "full" or (finetune == "lora" and "lora_" in name)
    for p in model.head.parameters():
        p.requires_grad = True


def poly_warmup(step: int, warmup: int, total: int, power: float) -> float:
    """LR factor: linear warm-up to 1, then polynomial decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, 1 - (step - warmup) / max(1, total - warmup)) ** power


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    groups = [
        {"params": [p for p in model.backbone.parameters() if p.requires_grad], "lr": cfg.optim.lr_backbone},
        {"params": [p for p in model.head.parameters() if p.requires_grad], "lr": cfg.optim.lr_head},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=cfg.optim.weight_decay)


@torch.no_grad()
def evaluate_samples(model: nn.Module, samples: list[Sample], cfg: TrainConfig, device: torch.device) -> dict:
    """mIoU per domain (whole-image inference at the network size, logits resized to the label)."""
    model.eval()
    confs: dict[str, np.ndarray] = {}
    for sample in samples:
        image = eval_transform(read_rgb(sample.image), tuple(cfg.model.img_size))
        labels = read_train_ids(sample.label)
        x = torch.from_numpy(image).permute(2, 0, 1)[None].float().to(device)
        logits = model(normalize(x, cfg.model.mean, cfg.model.std))
        logits = F.interpolate(logits, size=labels.shape, mode="bilinear", align_corners=False)
        pred = logits.argmax(1)[0].cpu().numpy()
        c = confusion_matrix(pred, labels, cfg.model.num_classes)
        confs[sample.domain] = confs.get(sample.domain, 0) + c
    model.train()
    return {domain: mean_iou(c) for domain, c in sorted(confs.items())}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def train(cfg: TrainConfig, run_dir: Path, resume: bool = True, progress: bool = True) -> dict:
    """Run training; returns a summary with the final loss and validation mIoU."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "checkpoints").mkdir(exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)

    model = build_vfmnet(cfg.model).to(device)
    set_trainable(model, cfg.model.backbone.finetune)
    optimizer = build_optimizer(model, cfg)
    o = cfg.optim
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: poly_warmup(s, o.warmup_iters, o.iters, o.poly_power))

    step = 0
    last = run_dir / "checkpoints" / "last.pt"
    if resume and last.is_file():
        state = load_torch_file(last)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step = int(state["step"])
        torch.set_rng_state(state["rng"])

    samples = find_samples(cfg.data.layout, cfg.data.root, cfg.data.split, cfg.data.conditions or None)
    loader = DataLoader(SegmentationDataset(samples, cfg), batch_size=o.batch_size, shuffle=True, drop_last=True,
                        num_workers=cfg.num_workers, persistent_workers=cfg.num_workers > 0)
    if len(loader) == 0:
        raise ValueError(f"{len(samples)} samples are fewer than one batch of {o.batch_size}")

    amp = cfg.amp == "bf16"
    log = open(run_dir / "metrics.jsonl", "a")
    bar = tqdm(total=o.iters, initial=step, desc=cfg.name, disable=not progress, dynamic_ncols=True)
    model.train()
    batches = iter(loader)
    loss_value = math.nan
    t0 = time.time()
    while step < o.iters:
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for _ in range(o.grad_accum):
            try:
                images, labels = next(batches)
            except StopIteration:
                batches = iter(loader)
                images, labels = next(batches)
            images, labels = images.to(device).float(), labels.to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                loss, _ = compute_loss(model, normalize(images, cfg.model.mean, cfg.model.std), labels, cfg)
            loss = loss / o.grad_accum
            loss.backward()
            total += float(loss.detach())
        optimizer.step()
        scheduler.step()
        step += 1
        loss_value = total
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.3f}")
        if step % cfg.log_every == 0 or step == o.iters:
            log.write(json.dumps({"step": step, "loss": loss_value, "lr": scheduler.get_last_lr(),
                                  "elapsed_s": round(time.time() - t0, 1)}) + "\n")
            log.flush()
        if step % cfg.checkpoint_every == 0 or step == o.iters:
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(), "step": step, "rng": torch.get_rng_state()},
                       run_dir / "checkpoints" / "last.tmp")
            (run_dir / "checkpoints" / "last.tmp").replace(last)
    bar.close()

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(run_dir / "model.safetensors"))
    summary: dict = {"step": step, "loss": loss_value}
    if cfg.data.val:
        val = [s for v in cfg.data.val for s in find_samples(v.layout, v.root, v.split, v.conditions or None)]
        summary["val_miou"] = evaluate_samples(model, val, cfg, device)
    log.write(json.dumps({"summary": summary}) + "\n")
    log.close()
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="YAML training config")
    parser.add_argument("--run-dir", default=None, help="output directory (default runs/<name>)")
    parser.add_argument("--iters", type=int, default=None, help="override optim.iters")
    parser.add_argument("--no-resume", action="store_true", help="start fresh even if a checkpoint exists")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.iters is not None:
        cfg.optim.iters = args.iters
    run_dir = Path(args.run_dir or Path("runs") / cfg.name)
    summary = train(cfg, run_dir, resume=not args.no_resume, progress=not args.no_progress)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
