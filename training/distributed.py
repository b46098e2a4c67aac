"""Helpers for multi-process training launched by torchrun (DistributedDataParallel).

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK in every process it starts. Without them
(``python -m training.train``) everything here reduces to one process and no process
group is created, so the training loop has a single code path.
"""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
import torch.distributed as dist
from torch import nn

SYNC_CHECK_ENV = "DGSS_SYNC_CHECK"


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in the launch: its rank, the world size and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str = ""  # "" when no process group exists

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes files and logs."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def env_ranks() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) outside it."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` → CUDA when available, else CPU; a CUDA device becomes cuda:``local_rank``.

    Under torchrun each process owns the GPU of its local rank, so an index in the
    config ("cuda:1") is overridden there; a single process keeps what the config says.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and (device.index is None or "LOCAL_RANK" in os.environ):
        device = torch.device("cuda", local_rank)
    return device


def resolve_backend(name: str, device: torch.device) -> str:
    """The process-group backend: "auto" → nccl for CUDA devices, gloo otherwise."""
    if name == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if name not in ("nccl", "gloo", "mpi", "ucc"):
        raise ValueError(f"dist_backend must be auto, nccl, gloo, mpi or ucc, got {name!r}")
    return name


@contextmanager
def distributed_session(device_name: str, backend: str) -> Iterator[DistContext]:
    """Join torchrun's process group (when the world has more than one process) for the block.

    The group is destroyed on exit, also when the block raises, so a failed rank does not
    leave its communicator behind.
    """
    rank, world_size, local_rank = env_ranks()
    device = resolve_device(device_name, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size <= 1:
        yield DistContext(rank=0, world_size=1, local_rank=local_rank, device=device)
        return
    backend = resolve_backend(backend, device)
    # Binding the group to the device lets NCCL collectives (barrier included) know their GPU.
    dist.init_process_group(backend, rank=rank, world_size=world_size,
                            device_id=device if device.type == "cuda" else None)
    try:
        yield DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=device, backend=backend)
    finally:
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    """Wait for every rank; nothing to wait for in a single process."""
    if ctx.distributed:
        dist.barrier()


def mean_over_ranks(values: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Element-wise mean of ``values`` (on ctx.device) over all ranks."""
    if not ctx.distributed:
        return values
    values = values.clone()
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values / ctx.world_size


def any_over_ranks(flag: bool, ctx: DistContext) -> bool:
    """True when ``flag`` is true on at least one rank (every rank gets the same answer)."""
    if not ctx.distributed:
        return flag
    value = torch.tensor([int(flag)], device=ctx.device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def gather_objects(obj: Any, ctx: DistContext) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank."""
    if not ctx.distributed:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def tensors_digest(tensors: Iterable[torch.Tensor]) -> dict[str, Any]:
    """Sum (float64) and SHA-256 of the raw bytes of ``tensors``, in order: equal only when bit-identical."""
    sha = hashlib.sha256()
    total = 0.0
    for t in tensors:
        t = t.detach().cpu().contiguous()
        total += float(t.double().sum())
        sha.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return {"sum": total, "sha256": sha.hexdigest()}


class SyncCheck:
    """Opt-in consistency log of every rank's parameters and batches, step by step.

    ``DGSS_SYNC_CHECK=path`` makes every rank append, after each step, a digest of its trainable
    parameters and of the batches it trained on to ``path.rank<k>.jsonl``.

    Under DDP the parameter digests of all ranks must match at every step while the batch
    digests differ; a mismatch means the ranks drifted apart.
    """

    def __init__(self, path: Path, rank: int) -> None:
        self.path = Path(f"{path}.rank{rank}.jsonl")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.rank = rank

    @classmethod
    def from_env(cls, rank: int) -> SyncCheck | None:
        """The check when the environment asks for it, else None (no cost in normal runs)."""
        path = os.environ.get(SYNC_CHECK_ENV, "")
        return cls(Path(path), rank) if path else None

    def record(self, step: int, model: nn.Module, batches: list[torch.Tensor]) -> None:
        params = tensors_digest(p for _, p in model.named_parameters() if p.requires_grad)
        data = tensors_digest(batches)
        line = {"step": step, "rank": self.rank, "param_sum": params["sum"], "param_sha256": params["sha256"],
                "batch_sum": data["sum"], "batch_sha256": data["sha256"]}
        with open(self.path, "a") as f:
            f.write(json.dumps(line) + "\n")
