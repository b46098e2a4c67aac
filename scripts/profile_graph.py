"""Where a family's eager graph spends its time: torch.profiler's top operators, one run.

    python3 scripts/profile_graph.py --family vfmseg_l16_c2f_1024x2048 --device cuda --precision bf16
    python3 scripts/profile_graph.py --family vfmnet_l16_512x1024 --dry            # CPU, shrunk towers

The graph is the one ``scripts/gpu_figures.py`` times as eager reference (the export wrapper around
a benchmark model with random weights, uint8 frame in, labels out); for coarse-to-fine it is the
coarse graph alone, whose cost outside the network is the question this answers. Prints the
operators by self device time (CPU time on the CPU) and the share of the network's own modules.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "scripts"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", default="vfmseg_l16_c2f_1024x2048")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="bf16")
    parser.add_argument("--dry", action="store_true", help="shrunk towers and sizes (as gpu_figures --dry)")
    parser.add_argument("--runs", type=int, default=5, help="timed runs after 3 warm-up runs")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)

    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    from gpu_figures import _graphs, resolve
    from training import bench_models

    preset, overrides, size = resolve(args.family, args.dry)
    cfg, size = bench_models.bench_config(preset, overrides, size)
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "weights.safetensors"
        bench_models.random_weights(cfg, weights, seed=0)
        graphs = _graphs(cfg, preset.mode, size, weights, args.device)
    graph = graphs.get("coarse") or next(iter(graphs.values()))
    inputs = [torch.randint(0, 256, (1, *size, 3), dtype=torch.uint8, device=args.device)]
    if "coarse" in graphs:
        inputs.append(torch.tensor([cfg.inference.theta], device=args.device))
    cuda = args.device.startswith("cuda")
    network = graph.model.coarse if hasattr(graph.model, "coarse") else graph.model

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    autocast = torch.autocast("cuda" if cuda else "cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16")
    with torch.inference_mode(), autocast:
        x = inputs[0].permute(0, 3, 1, 2).float()
        for _ in range(3):
            graph(*inputs)
        sync()
        t0 = time.perf_counter()
        for _ in range(args.runs):
            graph(*inputs)
        sync()
        whole_ms = (time.perf_counter() - t0) / args.runs * 1e3
        # The network alone on an input of its size: what the graph adds around it is the difference.
        net_in = torch.nn.functional.interpolate(x, size=tuple(cfg.inference.coarse_size) if "coarse" in graphs
                                                 else size, mode="bilinear", align_corners=False)
        for _ in range(3):
            network(net_in)
        sync()
        t0 = time.perf_counter()
        for _ in range(args.runs):
            network(net_in)
        sync()
        net_ms = (time.perf_counter() - t0) / args.runs * 1e3
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities) as prof:
            with record_function("graph"):
                graph(*inputs)
            sync()
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    print(f"{args.family} {tuple(size)} {args.precision} on {args.device}: graph {whole_ms:.2f} ms, "
          f"network alone {net_ms:.2f} ms, around it {whole_ms - net_ms:.2f} ms")
    print(prof.key_averages(group_by_input_shape=True).table(sort_by=key, row_limit=args.top, max_name_column_width=40,
                                                             max_shapes_column_width=60))
    return 0


if __name__ == "__main__":
    sys.exit(main())
