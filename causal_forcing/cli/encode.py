"""`causal-forcing encode`: turn a ShapesWorld clip folder into a latent dataset for the training stages.

`register` adds the top-level command `encode`; `add_encode_parser(subparsers, name)` adds the same command
under any sub-parser group (e.g. as `data encode`, from the module that owns `data`).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ..errors import InputError


def add_encode_parser(subparsers: argparse._SubParsersAction, name: str = "encode") -> argparse.ArgumentParser:
    """Add the encode command as `name` to `subparsers`; returns its parser."""
    p = subparsers.add_parser(
        name, help="encode a `data shapes` clip folder into a latent dataset",
        description="Encode every clip of a `causal-forcing data shapes` folder (manifest.jsonl + .npz clips) "
                    "into a latent dataset (shards of latents [F, 16, h, w] + records with id, caption, "
                    "canonical caption), optionally with per-token text embeddings as `context`. Rerunning "
                    "on the same --out continues an interrupted run (ids already stored are skipped).")
    p.add_argument("--clips", required=True, metavar="DIR", help="clip folder written by `data shapes`")
    p.add_argument("--vae", default="shapes", metavar="PATH",
                   help="'shapes' (the bundled ShapesWorld VAE, default), a SmallVAE folder, or a Wan VAE "
                        "(diffusers folder or weight file)")
    p.add_argument("--out", required=True, metavar="DIR", help="dataset folder (created or continued)")
    p.add_argument("--text-encoder", choices=("none", "minilm", "minilm-clauses"), default="none",
                   help="also store per-token caption embeddings as `context` (default none); minilm-clauses "
                        "encodes each ' and '-joined clause of a caption on its own")
    p.add_argument("--text-len", type=int, default=None, metavar="N",
                   help="text tokens per caption (default: the encoder's, 128 for minilm)")
    p.add_argument("--shard-size", type=int, default=64, metavar="N", help="samples per shard (default 64)")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="encode only the first N clips")
    p.add_argument("--threads", type=int, default=None, metavar="K", help="torch intra-op threads")
    p.set_defaults(func=run_encode)
    return p


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the top-level `encode` command."""
    add_encode_parser(subparsers, "encode")


def run_encode(args: argparse.Namespace) -> int:
    """Load the VAE (and text encoder), encode the folder, print a one-line summary."""
    import torch

    from ..data.encode import encode_clips
    from ..models.small_vae import load_vae

    for flag, value in (("--text-len", args.text_len), ("--shard-size", args.shard_size), ("--limit", args.limit),
                        ("--threads", args.threads)):
        if value is not None and value < 1:
            raise InputError(f"{flag} must be >= 1, got {value}")
    if args.text_len is not None and args.text_encoder == "none":
        raise InputError("--text-len needs --text-encoder")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    vae = load_vae(args.vae)
    vae_name = args.vae if args.vae == "shapes" else str(Path(args.vae).resolve())
    text_encoder = None
    if args.text_encoder != "none":
        from ..models.text import build_text_encoder

        options = {} if args.text_len is None else {"text_len": args.text_len}
        text_encoder = build_text_encoder(args.text_encoder, **options)
    start = time.perf_counter()
    summary = encode_clips(args.clips, vae, args.out, vae_name=vae_name, text_encoder=text_encoder,
                           text_encoder_name="" if text_encoder is None else args.text_encoder,
                           shard_size=args.shard_size, limit=args.limit)
    elapsed = time.perf_counter() - start
    print(f"encoded {summary.encoded} clips ({summary.skipped} already done) of {summary.total} into {summary.out} "
          f"in {elapsed:.1f} s", file=sys.stdout)
    return 0
