"""Time one block forward of the Wan DiT, with and without a KV cache, and print a table.

Random weights (the speed does not depend on them). Examples:

    python benchmarks/bench_dit.py --preset tiny
    python benchmarks/bench_dit.py --preset wan2.1-t2v-1.3b --dtype fp32 --latent-hw 60 104 --repeats 1
    python benchmarks/bench_dit.py --preset wan2.1-t2v-1.3b --dtype bf16 --device cuda --cached-frames 20

"no cache": a bidirectional forward of ``--frames`` latent frames (nothing before it).
"cache":    the same frames as the next block of a stream whose KV cache already holds ``--cached-frames``
            frames (the block attends to all of them), i.e. the per-block cost deep into a video.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time

import torch

from causal_forcing.config import model_preset
from causal_forcing.models.wan import WanDiT

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def build(preset: str, dtype: torch.dtype, device: torch.device) -> WanDiT:
    with torch.device("meta"):
        model = WanDiT(model_preset(preset))
    model = model.to_empty(device=device)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    return model.to(dtype).eval()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def time_call(fn, repeats: int, device: torch.device) -> float:
    fn()  # warm-up
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--dtype", choices=DTYPES, default="fp32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--latent-hw", type=int, nargs=2, default=None, help="latent H W (default 60 104 for Wan "
                    "presets, 8 8 for tiny)")
    ap.add_argument("--frames", type=int, default=1, help="latent frames per block")
    ap.add_argument("--cached-frames", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    hw = tuple(args.latent_hw or ((8, 8) if args.preset == "tiny" else (60, 104)))
    model = build(args.preset, dtype, device)
    cfg = model.config
    n = args.frames
    x = torch.randn(1, n, cfg.in_dim, *hw, device=device, dtype=dtype)
    t = torch.full((1, n), 500.0, device=device)
    ctx = torch.randn(1, cfg.text_len, cfg.text_dim, device=device, dtype=dtype)
    tpf = model.tokens_per_frame(hw)

    def no_cache():
        model(x, t, ctx)

    cache = model.new_cache(batch_size=1, latent_hw=hw, capacity_frames=args.cached_frames + n)
    for buf in cache.k + cache.v:
        buf.normal_()
    prefill = args.cached_frames * tpf

    def with_cache():
        cache.global_end = cache.local_end = prefill  # rewind: every call appends the same next block
        model(x, t, ctx, cache=cache, start_frame=args.cached_frames)

    rows = []
    for name, fn in (("no cache", no_cache), (f"cache ({args.cached_frames} frames)", with_cache)):
        sec = time_call(fn, args.repeats, device)
        rows.append({"mode": name, "seconds": sec, "tokens_per_s": n * tpf / sec, "s_per_latent_frame": sec / n})
    mem = peak_memory_mb(device)
    params = sum(p.numel() for p in model.parameters())
    print(f"preset={args.preset} params={params:,} dtype={args.dtype} device={device} latent={n}x{hw[0]}x{hw[1]} "
          f"tokens/frame={tpf} threads={torch.get_num_threads()}")
    print(f"{'mode':<22}{'s/block':>10}{'tokens/s':>12}{'s/latent frame':>16}")
    for r in rows:
        print(f"{r['mode']:<22}{r['seconds']:>10.4f}{r['tokens_per_s']:>12.0f}{r['s_per_latent_frame']:>16.4f}")
    print(f"peak memory: {mem:.0f} MiB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "params": params, "rows": rows, "peak_memory_mib": mem}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
