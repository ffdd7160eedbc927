"""`causal-forcing generate`: prompts (and an optional image) → MP4 files, streamed block by block.

Every input is checked before any model is loaded; every MP4 is written atomically (a temporary file next to
the target, renamed when complete), so a failure or Ctrl-C never leaves a partial video behind.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import unicodedata
from pathlib import Path
from typing import NamedTuple

from ..data.shapes_io import read_manifest
from ..errors import InputError
from ..models.vae import latent_frames_for, load_image
from ..pipelines.loading import DEFAULT_MODEL, MODES, RELEASED_STEPS, load_pipeline
from ..pipelines.video import DTYPES, GenerationResult, VideoPipeline, default_pix_fmt

DEFAULT_OUT = "outputs"
SLUG_LENGTH = 48


# ---------------------------------------------------------------------------------------------------------------
# Model arguments (shared with `bench`)
# ---------------------------------------------------------------------------------------------------------------
def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """The options that choose and place a model."""
    g = p.add_argument_group("model")
    g.add_argument("--model", metavar="DIR_OR_NAME", default=None,
                   help=f"a pipeline folder or a bundled model name (default: {DEFAULT_MODEL})")
    g.add_argument("--base", metavar="DIR", default=None,
                   help="an official Wan2.1-T2V-1.3B folder (config.json, Wan2.1_VAE.pth, UMT5 weights and "
                        "tokenizer); needs --checkpoint")
    g.add_argument("--checkpoint", metavar="PATH", default=None,
                   help="DiT weights: a Causal Forcing / Self Forcing .pt, safetensors or model folder")
    g.add_argument("--ema", action=argparse.BooleanOptionalAction, default=None,
                   help="use the checkpoint's generator_ema (--no-ema: generator); default: EMA for frame-wise, "
                        "raw for chunk-wise, else whichever the file has")
    g.add_argument("--mode", choices=tuple(MODES), default=None,
                   help="block size of --base models: framewise = 1 latent frame, chunkwise = 3 (default framewise)")
    g.add_argument("--steps", type=int, choices=sorted(RELEASED_STEPS), default=None,
                   help="denoising steps per block, with the released step lists (default: the model's, 4 for --base)")
    g.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps (default cpu)")
    g.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"),
                   help="DiT precision (default fp32; bf16 on GPUs)")
    g.add_argument("--offload", action="store_true",
                   help="keep the text encoder on the CPU and move the DiT/VAE to the GPU only while generating")
    g.add_argument("--size", type=parse_size, default=None, metavar="HxW",
                   help="frame size in pixels, e.g. 480x832 (default: the model's, 480x832 for --base); a multiple "
                        "of the VAE's pixels per latent cell times the DiT's patch (16 for Wan)")


def parse_size(text: str) -> tuple[int, int]:
    """``--size``: ``HEIGHTxWIDTH`` in pixels → ``(height, width)``."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not match or min(int(match[1]), int(match[2])) < 1:
        raise argparse.ArgumentTypeError(f"expected HEIGHTxWIDTH in pixels (e.g. 480x832), got {text!r}")
    return int(match[1]), int(match[2])


