"""Throughput of the ShapesWorld generator and the ShapesBench judge.

    python benchmarks/bench_shapes.py [--num 1000] [--workers 2] [--size 64] [--frames 81] [--no-mp4]

Generation: writes `--num` training clips (npz + manifest) with `--workers` processes into a temporary
directory and extrapolates the time for 10,000 clips. Judge: writes the standard 200-prompt evaluation set
(ground truth) and times `score_videos` on it, from .npz and (unless --no-mp4) from H.264 .mp4 (yuv444p).
The last line is a JSON summary.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from causal_forcing.data import shapes, shapes_io  # noqa: E402
from causal_forcing.eval import shapesbench  # noqa: E402


def bench_generation(root: Path, num: int, workers: int, size: int, frames: int) -> dict:
    """Write `num` training clips; clips/s and the extrapolated time for 10,000 clips."""
    start = time.perf_counter()
    shapes_io.write_training_set(root / "train", num=num, seed=0, size=size, frames=frames, workers=workers)
    elapsed = time.perf_counter() - start
    nbytes = sum(p.stat().st_size for p in (root / "train").iterdir())
    return {"clips": num, "workers": workers, "seconds": elapsed, "clips_per_s": num / elapsed,
            "extrapolated_10k_s": 10_000 * elapsed / num, "bytes_per_clip": nbytes / num}


def bench_judge(root: Path, size: int, frames: int, workers: int, mp4: bool) -> dict:
    """Time `score_videos` on the 200 ground-truth clips of the standard evaluation set."""
    eval_dir = root / "eval"
    shapes_io.write_eval_set(eval_dir, size=size, frames=frames, workers=workers)
    start = time.perf_counter()
    report = shapesbench.score_videos(eval_dir)
    elapsed = time.perf_counter() - start
    out = {"clips": report["all"]["n"], "seconds_npz": elapsed, "clips_per_s_npz": report["all"]["n"] / elapsed,
           "gt_total": report["all"]["total"], "gt_all_correct": report["all"]["all_correct"]}
    if mp4:
        mp4_dir = root / "eval_mp4"
        mp4_dir.mkdir()
        for rec in shapes_io.read_manifest(eval_dir / shapes_io.MANIFEST_NAME):
            clip = shapes_io.load_clip(eval_dir / rec["file"])
            shapes_io.save_mp4(mp4_dir / Path(rec["file"]).with_suffix(".mp4").name, clip, pix_fmt="yuv444p")
        start = time.perf_counter()
        report = shapesbench.score_videos(mp4_dir, eval_dir / shapes_io.MANIFEST_NAME)
        elapsed = time.perf_counter() - start
        out.update({"seconds_mp4": elapsed, "clips_per_s_mp4": report["all"]["n"] / elapsed,
                    "gt_total_mp4_yuv444p": report["all"]["total"],
                    "gt_semantic_mp4_yuv444p": report["all"]["semantic"]})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--size", type=int, default=shapes.DEFAULT_SIZE)
    parser.add_argument("--frames", type=int, default=shapes.DEFAULT_FRAMES)
    parser.add_argument("--no-mp4", action="store_true", help="skip the .mp4 judge timing")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        gen = bench_generation(root, args.num, args.workers, args.size, args.frames)
        print(f"generation: {gen['clips']} clips {args.frames}x{args.size}x{args.size}, {gen['workers']} workers: "
              f"{gen['seconds']:.1f} s, {gen['clips_per_s']:.1f} clips/s, {gen['bytes_per_clip'] / 1024:.1f} KiB/clip"
              f" -> 10,000 clips in {gen['extrapolated_10k_s']:.0f} s")
        judge = bench_judge(root, args.size, args.frames, args.workers, not args.no_mp4)
        line = f"judge: {judge['clips']} clips from .npz in {judge['seconds_npz']:.2f} s " \
               f"({judge['clips_per_s_npz']:.0f} clips/s)"
        if "seconds_mp4" in judge:
            line += f"; from .mp4 in {judge['seconds_mp4']:.2f} s ({judge['clips_per_s_mp4']:.0f} clips/s)"
        print(line)
    print(json.dumps({"machine": f"{platform.machine()} x{os.cpu_count()} cores, Python {platform.python_version()}",
                      "generation": gen, "judge": judge}))


if __name__ == "__main__":
    main()
