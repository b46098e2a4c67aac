"""Train a segmentation model from a config file, on one process or several (torchrun).

    python -m training.train --config training/configs/demo_tiny.yaml --run-dir runs/demo
    torchrun --nproc_per_node 4 -m training.train --config X.yaml --run-dir runs/x

Under torchrun every process trains a replica of the model on its own share of the data
(DistributedDataParallel); ``optim.batch_size`` is per process, so the effective batch is
batch_size × grad_accum × the number of processes. Rank 0 alone writes to the run
directory: config.yaml (the effective config), metrics.jsonl, checkpoints/last.pt
(resumable; loaded with weights_only=True) and model.safetensors (the final weights of the
plain model, which ``training.export`` reads). ``DGSS_SYNC_CHECK=path`` makes every rank log
digests of its parameters and batches after each step (see ``training.distributed``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time
from contextlib import ExitStack, nullcontext
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import yaml
from safetensors.torch import save_file
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

from dgss_perception.metrics import confusion_matrix, mean_iou

from .build import build_model
from .config import TrainConfig, config_to_dict, load_config
from .data.datasets import Sample, find_samples, load_sample
from .data.loader import build_train_dataset
from .distributed import (DistContext, SyncCheck, any_over_ranks, barrier, distributed_session, env_ranks,
                          gather_objects, mean_over_ranks)
from .models.preprocess import normalize
from .inference import Predictor
from .models.depthforge import DepthForge
from .models.mfuser import MFuser
from .objectives import compute_loss


class LossModule(nn.Module):
    """The model and its objective as one module, so that DDP's forward covers all of ``compute_loss``.

    ``compute_loss`` may reach into the model (its backbone, a refinement head); run inside
    this forward it sees the plain model, while DDP still prepares the gradient all-reduce.
    """

    def __init__(self, model: nn.Module, cfg: TrainConfig) -> None:
        super().__init__()
        self.model = model
        self.cfg = cfg

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """images (N,3,H,W) normalised, labels (N,H,W) → (loss, logged parts)."""
        return compute_loss(self.model, images, labels, self.cfg)


# MFuser's frozen parts: both vision towers and the text tower. Everything else learns: the MVFusers,
# the FPN, the prompt context, γ, MTEnhancer and the decode head (the paper's and the released code's split).
MFUSER_FROZEN = ("backbone.dino.", "backbone.vlm.", "text_encoder.text.")
# DepthForge's and Rein's frozen parts: the visual tower and the depth tower. The tokens (with the queries they
# make), DQCM and the Mask2Former head learn.
DEPTHFORGE_FROZEN = ("backbone.visual.", "backbone.depth.")


def set_trainable(model: nn.Module, finetune: str) -> None:
    """Training policy lives here, not in the model: which backbone weights learn (every other module does).

    ``finetune`` (lora | full | frozen) applies to VFMNet's backbone; the towers of MFuser, DepthForge and
    Rein are always frozen.
    """
    if finetune not in ("lora", "full", "frozen"):
        raise ValueError(f"backbone.finetune must be lora, full or frozen, got {finetune!r}")
    frozen = MFUSER_FROZEN if isinstance(model, MFuser) else DEPTHFORGE_FROZEN if isinstance(
        model, DepthForge) else None
    if frozen is not None:
        for name, p in model.named_parameters():
            p.requires_grad = not name.startswith(frozen)
        return
    for child_name, child in model.named_children():
        for name, p in child.named_parameters():
            if child_name == "backbone":
                p.requires_grad = finetune == "full" or (finetune == "lora" and "lora_" in name)
            else:
                p.requires_grad = True


def poly_warmup(step: int, warmup: int, total: int, power: float) -> float:
    """LR factor: linear warm-up to 1, then polynomial decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, 1 - (step - warmup) / max(1, total - warmup)) ** power


def one_cycle(step: int, total: int, pct: float, div: float, final_div: float) -> float:
    """LR factor of PyTorch's OneCycleLR (cosine both ways) relative to its peak, at ``step`` of ``total``.

    From 1/div up to 1 over the first ``pct`` of the steps, then down to 1/(div·final_div) at the last step.
    """
    def cos(start: float, end: float, t: float) -> float:
        return end + (start - end) / 2 * (1 + math.cos(math.pi * min(max(t, 0.0), 1.0)))

    low, floor = 1.0 / div, 1.0 / (div * final_div)
    peak_step = float(pct * total) - 1
    if step <= peak_step:
        return cos(low, 1.0, step / peak_step)
    return cos(1.0, floor, (step - peak_step) / max(1e-12, total - 1 - peak_step))