def resize_pipeline(pipeline: VideoPipeline, size: tuple[int, int]) -> VideoPipeline:
    """The same parts (shared, not copied) generating ``size`` = (height, width) pixel frames.

    The size must be a multiple of the VAE's spatial factor times the DiT's patch. A pixel format the model
    chose explicitly (one that differs from the default rule at its own size) is kept; otherwise the default rule
    (``video.default_pix_fmt``) applies at the new size.
    """
    height, width = size
    factor = pipeline.vae.spatial_factor
    _, patch_h, patch_w = pipeline.model.config.patch_size
    if height % (factor * patch_h) or width % (factor * patch_w):
        raise InputError(f"--size {height}x{width}: height must be a multiple of {factor * patch_h} and width of "
                         f"{factor * patch_w} pixels (VAE factor {factor} x DiT patch {patch_h}x{patch_w})")
    if (height, width) == pipeline.frame_size:
        return pipeline
    explicit = pipeline.pix_fmt if pipeline.pix_fmt != default_pix_fmt(*pipeline.frame_size) else None
    return VideoPipeline(pipeline.model, pipeline.text_encoder, pipeline.vae, stream_config=pipeline.stream_config,
                         latent_hw=(height // factor, width // factor), fps=pipeline.fps,
                         default_frames=pipeline.default_frames, device=pipeline.device, dtype=pipeline.dtype,
                         vae_dtype=pipeline.vae_dtype, offload=pipeline.offload, pix_fmt=explicit,
                         description=f"{pipeline.description} at {height}x{width}")


def pipeline_from_args(args: argparse.Namespace) -> VideoPipeline:
    """Load the pipeline the model options describe, at ``--size`` if given (transformers' loading bars are
    silenced)."""
    try:
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    pipeline = load_pipeline(args.model, base=args.base, checkpoint=args.checkpoint, ema=args.ema, mode=args.mode,
                             steps=args.steps, device=args.device, dtype=DTYPES[args.dtype], offload=args.offload)
    return pipeline if args.size is None else resize_pipeline(pipeline, args.size)


def check_frames(frames: int | None) -> None:
    """Reject a pixel frame count that is not 1 + 4k before anything is loaded."""
    if frames is not None:
        latent_frames_for(frames)


# ---------------------------------------------------------------------------------------------------------------
# Inputs and output names
# ---------------------------------------------------------------------------------------------------------------
class Prompt(NamedTuple):
    """One video to make: its prompt and, from a manifest, the file stem to write it under."""

    text: str
    stem: str | None = None


def read_prompts(prompt: str | None, prompts_file: str | None) -> list[Prompt]:
    """The prompts: ``prompt``; or one per non-blank line of a UTF-8 text file (surrounding whitespace stripped);
    or, for a ``.jsonl`` file, the ``caption`` of every record of a ShapesWorld-style manifest, each video named
    after the record's ``file`` (``eval_000.npz`` → ``eval_000.mp4``, so ``eval shapes`` matches it)."""
    if prompt is not None:
        if not prompt.strip():
            raise InputError("the prompt is empty")
        return [Prompt(prompt.strip())]
    path = Path(prompts_file or "")
    if path.suffix.lower() == ".jsonl":
        if not path.is_file():
            raise InputError(f"prompts file not found: {path}")
        records = read_manifest(path)
        prompts = [Prompt(r["caption"].strip(), re.sub(r"[^A-Za-z0-9._-]+", "_", Path(r["file"]).stem).lstrip("."))
                   for r in records]
        if any(not p.text for p in prompts):
            raise InputError(f"{path}: a record has an empty caption")
        stems = [p.stem for p in prompts]
        duplicate = next((s for s in stems if not s or stems.count(s) > 1), None)
        if duplicate is not None:
            raise InputError(f"{path}: the file name {duplicate!r} is empty or used twice; video names would collide")
        return prompts
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"prompts file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read prompts file {path}: {e}") from None
    prompts = [Prompt(line.strip()) for line in text.splitlines() if line.strip()]
    if not prompts:
        raise InputError(f"prompts file {path} holds no prompt (one prompt per line)")
    return prompts


def slug(prompt: str, length: int = SLUG_LENGTH) -> str:
    """A file-name-safe stem of ``prompt``: ASCII letters and digits joined by '-', at most ``length`` chars."""
    ascii_text = unicodedata.normalize("NFKD", prompt).encode("ascii", "ignore").decode("ascii")
    words = re.sub(r"[^a-z0-9]+", "-", ascii_text.lower()).strip("-")
    return words[:length].rstrip("-") or "video"


def output_paths(out: str, prompts: list[Prompt], seed: int) -> list[Path]:
    """One MP4 path per prompt: ``out`` itself when it ends in .mp4 (one prompt only), else files in the
    directory ``out``: the manifest's stem, or ``<index>-<prompt slug>-seed<seed>.mp4`` (the index keeps equal
    slugs apart)."""
    target = Path(out)
    if target.suffix.lower() == ".mp4":
        if len(prompts) > 1:
            raise InputError(f"--out {out} names one file but there are {len(prompts)} prompts; pass a directory")
        return [target]
    width = max(3, len(str(len(prompts) - 1)))
    return [target / (f"{p.stem}.mp4" if p.stem else f"{i:0{width}d}-{slug(p.text)}-seed{seed}.mp4")
            for i, p in enumerate(prompts)]


