"""Multi-process training: two CPU ranks (gloo) launched by torchrun stay in sync and write like one process."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import TINY_CONFIG, TINY_DEPTHFORGE_CONFIG, TINY_MFUSER_CONFIG
from training.build import build_vfmnet
from training.config import config_from_dict
from training.distributed import (SYNC_CHECK_ENV, SyncCheck, distributed_session, resolve_backend, resolve_device,
                                  tensors_digest)

ROOT = Path(__file__).resolve().parents[1]


def write_cityscapes(root: Path, split: str, n: int, seed: int) -> None:
    """``n`` random 60×90 frames with trainId labels in the Cityscapes layout."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        stem = f"bremen_000000_{i:06d}"
        image = root / "leftImg8bit" / split / "bremen" / f"{stem}_leftImg8bit.png"
        label = root / "gtFine" / split / "bremen" / f"{stem}_gtFine_labelTrainIds.png"
        image.parent.mkdir(parents=True, exist_ok=True)
        label.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(image), rng.integers(0, 256, (60, 90, 3), dtype=np.uint8))
        labels = rng.integers(0, 19, (60, 90), dtype=np.uint8)
        labels[:4] = 255
        cv2.imwrite(str(label), labels)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(config: Path, run_dir: Path, iters: int, sync_path: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", **{SYNC_CHECK_ENV: str(sync_path)})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "training.train", "--config", str(config),
           "--run-dir", str(run_dir), "--iters", str(iters), "--no-progress"]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A 3-step run on two ranks, then a resume to step 4 (batch 1 per rank, 2 micro-batches per step)."""
    tmp = tmp_path_factory.mktemp("ddp")
    write_cityscapes(tmp / "cs", "train", 4, seed=1)
    write_cityscapes(tmp / "cs", "val", 2, seed=2)
    data = json.loads(json.dumps(TINY_CONFIG))
    data.update(data={"root": str(tmp / "cs"), "val": [{"root": str(tmp / "cs")}], "scale_range": [1.0, 1.2]},
                optim={"iters": 3, "batch_size": 1, "grad_accum": 2, "warmup_iters": 1, "lr_head": 1e-3},
                num_workers=0, log_every=1, checkpoint_every=1, threads=1, dist_backend="auto")
    config = tmp / "cfg.yaml"
    config.write_text(yaml.safe_dump(data))
    run, sync = tmp / "run", tmp / "sync"
    t0 = time.time()
    first = torchrun(config, run, 3, sync)
    first_s = time.time() - t0
    after_first = {rank: read_jsonl(Path(f"{sync}.rank{rank}.jsonl")) for rank in (0, 1)}
    checkpoint = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    weights = load_file(str(run / "model.safetensors"))
    second = torchrun(config, run, 4, sync)
    return {"cfg": config_from_dict(data), "run": run, "sync": sync, "first": first, "second": second,
            "first_s": first_s, "after_first": after_first, "checkpoint": checkpoint, "weights": weights}


def test_ranks_stay_in_sync_on_different_data(two_rank_run):
    sync = two_rank_run["sync"]
    ranks = [read_jsonl(Path(f"{sync}.rank{rank}.jsonl")) for rank in (0, 1)]
    assert [r["step"] for r in ranks[0]] == [r["step"] for r in ranks[1]] == [1, 2, 3, 4]
    for a, b in zip(*ranks):
        # Bit-identical trainable parameters after every optimizer step…
        assert (a["param_sha256"], a["param_sum"]) == (b["param_sha256"], b["param_sum"]), a["step"]
        # …although each rank trained on batches of its own.
        assert a["batch_sha256"] != b["batch_sha256"], a["step"]
    assert len({r["param_sha256"] for r in ranks[0]}) == 4  # the weights moved at every step
    assert len({r["batch_sha256"] for r in ranks[0]}) == 4  # epochs reshuffle and re-augment


def test_rank_zero_alone_writes_logs_and_plain_weights(two_rank_run):
    run, cfg = two_rank_run["run"], two_rank_run["cfg"]
    lines = read_jsonl(run / "metrics.jsonl")
    steps = [line for line in lines if "step" in line]
    assert [line["step"] for line in steps] == [1, 2, 3, 4]  # one line per step: no second writer
    assert all(line["world_size"] == 2 and math.isfinite(line["loss"]) for line in steps)
    assert all(set(line["loss_parts"]) == {"loss_coarse"} for line in steps)
    summaries = [line["summary"] for line in lines if "summary" in line]
    assert len(summaries) == 2 and all(s["world_size"] == 2 and "cityscapes" in s["val_miou"] for s in summaries)
    assert two_rank_run["first"].stdout.count('"val_miou"') == 1  # the summary is printed once, by rank 0
    weights = two_rank_run["weights"]
    assert weights and not any(k.startswith("module.") for k in weights)
    model = build_vfmnet(cfg.model)
    model.load_state_dict(weights)  # strict: the keys of a single-process model
    assert set(weights) == set(model.state_dict())


def test_checkpoint_holds_every_rank_and_resume_continues(two_rank_run):
    ckpt = two_rank_run["checkpoint"]
    assert ckpt["step"] == 3 and ckpt["world_size"] == 2 and len(ckpt["rng_ranks"]) == 2
    assert not torch.equal(ckpt["rng_ranks"][0]["cpu"], ckpt["rng_ranks"][1]["cpu"])
    assert not any(k.startswith("module.") for k in ckpt["model"])
    assert torch.load(two_rank_run["run"] / "checkpoints" / "last.pt", weights_only=True)["step"] == 4
    # The resume ran one more step (4, not 1 again) and moved the weights: the schedule gives it a rate.
    before = two_rank_run["after_first"]
    assert [r["step"] for r in before[0]] == [1, 2, 3]
    resumed = read_jsonl(Path(f"{two_rank_run['sync']}.rank1.jsonl"))[3]
    assert resumed["step"] == 4 and resumed["param_sha256"] != before[1][2]["param_sha256"]
    print(f"two-rank 3-step run: {two_rank_run['first_s']:.1f} s")


@pytest.mark.parametrize("config", [TINY_MFUSER_CONFIG, TINY_DEPTHFORGE_CONFIG], ids=["mfuser", "depthforge"])
def test_mask_classification_families_train_in_sync_on_two_ranks(tmp_path, config):
    """MFuser (identity assignment) and DepthForge (Hungarian matching per rank) under torchrun: the mask count
    is averaged over the ranks, every trainable parameter gets a gradient on both, and the ranks stay equal."""
    write_cityscapes(tmp_path / "cs", "train", 4, seed=3)
    data = json.loads(json.dumps(config))
    size = data["model"]["img_size"]
    data.update(data={"root": str(tmp_path / "cs"), "scale_range": [1.0, 1.2], "crop_size": size},
                optim={"iters": 2, "batch_size": 1, "lr_backbone": 1e-3, "lr_head": 1e-3, "warmup_iters": 1},
                num_workers=0, log_every=1, checkpoint_every=2, threads=1, dist_backend="auto")
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(data))
    sync = tmp_path / "sync"
    torchrun(cfg_path, tmp_path / "run", 2, sync)
    ranks = [read_jsonl(Path(f"{sync}.rank{rank}.jsonl")) for rank in (0, 1)]
    assert [r["step"] for r in ranks[0]] == [r["step"] for r in ranks[1]] == [1, 2]
    for a, b in zip(*ranks):
        assert (a["param_sha256"], a["param_sum"]) == (b["param_sha256"], b["param_sum"]), a["step"]
        assert a["batch_sha256"] != b["batch_sha256"], a["step"]
    steps = [line for line in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "step" in line]
    assert all(line["world_size"] == 2 and math.isfinite(line["loss"]) for line in steps)
    assert {"loss_cls", "loss_mask", "loss_dice"} <= set(steps[-1]["loss_parts"])


def test_single_process_helpers(tmp_path, monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", SYNC_CHECK_ENV):
        monkeypatch.delenv(name, raising=False)
    assert resolve_backend("auto", torch.device("cpu")) == "gloo"
    assert resolve_backend("auto", torch.device("cuda", 1)) == "nccl"
    with pytest.raises(ValueError, match="dist_backend"):
        resolve_backend("tcp", torch.device("cpu"))
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert resolve_device("cuda:0", 3) == torch.device("cuda", 3)  # torchrun: each process owns its GPU
    monkeypatch.delenv("LOCAL_RANK")
    with distributed_session("cpu", "auto") as ctx:  # no torchrun environment: no process group
        assert ctx.world_size == 1 and ctx.is_main and not ctx.distributed
        assert not torch.distributed.is_initialized()
    a = tensors_digest([torch.ones(3), torch.zeros(2, dtype=torch.int64)])
    assert a == tensors_digest([torch.ones(3), torch.zeros(2, dtype=torch.int64)])
    assert a["sha256"] != tensors_digest([torch.ones(3) + 1e-7, torch.zeros(2, dtype=torch.int64)])["sha256"]
    assert SyncCheck.from_env(0) is None
    monkeypatch.setenv(SYNC_CHECK_ENV, str(tmp_path / "s"))
    check = SyncCheck.from_env(1)
    check.record(1, torch.nn.Linear(2, 2), [torch.zeros(1)])
    assert read_jsonl(tmp_path / "s.rank1.jsonl")[0]["rank"] == 1
