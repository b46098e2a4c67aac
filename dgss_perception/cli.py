"""``dgss-perception``: segment images, process, play and calibrate on bags, run the demo, inspect a model package."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import __version__
from .engine import BACKENDS, PRECISIONS, device_arg
from .torch_export import COMPILE_MODES


def _segment(args: argparse.Namespace) -> int:
    import cv2

    from .engine import Segmenter
    from .labels import colorize, overlay, palette_lut

    seg = Segmenter(args.model, backend=args.backend, device=args.device, precision=args.precision,
                    torch_compile=args.torch_compile)
    print(f"{seg.card.name} on {seg.device_report}", file=sys.stderr)
    if seg.precision_note:
        print(f"warning: {seg.precision_note}", file=sys.stderr)
    lut = palette_lut(seg.card.palette)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    failed = 0
    for path in map(Path, args.images):
        bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if bgr is None:
            print(f"skipped {path}: not a readable image", file=sys.stderr)
            failed += 1
            continue
        rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        result = seg.segment(rgb)
        color = colorize(result.labels, lut)
        cv2.imwrite(str(out / f"{path.stem}_labels.png"), result.labels)
        cv2.imwrite(str(out / f"{path.stem}_color.png"), cv2.cvtColor(color, cv2.COLOR_RGB2BGR))
        cv2.imwrite(str(out / f"{path.stem}_overlay.png"),
                    cv2.cvtColor(overlay(rgb, color, args.alpha), cv2.COLOR_RGB2BGR))
        print(f"{path} → {out / (path.stem + '_labels.png')} ({result.timings_ms['inference']:.1f} ms inference)")
    return 1 if failed else 0


def _info(args: argparse.Namespace) -> int:
    from .card import CARD_FILE, load_card

    load_card(args.model)  # validates
    print(json.dumps(json.loads((Path(args.model) / CARD_FILE).read_text()), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import bag, bench, calibrate, demo, play

    parser = argparse.ArgumentParser(prog="dgss-perception", description=__doc__)
    parser.add_argument("--version", action="version", version=__version__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("segment", help="segment image files into label, colour and overlay PNGs")
    p.add_argument("images", nargs="+")
    p.add_argument("--model", required=True, help="model package directory")
    p.add_argument("--out", default="segment_output")
    p.add_argument("--backend", default="auto", choices=BACKENDS)
    p.add_argument("--device", default="auto", type=device_arg, help="auto | cpu | cuda | cuda:N (default auto)")
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="torchscript and pt2 arithmetic (default auto: the card's checked GPU precision on a GPU, "
                        "fp32 on the CPU); ONNX Runtime takes auto or the card's precision")
    p.add_argument("--torch-compile", default="auto", choices=COMPILE_MODES,
                   help="pt2 backend: none (eager), inductor (torch.compile at load) or aoti (AOTInductor, compiled "
                        "once and cached); default auto: inductor on a GPU, none on the CPU")
    p.add_argument("--alpha", type=float, default=0.5, help="overlay weight of the colour mask")
    p.set_defaults(func=_segment)

    p = sub.add_parser("info", help="validate a model package and print its card")
    p.add_argument("model")
    p.set_defaults(func=_info)

    bag.add_parser(sub)
    calibrate.add_parser(sub)
    play.add_parser(sub)
    demo.add_parser(sub)
    bench.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .backends import BackendError
    from .card import CardError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (CardError, BackendError, FileNotFoundError, FileExistsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
