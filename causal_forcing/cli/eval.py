"""`causal-forcing eval shapes`: score videos with the ShapesBench judge."""
from __future__ import annotations

import argparse
import json

from ..data.shapes_io import MANIFEST_NAME, atomic_open
from ..eval import shapesbench

_COLUMNS = (("n", "n"), ("color", "color"), ("shape", "shape"), ("size", "size"), ("motion", "motion"),
            ("semantic", "semantic"), ("cleanliness", "clean"), ("consistency", "consist"),
            ("smoothness", "smooth"), ("quality", "quality"), ("total", "total"), ("all_correct", "all_ok"),
            ("speed_ratio", "speed"))
_SPLITS = (("in_distribution", "in-distribution"), ("held_out", "held-out"), ("all", "all"))


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `eval` command and its `shapes` sub-command."""
    ev = subparsers.add_parser("eval", help="score generated videos", description="Score generated videos.")
    benches = ev.add_subparsers(dest="benchmark", metavar="BENCHMARK")
    benches.required = True
    p = benches.add_parser(
        "shapes", help=f"ShapesBench ({shapesbench.JUDGE_VERSION})",
        description=f"Score .mp4/.npz/.npy videos with ShapesBench ({shapesbench.JUDGE_VERSION}). Prints a "
                    "table and, last, one JSON line with in-distribution and held-out totals.")
    p.add_argument("--videos", required=True, metavar="DIR", help="directory with the videos")
    p.add_argument("--manifest", default=None, metavar="FILE",
                   help=f"JSONL with 'file' and 'caption' per line (default DIR/{MANIFEST_NAME}); a video "
                        "matches an entry by name, or by stem with any of .mp4/.npz/.npy")
    p.add_argument("--json", default=None, metavar="OUT", help="also write the full report (per clip) here")
    p.set_defaults(func=run_shapes)


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return str(value)
    return f"{value:.3f}"


def format_table(report: dict) -> str:
    """Totals of a ShapesBench report as a fixed-width text table."""
    widths = [max(len(title), 6) for _, title in _COLUMNS]
    lines = ["split".ljust(16) + " ".join(t.rjust(w) for (_, t), w in zip(_COLUMNS, widths))]
    for key, name in _SPLITS:
        totals = report[key]
        lines.append(name.ljust(16) + " ".join(_cell(totals[k]).rjust(w) for (k, _), w in zip(_COLUMNS, widths)))
    return "\n".join(lines)


def run_shapes(args: argparse.Namespace) -> int:
    """Score the videos, print the table, errors and the final JSON line; optionally write the full report."""
    report = shapesbench.score_videos(args.videos, args.manifest)
    print(format_table(report))
    for err in report["errors"]:
        print(f"error: {err['file']}: {err['error']}")
    if report["unmatched_files"]:
        print(f"note: {len(report['unmatched_files'])} video file(s) not in the manifest were ignored")
    if args.json:
        with atomic_open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    summary = {"judge": report["judge"], "world": report["world"],
               "in_distribution": report["in_distribution"], "held_out": report["held_out"],
               "n_errors": report["n_errors"]}
    print(json.dumps(summary))
    return 0
