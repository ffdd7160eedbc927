"""`causal-forcing bench`: time end-to-end streaming generation (per block, fps, time to first frame, memory).

``--repeats`` measured videos (default 1) after ``--warmup`` unmeasured ones (GPU kernels and allocator warm up);
with several, the summary gives the median and the range of each number, and the per-block table is that of the
run with the median time to first frame (a shared, noisy machine moves single runs by tens of percent). The prompt
cache is cleared before every measured run, so its setup includes text encoding, as a new prompt would. Reported
separately, as users ask: fps with and without VAE decode, steady fps after the first block, time to first frame,
peak memory (CUDA: peak allocated by PyTorch; CPU: the process's peak resident set, loading included).
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

from ..data.shapes_io import atomic_open
from ..errors import InputError
from ..pipelines.video import StreamTiming, VideoPipeline
from .generate import add_model_arguments, check_frames, check_writable, pipeline_from_args

DEFAULT_PROMPT = "a red circle moves to the right on a white background"


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `bench` command."""
    p = subparsers.add_parser(
        "bench", help="time streaming generation",
        description="Time end-to-end streaming generation: per-block latency, fps with and without VAE decode, "
                    "time to first frame and peak memory. Prints a table; --json also writes the numbers.")
    add_model_arguments(p)
    p.add_argument("--frames", type=int, default=None, metavar="N",
                   help="pixel frames, 1 + 4k (default: the model's)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, metavar="TEXT", help="the prompt (any text works)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="noise seed (default 0)")
    p.add_argument("--warmup", type=int, default=1, metavar="N", help="unmeasured videos first (default 1)")
    p.add_argument("--repeats", type=int, default=1, metavar="N",
                   help="measured videos; with more than one, medians and ranges are reported (default 1)")
    p.add_argument("--json", default=None, metavar="OUT", help="also write the results as JSON here")
    p.set_defaults(func=run)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return "Apple MPS"
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def _peak_memory(device: torch.device) -> tuple[float | None, str]:
    """(MiB, what it measures)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda peak allocated"
    if device.type == "cpu":
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process peak RSS"  # Linux: KiB
    return None, "not measured on this device"


def measure(pipeline: VideoPipeline, prompt: str, *, frames: int | None, seed: int, warmup: int,
            repeats: int = 1) -> list[StreamTiming]:
    """Generate ``warmup`` videos, then ``repeats`` measured videos (frames decoded, not written); their timings."""
    for _ in range(warmup):
        pipeline.generate(prompt, seed=seed, num_frames=frames)
    if pipeline.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(pipeline.device)
    timings = []
    for _ in range(repeats):
        pipeline.text_encoder.clear()
        with pipeline.stream(prompt, seed=seed, num_frames=frames) as stream:
            for _ in stream:
                pass
        timings.append(stream.timing)
    return timings


SUMMARY_KEYS = ("time_to_first_frame_s", "fps", "fps_without_decode", "steady_fps", "setup_s", "total_s")


def summarize_runs(timings: list[StreamTiming]) -> dict[str, dict[str, float]]:
    """Median, min and max of each summary number over the measured runs."""
    out = {}
    for key in SUMMARY_KEYS:
        values = [float(getattr(t, key)) for t in timings]
        out[key] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
    return out


def median_run(timings: list[StreamTiming]) -> StreamTiming:
    """The run whose time to first frame is the median (the lower middle one for an even count)."""
    ordered = sorted(timings, key=lambda t: float(t.time_to_first_frame_s or 0.0))
    return ordered[(len(ordered) - 1) // 2]


def format_table(result: dict[str, Any]) -> str:
    """The per-block table and the summary lines."""
    timing = result["timing"]
    lines = [f"model: {result['model']}",
             f"device: {result['device']} ({result['device_name']}), {result['dtype']}, torch {result['torch']}",
             f"video: {result['frames']} frames {result['width']}x{result['height']}, block {result['block_size']}, "
             f"{result['steps']} steps",
             f"{'block':>5} {'frames':>6} {'denoise ms':>11} {'decode ms':>10} {'latency ms':>11}"]
    for b in timing["blocks"]:
        lines.append(f"{b['index']:>5} {b['pixel_frames']:>6} {b['denoise_s'] * 1e3:>11.1f} "
                     f"{b['decode_s'] * 1e3:>10.1f} {b['latency_s'] * 1e3:>11.1f}")
    memory = result["peak_memory_mib"]
    summary = result.get("summary")
    if summary is None or result.get("repeats", 1) == 1:
        lines += [f"setup (prompt encoding)      {timing['setup_s']:.3f} s",
                  f"time to first frame          {timing['time_to_first_frame_s']:.3f} s",
                  f"fps with VAE decode          {timing['fps']:.2f}",
                  f"fps without VAE decode       {timing['fps_without_decode']:.2f}",
                  f"steady fps (after block 0)   {timing['steady_fps']:.2f}"]
    else:
        def span(key: str, fmt: str, unit: str = "") -> str:
            v = summary[key]
            return f"{v['median']:{fmt}}{unit} (min {v['min']:{fmt}}, max {v['max']:{fmt}})"
        lines += [f"median of {result['repeats']} runs (the table above is the median run)",
                  f"setup (prompt encoding)      {span('setup_s', '.3f', ' s')}",
                  f"time to first frame          {span('time_to_first_frame_s', '.3f', ' s')}",
                  f"fps with VAE decode          {span('fps', '.2f')}",
                  f"fps without VAE decode       {span('fps_without_decode', '.2f')}",
                  f"steady fps (after block 0)   {span('steady_fps', '.2f')}"]
    lines += ["peak memory                  "
              + (f"{memory:.0f} MiB ({result['peak_memory_kind']})" if memory is not None else "n/a")]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Load, measure, print the table, optionally write JSON."""
    check_frames(args.frames)
    if args.warmup < 0:
        raise InputError(f"--warmup must be >= 0, got {args.warmup}")
    if args.repeats < 1:
        raise InputError(f"--repeats must be >= 1, got {args.repeats}")
    if args.json:
        check_writable(Path(args.json).parent)
    pipeline = pipeline_from_args(args)
    timings = measure(pipeline, args.prompt, frames=args.frames, seed=args.seed, warmup=args.warmup,
                      repeats=args.repeats)
    timing = median_run(timings)
    memory, memory_kind = _peak_memory(pipeline.device)
    height, width = pipeline.frame_size
    result = {
        "model": pipeline.description,
        "device": str(pipeline.device),
        "device_name": device_name(pipeline.device),
        "dtype": str(pipeline.dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "offload": pipeline.offload,
        "frames": timing.pixel_frames,
        "height": height,
        "width": width,
        "latent_hw": list(pipeline.latent_hw),
        "block_size": pipeline.block_size,
        "steps": len(pipeline.stream_config.schedule.steps),
        "warmup": args.warmup,
        "repeats": args.repeats,
        "prompt": args.prompt,
        "peak_memory_mib": memory,
        "peak_memory_kind": memory_kind,
        "timing": timing.to_dict(),
        "summary": summarize_runs(timings),
        "runs": [{key: float(getattr(t, key)) for key in SUMMARY_KEYS} for t in timings],
    }
    print(format_table(result))
    if args.json:
        with atomic_open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.json}", file=sys.stderr)
    return 0
