"""Streaming Wan VAE decode throughput (random weights, CPU by default).

Decodes a random normalised latent video block by block with `StreamingDecoder` and prints, per block, the
pixel frames produced and frames/s, then the streaming total (and optionally the one-shot `WanVAE.decode`).
Nothing is written to disk. Example:

    python benchmarks/bench_vae.py --base-dim 96 --height 64 --width 64 --latent-frames 9 --block-size 3
"""
from __future__ import annotations

import argparse
import time

import torch

from causal_forcing.models.vae import WanVAE, build_autoencoder, pixel_frames_for

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-dim", type=int, default=96, help="VAE base channels (96 = Wan2.1)")
    parser.add_argument("--height", type=int, default=64, help="pixel height (multiple of 8)")
    parser.add_argument("--width", type=int, default=64, help="pixel width (multiple of 8)")
    parser.add_argument("--latent-frames", type=int, default=9, help="latent frames in the video")
    parser.add_argument("--block-size", type=int, default=3, help="latent frames per streamed block")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--one-shot", action="store_true", help="also time WanVAE.decode of the whole video")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.height % 8 or args.width % 8 or min(args.latent_frames, args.block_size, args.base_dim) < 1:
        parser.error("height/width must be multiples of 8; frames, block size and base dim must be positive")
    return args


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work so wall-clock timings are honest (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_streaming(vae: WanVAE, latents: torch.Tensor, block_size: int) -> float:
    """Decode `latents` block by block, print one line per block; return the total seconds."""
    stream = vae.streaming_decoder()
    total = 0.0
    for index, start in enumerate(range(0, latents.shape[1], block_size)):
        block = latents[:, start : start + block_size]
        synchronize(vae.device)
        began = time.perf_counter()
        frames = stream.decode_block(block)
        synchronize(vae.device)
        seconds = time.perf_counter() - began
        total += seconds
        print(f"block {index}: {block.shape[1]} latent -> {frames.shape[1]:2d} frames in {seconds * 1e3:8.1f} ms"
              f" = {frames.shape[1] / seconds:7.2f} frames/s")
    return total


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    vae = WanVAE(build_autoencoder({"base_dim": args.base_dim}).eval())
    vae = vae.to(device=args.device, dtype=DTYPES[args.dtype]).requires_grad_(False)
    shape = (1, args.latent_frames, vae.latent_channels, args.height // 8, args.width // 8)
    latents = torch.randn(shape, device=vae.device, dtype=vae.dtype)
    pixel_frames = pixel_frames_for(args.latent_frames)
    print(f"Wan VAE decode: base_dim={args.base_dim}, {args.height}x{args.width}, {args.latent_frames} latent -> "
          f"{pixel_frames} pixel frames, blocks of {args.block_size}, {args.dtype} on {vae.device}, "
          f"{torch.get_num_threads()} threads")
    with torch.inference_mode():
        vae.streaming_decoder().decode_block(latents[:, :2])  # warm-up (allocator, kernels)
        total = time_streaming(vae, latents, args.block_size)
        print(f"streaming total: {pixel_frames} frames in {total:.3f} s = {pixel_frames / total:.2f} frames/s")
        if args.one_shot:
            synchronize(vae.device)
            began = time.perf_counter()
            vae.decode(latents)
            synchronize(vae.device)
            seconds = time.perf_counter() - began
            print(f"one-shot decode: {pixel_frames} frames in {seconds:.3f} s = {pixel_frames / seconds:.2f} frames/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