def check_writable(directory: Path) -> None:
    """Create ``directory`` if needed and prove a file can be created in it."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=directory, prefix=".write-test-")
    except OSError as e:
        raise InputError(f"output directory {directory} is not writable: {e.strerror or e}") from None
    os.close(fd)
    os.unlink(probe)


def check_image(image: str | None) -> None:
    """Fail early on a missing or unreadable image (it is decoded again at its real size later)."""
    if image is not None:
        load_image(image, 8, 8)


# ---------------------------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------------------------
def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `generate` command."""
    p = subparsers.add_parser(
        "generate", help="generate videos (MP4) from prompts",
        description="Generate videos from text prompts (and optionally a first-frame image) with a few-step "
                    "streaming model. Writes one H.264 MP4 per prompt, atomically, and prints fps and time "
                    "to first frame.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", metavar="TEXT", help="the prompt")
    src.add_argument("--prompts-file", metavar="FILE",
                     help="a UTF-8 text file, one prompt per line; or a .jsonl manifest ('file' and 'caption' per "
                          "line, e.g. the ShapesBench evaluation set): videos are named after 'file'")
    p.add_argument("--image", metavar="IMG", default=None,
                   help="image-to-video: the first frame (scaled to cover the frame, centre-cropped); "
                        "frame-wise models only")
    p.add_argument("--frames", type=int, default=None, metavar="N",
                   help="pixel frames per video, 1 + 4k (default: the model's, 81 for Wan)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="noise seed, the same for every prompt (default 0)")
    p.add_argument("--out", default=DEFAULT_OUT, metavar="PATH",
                   help=f"an .mp4 file (one prompt) or a directory (default {DEFAULT_OUT}/)")
    add_model_arguments(p)
    p.set_defaults(func=run)


def _report(result: GenerationResult) -> str:
    t = result.timing
    return (f"wrote {result.path}: {result.num_frames} frames {result.width}x{result.height} @ {result.fps} fps "
            f"({result.pix_fmt}); generation {t.fps:.2f} fps with VAE decode, {t.fps_without_decode:.2f} without; "
            f"first frame after {t.time_to_first_frame_s:.3f} s")


def run(args: argparse.Namespace) -> int:
    """Check every input, load the model, write the videos, print the timings."""
    from tqdm import tqdm

    prompts = read_prompts(args.prompt, args.prompts_file)
    check_frames(args.frames)
    check_image(args.image)
    paths = output_paths(args.out, prompts, args.seed)
    check_writable(paths[0].parent)
    pipeline = pipeline_from_args(args)
    num_blocks = pipeline.num_blocks(args.frames, image=args.image is not None)
    print(f"model: {pipeline.description}; {pipeline.device}, {str(pipeline.dtype).removeprefix('torch.')}")
    results = []
    for i, (prompt, path) in enumerate(zip(prompts, paths)):
        with tqdm(total=num_blocks, desc=f"[{i + 1}/{len(prompts)}] {path.name}", unit="block", disable=None,
                  leave=False, file=sys.stderr) as bar:
            result = pipeline.generate_to_file(prompt.text, path, seed=args.seed, num_frames=args.frames,
                                               image=args.image, on_block=lambda _: bar.update())
        results.append(result)
        print(_report(result))
    if len(results) > 1:
        frames = sum(r.timing.pixel_frames for r in results)
        total = sum(r.timing.total_s for r in results)
        no_decode = sum(r.timing.setup_s + r.timing.denoise_s for r in results)
        ttff = sum(r.timing.time_to_first_frame_s or 0.0 for r in results) / len(results)
        print(f"{len(results)} videos: {frames / total:.2f} fps with VAE decode, {frames / no_decode:.2f} without; "
              f"mean time to first frame {ttff:.3f} s")
    return 0