def lr_factor(cfg: TrainConfig) -> Callable[[int], float]:
    """The schedule of ``optim.schedule`` as a factor of each group's rate per step."""
    o = cfg.optim
    if o.schedule == "poly":
        return lambda s: poly_warmup(s, o.warmup_iters, o.iters, o.poly_power)
    if o.schedule == "onecycle":
        if not 0 < o.onecycle_pct < 1 or o.onecycle_pct * o.iters < 2:
            raise ValueError(f"optim.onecycle_pct must leave at least 2 rising steps in (0, 1), got "
                             f"{o.onecycle_pct} of {o.iters} iterations")
        return lambda s: one_cycle(s, o.iters, o.onecycle_pct, o.onecycle_div, o.onecycle_final_div)
    raise ValueError(f"optim.schedule must be poly or onecycle, got {o.schedule!r}")


_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)


def no_decay_names(model: nn.Module, cfg: TrainConfig) -> set[str]:
    """Names of the parameters trained without weight decay (``optim.no_decay_norm``, ``optim.no_decay_keys``)."""
    names = set()
    if cfg.optim.no_decay_norm:
        for module_name, module in model.named_modules():
            if isinstance(module, _NORMS):
                names.update(f"{module_name}.{n}" if module_name else n for n, _ in module.named_parameters(
                    recurse=False))
    keys = tuple(cfg.optim.no_decay_keys)
    names.update(n for n, _ in model.named_parameters() if keys and any(k in n for k in keys))
    return names


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW: the backbone at lr_backbone, the decoder side (head, a refinement head) at lr_head.

    Each side splits again into parameters with ``optim.weight_decay`` and those without (norms, embeddings
    and tokens, where the config says so).
    """
    backbone_ids = {id(p) for p in model.backbone.parameters()}
    exempt = no_decay_names(model, cfg)
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault((id(p) in backbone_ids, name in exempt), []).append(p)
    o = cfg.optim
    ordered = [{"params": groups.get((side, skip), []), "lr": o.lr_backbone if side else o.lr_head,
                "weight_decay": 0.0 if skip else o.weight_decay}
               for side in (True, False) for skip in (False, True)]
    return torch.optim.AdamW([g for g in ordered if g["params"]], weight_decay=o.weight_decay)


@torch.no_grad()
def evaluate_samples(model: nn.Module, samples: list[Sample], cfg: TrainConfig, device: torch.device) -> dict:
    """mIoU per domain in the configured inference mode (``cfg.inference``), on a copy of the weights."""
    predictor = Predictor(cfg, {k: v.detach() for k, v in model.state_dict().items()}, device)
    confs: dict[str, np.ndarray] = {}
    for sample in samples:
        rgb, labels = load_sample(sample)
        pred, _ = predictor.predict(rgb)
        confs[sample.domain] = confs.get(sample.domain, 0) + confusion_matrix(pred, labels, cfg.model.num_classes)
    return {domain: mean_iou(c) for domain, c in sorted(confs.items())}


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """This process's torch RNG streams: CPU (data augmentation) and, on a GPU, its CUDA stream (dropout)."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: dict[str, Any], ctx: DistContext, seed: int, step: int) -> None:
    """Continue this rank's RNG streams from a checkpoint.

    A rank the checkpoint has no state for (a resume with more processes) gets a fresh
    stream of its own that depends on the step, so it does not replay its first run.
    """
    ranks = state.get("rng_ranks")
    if ranks is None and "rng" in state:  # a checkpoint of a single-process run of an earlier version
        ranks = [{"cpu": state["rng"]}]
    mine = ranks[ctx.rank] if ranks and ctx.rank < len(ranks) else None
    if mine is None:
        torch.manual_seed(int(np.random.SeedSequence([seed, ctx.rank, step]).generate_state(1)[0]))
        return
    torch.set_rng_state(mine["cpu"].cpu())
    if "cuda" in mine and ctx.device.type == "cuda":
        torch.cuda.set_rng_state(mine["cuda"].cpu(), ctx.device)


