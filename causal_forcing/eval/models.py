"""Score generative models with ShapesBench: generate one clip per evaluation prompt and judge it.

Generation is batched over prompts (the samplers take a batch), clips are decoded with the model's VAE and
scored in memory (``shapesbench.score_clip``); a few clips can be written as MP4 for inspection.
Three kinds of model:

* ``causal``         — a few-step causal student, the streaming sampler (``CausalStream``);
* ``autoregressive`` — the many-step AR teacher with CFG (``pipelines.teacher.sample_autoregressive``);
* ``bidirectional``  — the many-step bidirectional teacher with CFG (``sample_bidirectional``).
"""
from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from ..data.shapes_io import read_manifest, save_mp4
from ..errors import InputError
from ..models.wan import WanDiT
from ..pipelines.streaming import CausalStream, StreamConfig
from ..pipelines.teacher import sample_autoregressive, sample_bidirectional
from ..schedulers.flow import FewStepSchedule
from . import shapesbench

Kind = Literal["causal", "autoregressive", "bidirectional"]


@dataclass
class EvalSettings:
    kind: Kind = "causal"
    block_size: int = 1
    steps: tuple[float, ...] = (1000.0, 750.0, 500.0, 250.0)   # few-step list (causal) — warped
    first_block_steps: tuple[float, ...] | None = None
    teacher_steps: int = 20                                  # many-step samplers
    guidance: float = 4.0
    shift: float = 5.0
    frames: int = 81                                         # pixel frames per clip
    seed: int = 0
    batch_size: int = 25
    save_videos: int = 8                                     # first N clips also written as MP4
    first_frame: Any = None                                  # causal: a FirstFrameSampler that makes frame 0


def load_model_folder(path: str | Path) -> WanDiT:
    """A DiT from a model folder (``config.json`` + weights, e.g. a run's ``final_ema/``), in eval mode."""
    from ..checkpoints import load_dit_weights, load_into
    state, config = load_dit_weights(path)
    if config is None:
        raise InputError(f"{path}: no config.json next to the weights (pass a model folder)")
    model = WanDiT(config)
    load_into(model, state)
    return model.eval()


def _pixels_to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """[B, T, 3, H, W] in [-1, 1] → uint8 [B, T, H, W, 3]."""
    x = ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 1, 3, 4, 2).cpu().numpy()


@torch.no_grad()
def generate_latents(model: WanDiT, context: torch.Tensor, negative: torch.Tensor, s: EvalSettings,
                     latent_frames: int, latent_hw: tuple[int, int], seed: int,
                     prompts: Sequence[str] | None = None) -> torch.Tensor:
    if s.kind == "causal":
        sched = FewStepSchedule.from_config(s.steps, s.first_block_steps)
        first = s.first_frame
        if first is not None and hasattr(first, "for_prompts"):   # models with text encoders of their own
            if prompts is not None:
                first = first.for_prompts(prompts)
            elif first.text_encoder is not None or first.prefix_text_encoder is not None:
                raise ValueError("a first-frame model with its own text encoder needs the prompts")
        stream = CausalStream(model, context, latent_hw=latent_hw, num_frames=latent_frames,
                              config=StreamConfig(block_size=s.block_size, schedule=sched), seed=seed,
                              first_frame=first)
        return stream.generate()
    gen = torch.Generator(device=context.device).manual_seed(seed)
    if s.kind == "autoregressive":
        return sample_autoregressive(model, context, negative, num_frames=latent_frames, latent_hw=latent_hw,
                                     block_size=s.block_size, steps=s.teacher_steps, shift=s.shift,
                                     guidance=s.guidance, generator=gen)
    shape = (context.shape[0], latent_frames, model.config.in_dim, *latent_hw)
    return sample_bidirectional(model, context, negative, shape=shape, steps=s.teacher_steps, shift=s.shift,
                                guidance=s.guidance, generator=gen)


def generate_clips(model: WanDiT, vae: Any, text_encoder: Any, entries: Sequence[dict],
                   settings: EvalSettings) -> Iterator[tuple[list[dict], np.ndarray]]:
    """Generate one clip per manifest entry, `settings.batch_size` prompts at a time; yields each batch's entries
    and its uint8 clips `[B, T, H, W, 3]`. A batch starting at entry `start` uses noise seed `settings.seed +
    start`, so a given (settings, manifest) always gives the same clips, whatever decodes or judges them."""
    latent_frames = 1 + (settings.frames - 1) // 4
    size = entries[0].get("size", 64)
    hw = (size // vae.spatial_factor, size // vae.spatial_factor)
    for start in range(0, len(entries), settings.batch_size):
        batch = list(entries[start:start + settings.batch_size])
        ctx = text_encoder.encode([e["caption"] for e in batch]).float()
        lat = generate_latents(model, ctx, torch.zeros_like(ctx), settings, latent_frames, hw, settings.seed + start,
                               prompts=[e["caption"] for e in batch])
        with torch.no_grad():
            yield batch, _pixels_to_uint8(vae.decode(lat))


def evaluate(model: WanDiT, vae: Any, text_encoder: Any, manifest: str | Path, settings: EvalSettings, *,
             out_dir: str | Path | None = None, limit: int | None = None, progress: bool = False) -> dict:
    """Generate and judge one clip per manifest entry; returns the ShapesBench report (plus timing)."""
    entries = read_manifest(manifest)[:limit]
    if not entries:
        raise InputError(f"no prompts to evaluate in {manifest}")
    model.eval()
    out = Path(out_dir) if out_dir else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    results, errors = [], []
    t0 = time.perf_counter()
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(entries), desc=f"eval {settings.kind}", dynamic_ncols=True)
    start = 0
    for batch, frames in generate_clips(model, vae, text_encoder, entries, settings):
        for j, (entry, clip) in enumerate(zip(batch, frames)):
            try:
                results.append({**shapesbench.score_clip(clip, entry["caption"]), "file": entry.get("file")})
            except Exception as e:  # noqa: BLE001 - a clip that cannot be scored is reported, not fatal
                errors.append({"file": entry.get("file"), "error": str(e)})
            if out is not None and start + j < settings.save_videos:
                save_mp4(out / f"{Path(entry.get('file', f'clip_{start + j:03d}')).stem}.mp4", clip,
                         pix_fmt="yuv444p")
        start += len(batch)
        if bar is not None:
            bar.update(len(batch))
    if bar is not None:
        bar.close()
    rep = shapesbench.report(results, errors, kind=settings.kind, seconds=time.perf_counter() - t0)
    if out is not None:
        (out / "scores.json").write_text(json.dumps(rep, indent=1))
    return rep


def summary_line(name: str, rep: dict) -> dict[str, Any]:
    """The headline numbers of a report, for tables."""
    row: dict[str, Any] = {"model": name}
    for split in ("in_distribution", "held_out"):
        s = rep[split]
        for key in ("total", "semantic", "quality", "all_correct", "color", "shape", "size", "motion",
                    "speed_ratio", "motion_axis"):
            row[f"{split}.{key}"] = s.get(key)
    return row


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0
