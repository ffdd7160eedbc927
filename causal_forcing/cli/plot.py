"""`causal-forcing plot RUN [RUN ...] --out curves.png`: training curves from metrics.jsonl."""
from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plot", help="draw training curves (metrics.jsonl) to a PNG")
    p.add_argument("runs", nargs="+", help="run folders (train.out_dir) or metrics.jsonl files")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--keys", nargs="*", default=None, help="metrics to draw (default: every *loss*)")
    p.add_argument("--smooth", type=int, default=1, help="moving-average window (default 1)")
    p.add_argument("--logy", action="store_true", help="logarithmic y axis")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..errors import InputError
    from ..training.plotting import plot_runs
    if args.smooth < 1:
        raise InputError("--smooth must be >= 1")
    out = plot_runs(args.runs, args.out, keys=args.keys, smooth=args.smooth, logy=args.logy)
    print(f"wrote {out}")
    return 0