def load_checkpoint(path: Path, device: torch.device) -> dict[str, Any]:
    """A training checkpoint, tensors on ``device`` (weights_only: never runs pickled code)."""
    try:
        return torch.load(str(path), map_location=device, weights_only=True)
    except Exception as exc:
        raise ValueError(f"cannot load {path} safely (corrupt, truncated, or not a weights-only file): {exc}") from exc


def save_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, step: int, epoch: int, ctx: DistContext) -> None:
    """Rank 0 writes last.pt atomically with every rank's RNG state; all ranks return once it is on disk."""
    rngs = gather_objects(rng_state(ctx.device), ctx)  # a collective: every rank takes part
    if ctx.is_main:
        tmp = path.with_suffix(".tmp")
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "step": step, "epoch": epoch,
                    "world_size": ctx.world_size, "rng": rngs[0]["cpu"], "rng_ranks": rngs}, tmp)
        tmp.replace(path)
    barrier(ctx)


def endless_batches(loader: DataLoader, sampler: DistributedSampler,
                    epoch: int) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """(epoch, images, labels) forever; each pass over the data reshuffles (set_epoch) from ``epoch`` on."""
    while True:
        sampler.set_epoch(epoch)
        for images, labels in loader:
            yield epoch, images, labels
        epoch += 1


def unused_trainable_parameters(loss_module: LossModule, images: torch.Tensor, labels: torch.Tensor,
                                device: torch.device, amp: bool) -> list[str]:
    """Trainable parameters that one forward/backward leaves without a gradient.

    DDP must search for unused parameters (an extra graph traversal each step) only if the
    objective skips some trainable ones; frozen parameters are not registered with DDP and
    do not count. RNG streams and buffers (BatchNorm statistics) are restored afterwards, so
    the probe leaves no trace on training.
    """
    model = loss_module.model
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss, _ = loss_module(images, labels)
        loss.backward()
    unused = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        for name, b in model.named_buffers():
            b.copy_(buffers[name])
    return unused


def train(cfg: TrainConfig, run_dir: Path, resume: bool = True, progress: bool = True) -> dict:
    """Run training (in torchrun's process group when launched by it); returns a summary.

    The summary holds the final step, the loss (mean over ranks) and the world size, and on
    rank 0 the validation mIoU.
    """
    with distributed_session(cfg.device, cfg.dist_backend) as ctx:
        return _train(cfg, run_dir, ctx, resume, progress)


