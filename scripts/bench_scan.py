"""CPU cost of one MVFuser forward against one ViT-L block on the same tokens, in one process.

    python3 scripts/bench_scan.py                      # official size: d_model 1024, 2594 tokens
    python3 scripts/bench_scan.py --tokens 1024 --runs 3 --chunk 32

Both modules run batch 1, float32, eval, under no_grad, on 2 threads; runs alternate (fuser, block,
fuser, block, …) so that a machine shared with other work slows both alike. Prints the median of each,
and their ratio (the fuser's forward over the block's); the target for the export-path scan is ≤ 0.5.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=2594, help="joined sequence length")
    parser.add_argument("--dim", type=int, default=1024, help="d_model of the fuser and width of the block")
    parser.add_argument("--runs", type=int, default=5, help="timed runs of each, after one warm-up")
    parser.add_argument("--chunk", type=int, default=None, help="the fuser's scan chunk (default: the scan's)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    import torch
    from timm.models.vision_transformer import Block

    from training.models.mvfuser import MVFuser

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    fuser_kwargs = {} if args.chunk is None else {"chunk": args.chunk}
    fuser = MVFuser(d_model=args.dim, **fuser_kwargs).eval()
    block = Block(dim=args.dim, num_heads=16, mlp_ratio=4.0, qkv_bias=True).eval()
    tokens = torch.randn(1, args.tokens, args.dim)

    def timed(module: torch.nn.Module) -> float:
        start = time.perf_counter()
        module(tokens)
        return time.perf_counter() - start

    fuser_s, block_s = [], []
    with torch.no_grad():
        timed(fuser), timed(block)  # warm-up: allocator, kernels' first-call setup
        for _ in range(args.runs):
            fuser_s.append(timed(fuser))
            block_s.append(timed(block))
    fuser_med, block_med = statistics.median(fuser_s), statistics.median(block_s)
    print(f"tokens {args.tokens}, d_model {args.dim}, chunk {fuser.chunk}, {args.threads} threads, "
          f"{args.runs} runs each")
    print(f"MVFuser forward : median {fuser_med * 1e3:8.1f} ms  (runs: {', '.join(f'{t * 1e3:.0f}' for t in fuser_s)})")
    print(f"ViT-L block     : median {block_med * 1e3:8.1f} ms  (runs: {', '.join(f'{t * 1e3:.0f}' for t in block_s)})")
    print(f"ratio fuser / block: {fuser_med / block_med:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
