"""`causal-forcing data shapes`: write a ShapesWorld training set or the standard evaluation set."""
from __future__ import annotations

import argparse
import sys
import time

from ..data import shapes
from ..data.shapes_io import write_eval_set, write_training_set
from ..errors import InputError


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `data` command and its `shapes` sub-command."""
    data = subparsers.add_parser("data", help="generate training / evaluation data",
                                 description="Generate training or evaluation data.")
    datasets = data.add_subparsers(dest="dataset", metavar="DATASET")
    datasets.required = True
    p = datasets.add_parser(
        "shapes", help=f"ShapesWorld ({shapes.WORLD_VERSION}) clips + manifest.jsonl",
        description=f"Write ShapesWorld ({shapes.WORLD_VERSION}) clips as .npz (uint8 frames) plus a JSONL "
                    "manifest. Training sets never contain held-out combinations (yellow triangles, purple "
                    "objects moving up); --eval-set writes the fixed standard 200-prompt evaluation set.")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (created if missing)")
    p.add_argument("--num", type=int, default=None, metavar="N", help="number of training clips")
    p.add_argument("--size", type=int, default=shapes.DEFAULT_SIZE, help="canvas side in pixels (default 64)")
    p.add_argument("--frames", type=int, default=shapes.DEFAULT_FRAMES,
                   help="frames per clip, 1 + 4k and >= 17 (default 81)")
    p.add_argument("--seed", type=int, default=None, metavar="S", help="dataset seed (default 0)")
    p.add_argument("--workers", type=int, default=1, metavar="K", help="worker processes (default 1)")
    p.add_argument("--paraphrase-prob", type=float, default=None, metavar="P",
                   help="probability that a training caption is a paraphrase (default 0.5)")
    p.add_argument("--eval-set", action="store_true",
                   help="write the standard evaluation set (200 fixed prompts, 10%% held-out) instead")
    p.set_defaults(func=run_shapes)


def run_shapes(args: argparse.Namespace) -> int:
    """Validate arguments, write the clips and the manifest, print a one-line summary."""
    shapes.validate_canvas(args.size, args.frames)
    start = time.perf_counter()
    if args.eval_set:
        given = [flag for flag, value in (("--num", args.num), ("--seed", args.seed),
                                          ("--paraphrase-prob", args.paraphrase_prob)) if value is not None]
        if given:
            raise InputError(f"--eval-set writes the fixed standard set; do not pass {', '.join(given)}")
        manifest = write_eval_set(args.out, size=args.size, frames=args.frames, workers=args.workers)
        count = shapes.EVAL_SET_SIZE
    else:
        if args.num is None:
            raise InputError("--num is required (or pass --eval-set)")
        manifest = write_training_set(args.out, num=args.num, seed=0 if args.seed is None else args.seed,
                                      size=args.size, frames=args.frames, workers=args.workers,
                                      paraphrase_prob=0.5 if args.paraphrase_prob is None else args.paraphrase_prob)
        count = args.num
    elapsed = time.perf_counter() - start
    print(f"wrote {count} clips ({args.frames}x{args.size}x{args.size}, {shapes.WORLD_VERSION}) and {manifest} "
          f"in {elapsed:.1f} s ({count / max(elapsed, 1e-9):.1f} clips/s)", file=sys.stdout)
    return 0