def _train(cfg: TrainConfig, run_dir: Path, ctx: DistContext, resume: bool, progress: bool) -> dict:
    """The training loop of one rank (of one when there is no process group)."""
    device = ctx.device
    if ctx.is_main:
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)

    # Rank 0 builds first, so weights fetched from the hub are downloaded once, not by every rank at a time.
    if not ctx.is_main:
        barrier(ctx)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model = build_model(cfg.model).to(device)
    if ctx.is_main:
        barrier(ctx)
    if ctx.distributed and device.type == "cuda":
        # The decoder's BatchNorm sees batch 2 per GPU: normalise over all ranks (SyncBN, as the official
        # training). Same parameters and buffers, so checkpoints and exports are unchanged. Gloo on CPU has
        # no SyncBN kernel; there each rank keeps its own statistics.
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    set_trainable(model, cfg.model.backbone.finetune)
    # The same Parameter objects DDP will wrap: the optimizer steps the synchronised gradients.
    optimizer = build_optimizer(model, cfg)
    o = cfg.optim
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg))

    step, epoch = 0, 0
    last = run_dir / "checkpoints" / "last.pt"
    if resume and last.is_file():
        state = load_checkpoint(last, device)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        # The optimizer holds the rate of the saved schedule; follow this run's (optim.iters may have grown).
        for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
            group["lr"] = base * factor(scheduler.last_epoch)
        step = int(state["step"])
        # The interrupted pass over the data is not replayed; the next one starts reshuffled.
        epoch = int(state.get("epoch", step)) + 1
        restore_rng(state, ctx, cfg.seed, step)
    else:
        torch.manual_seed(cfg.seed + ctx.rank)  # data augmentation and dropout differ per rank

    dataset = build_train_dataset(cfg)
    sampler = DistributedSampler(dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True,
                                 seed=cfg.seed, drop_last=True)
    loader = DataLoader(dataset, batch_size=o.batch_size, sampler=sampler, drop_last=True,
                        num_workers=cfg.num_workers, persistent_workers=cfg.num_workers > 0,
                        pin_memory=device.type == "cuda")
    if len(loader) == 0:
        raise ValueError(f"{len(dataset)} samples over {ctx.world_size} process(es) are fewer than one batch "
                         f"of {o.batch_size} per process")

    amp = cfg.amp == "bf16"
    loss_module = LossModule(model, cfg)
    batches = endless_batches(loader, sampler, epoch)
    ddp: DistributedDataParallel | None = None
    if ctx.distributed:
        first = next(batches)
        images = normalize(first[1].to(device).float(), cfg.model.mean, cfg.model.std)
        unused = unused_trainable_parameters(loss_module, images, first[2].to(device), device, amp)
        batches = itertools.chain([first], batches)
        ddp = DistributedDataParallel(loss_module, device_ids=[device.index] if device.type == "cuda" else None,
                                      find_unused_parameters=any_over_ranks(bool(unused), ctx))
    forward = ddp if ddp is not None else loss_module
    sync_check = SyncCheck.from_env(ctx.rank)

    with ExitStack() as stack:
        log = stack.enter_context(open(run_dir / "metrics.jsonl", "a")) if ctx.is_main else None
        bar = stack.enter_context(tqdm(total=o.iters, initial=step, desc=cfg.name, dynamic_ncols=True,
                                       disable=not (progress and ctx.is_main)))
        forward.train()
        loss_value = math.nan
        t0 = time.time()
        while step < o.iters:
            optimizer.zero_grad(set_to_none=True)
            total = torch.zeros((), device=device)
            parts: dict[str, float] = {}
            seen: list[torch.Tensor] = []
            for micro in range(o.grad_accum):
                epoch, images, labels = next(batches)
                if sync_check is not None:
                    seen += [images, labels]
                images, labels = images.to(device, non_blocking=True).float(), labels.to(device, non_blocking=True)
                # Gradients are all-reduced once per optimizer step, on the last micro-batch.
                sync = ddp.no_sync() if ddp is not None and micro < o.grad_accum - 1 else nullcontext()
                with sync:
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                        loss, micro_parts = forward(normalize(images, cfg.model.mean, cfg.model.std), labels)
                    (loss / o.grad_accum).backward()
                total += loss.detach().float() / o.grad_accum
                for key, value in micro_parts.items():
                    parts[key] = parts.get(key, 0.0) + float(value) / o.grad_accum
            optimizer.step()
            scheduler.step()
            step += 1
            keys = sorted(parts)
            means = mean_over_ranks(torch.stack([total.double()] + [
                torch.tensor(parts[k], dtype=torch.float64, device=device) for k in keys]), ctx).tolist()
            loss_value, parts = means[0], dict(zip(keys, means[1:]))
            if sync_check is not None:
                sync_check.record(step, model, seen)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.3f}")
            if log is not None and (step % cfg.log_every == 0 or step == o.iters):
                log.write(json.dumps({"step": step, "loss": loss_value, "loss_parts": parts,
                                      "lr": scheduler.get_last_lr(), "world_size": ctx.world_size,
                                      "elapsed_s": round(time.time() - t0, 1)}) + "\n")
                log.flush()
            if step % cfg.checkpoint_every == 0 or step == o.iters:
                save_checkpoint(last, model, optimizer, scheduler, step, epoch, ctx)

        summary: dict = {"step": step, "loss": loss_value, "world_size": ctx.world_size}
        if log is not None:
            # The plain model's weights: the same keys as a single-process run, never DDP's "module." ones.
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(run_dir / "model.safetensors"))
            if cfg.data.val:
                val = [s for v in cfg.data.val for s in find_samples(v.layout, v.root, v.split, v.conditions or None)]
                summary["val_miou"] = evaluate_samples(model, val, cfg, device)
            log.write(json.dumps({"summary": summary}) + "\n")
    barrier(ctx)  # the other ranks wait for rank 0's files and validation
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
    if env_ranks()[0] == 0:  # one summary per launch, not one per process
        print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
