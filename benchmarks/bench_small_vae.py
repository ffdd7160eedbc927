"""Decode throughput of the small ShapesWorld VAE (`causal_forcing.models.small_vae`), streaming and one-shot.

Encodes one ShapesWorld clip with the VAE (the bundled weights by default), then times decoding its latents
block by block with `streaming_decoder()` and all at once with `decode`, each `--repeats` times, and prints the
best and median pixel frames per second of each. Nothing is written to disk. Example:

    python benchmarks/bench_small_vae.py --threads 2 --frames 81 --block-size 3

With `--reconstruct CLIPS --out DIR` it instead encodes and decodes every clip of a `causal-forcing data shapes`
folder, writes the reconstructions and the manifest to DIR (score them with `causal-forcing eval shapes --videos
DIR`) and prints the reconstruction PSNR:

    python benchmarks/bench_small_vae.py --reconstruct data/shapes_eval --out outputs/shapes_eval_recon
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from causal_forcing.data import shapes
from causal_forcing.models.small_vae import load_vae
from causal_forcing.training.vae import reconstruct_folder


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vae", default="shapes", help="'shapes' (bundled weights) or a SmallVAE folder")
    parser.add_argument("--size", type=int, default=64, help="canvas side in pixels (multiple of 8)")
    parser.add_argument("--frames", type=int, default=81, help="pixel frames of the clip, 1 + 4k")
    parser.add_argument("--block-size", type=int, default=3, help="latent frames per streamed block")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each mode")
    parser.add_argument("--seed", type=int, default=0, help="seed of the ShapesWorld clip")
    parser.add_argument("--reconstruct", metavar="CLIPS", help="reconstruct this `data shapes` folder instead")
    parser.add_argument("--out", metavar="DIR", help="where --reconstruct writes the reconstructions")
    args = parser.parse_args(argv)
    if args.block_size < 1 or args.repeats < 1 or args.threads < 1:
        parser.error("--block-size, --repeats and --threads must be >= 1")
    if bool(args.reconstruct) != bool(args.out):
        parser.error("--reconstruct and --out go together")
    return args


def time_streaming(vae: torch.nn.Module, latents: torch.Tensor, block_size: int) -> tuple[float, int]:
    """Seconds and pixel frames of one block-by-block decode of `latents`."""
    stream = vae.streaming_decoder()
    frames = 0
    began = time.perf_counter()
    for start in range(0, latents.shape[1], block_size):
        frames += stream.decode_block(latents[:, start:start + block_size]).shape[1]
    return time.perf_counter() - began, frames


def time_one_shot(vae: torch.nn.Module, latents: torch.Tensor) -> tuple[float, int]:
    """Seconds and pixel frames of one `decode` of the whole video."""
    began = time.perf_counter()
    frames = vae.decode(latents).shape[1]
    return time.perf_counter() - began, frames


def report(name: str, runs: list[tuple[float, int]]) -> None:
    frames = runs[0][1]
    rates = [frames / seconds for seconds, _ in runs]
    print(f"{name:<10} {frames} frames: best {max(rates):7.1f} frames/s, median {statistics.median(rates):7.1f} "
          f"frames/s over {len(runs)} runs")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    vae = load_vae(args.vae)
    if args.reconstruct:
        began = time.perf_counter()
        result = reconstruct_folder(args.reconstruct, vae, args.out)
        print(f"reconstructed {result['clips']} clips into {args.out} in {time.perf_counter() - began:.1f} s: PSNR "
              f"mean {result['psnr_mean']:.2f} dB, min {result['psnr_min']:.2f} dB, max {result['psnr_max']:.2f} dB")
        return
    _, frames = shapes.render_seed(args.seed, args.size, args.frames)
    pixels = (torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 127.5 - 1.0).unsqueeze(0)
    with torch.inference_mode():
        latents = vae.encode(pixels)
        print(f"latents {list(latents.shape)}, {args.size}x{args.size} px, {args.threads} threads, "
              f"streaming blocks of {args.block_size} latent frames")
        time_streaming(vae, latents, args.block_size)  # warm-up
        time_one_shot(vae, latents)
        report("streaming", [time_streaming(vae, latents, args.block_size) for _ in range(args.repeats)])
        report("one-shot", [time_one_shot(vae, latents) for _ in range(args.repeats)])


if __name__ == "__main__":
    main()
