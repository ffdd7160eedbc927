"""`vae` stage: train the small ShapesWorld VAE (`causal_forcing.models.small_vae.SmallVAE`).

A self-contained loop (not `trainer.Trainer`, which drives DiTs): plain reconstruction training of a small
autoencoder on ShapesWorld clips. Data comes from `data.path` (a `causal-forcing data shapes` folder) or, when
that is empty, is rendered on the fly (`shapes.render_seed`, about 0.5 ms per clip), so every step sees new
clips; neither contains held-out combinations. A training sample is a window of `stage.frames` (1 + 4k)
consecutive frames cut at a random offset from a `stage.source_frames`-frame clip, so windows contain wall
bounces (which never happen in a clip's first 16 frames). Windows are a valid way to train on 81-frame videos:
every layer of the model is causal with a short temporal reach (a few latent frames), and a window's first
frame is encoded as any video's first frame. For the first `stage.crop_steps` steps the windows are cropped to
random 8-aligned `stage.crop`-pixel squares (the network is convolutional; 4x cheaper steps at 32 px).
With probability `stage.recolor_prob` a clip's objects get random RGB colours (`recolor`) so that the network
learns shapes apart from their palette colour; a colour is redrawn while the judge would read it as black or
as a held-out combination (a yellow triangle, a purple object moving up), so none is ever shown.

Loss on the decoded frames (the decoder's 3 pre-roll frames excluded), pixels in [-1, 1]:
`l1 * |x̂ - x| + l2 * (x̂ - x)² + edge * (|∂h x̂ - ∂h x| + |∂w x̂ - ∂w x|) + palette * CE + offpalette * H
+ latent_l2 * mean(z²)`,
where CE (`palette_loss`) is the cross-entropy between the judge's colour class of each target pixel and a
softmax over the output pixel's distances to the judge's colours, H (`offpalette_loss`) a hinge on each output
pixel's distance to the nearest of those colours, whatever the target, and the decoder sees z plus Gaussian noise of
`latent_noise` times the batch's latent RMS (robustness to imperfect generated latents). L1, edge and CE keep
palette colours exact and edges hard, which the judge needs; L2 weighs the few large errors on objects.
`train.init` starts from the weights of a `SmallVAE` folder with the same architecture (a fine-tune). With
`stage.trainable: decoder` only the decoder learns: the encoder is frozen and the init's latent statistics are
kept, so latent datasets and every DiT trained on them stay valid (used to make the decoder tolerate generated
latents with a larger `latent_noise`).

Resumable: every `train.save_every` steps (and at the end, or when `stage.max_minutes` is used up) the weights,
the EMA shadow, the optimizer, the step and the noise generator's state are written atomically to
`out_dir/checkpoints/step-N/state.pt` and `checkpoints/latest` points at it. The batch of step `s` is a pure
function of (`train.seed`, `s`), so a resumed run trains on the same data as an uninterrupted one. At the end
the latent statistics are measured on `stats_clips` clips (kept from the init with `trainable: decoder`), the
(EMA) model is saved to `out_dir/final` (and to `stage.export` when set), and its reconstruction PSNR on
`eval_clips` unseen clips goes to `final/eval.json`.
"""
from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from ..data import shapes
from ..data.shapes_io import (
    MANIFEST_NAME,
    load_clip,
    read_manifest,
    save_clip,
    write_manifest,
)
from ..errors import ConfigError, InputError
from ..models.small_vae import SmallVAE, SmallVAEConfig, latent_frames_for
from .loop import final_copy, resumable, start, train_loop, write_text
from .trainer import EMA

EVAL_SEED_BASE = 7_777_777
"""Dataset seed of the held-out PSNR clips (training clips use `train.seed`)."""
STATS_SEED_BASE = 5_555_555
"""Dataset seed of the clips the latent statistics are measured on."""


@dataclass
class Config:
    """The `stage:` section of `configs/shapes/vae.yaml`."""

    size: int = 64                       # canvas side (pixels)
    frames: int = 17                     # training window, 1 + 4k frames
    source_frames: int = 81              # clip length the windows are cut from
    crop: int = 0                        # side of random 8-aligned square crops (0 = full frames) ...
    crop_steps: int = 0                  # ... used for the first crop_steps steps, full frames afterwards
    recolor_prob: float = 0.0            # share of clips whose objects get random (non-held-out) colours
    encoder_channels: tuple[int, int, int, int] = (24, 48, 64, 128)
    encoder_blocks: tuple[int, int] = (1, 2)
    decoder_channels: tuple[int, int, int, int] = (128, 64, 32, 16)
    decoder_blocks: tuple[int, int, int] = (2, 2, 1)
    output: Literal["rgb", "alpha"] = "rgb"  # decoder head (see models.small_vae)
    l1_weight: float = 1.0
    l2_weight: float = 0.0
    edge_weight: float = 0.5
    palette_weight: float = 0.0          # judge-colour cross-entropy (`palette_loss`)
    palette_temperature: float = 0.1
    offpalette_weight: float = 0.0       # hinge on each output pixel's distance to its nearest judge colour
    offpalette_margin: float = 20.0      # ... beyond this many 0-255 RGB units (`offpalette_loss`)
    latent_l2_weight: float = 1e-4
    latent_noise: float = 0.1            # relative to the batch's latent RMS; 0 = none
    trainable: Literal["all", "decoder"] = "all"  # "decoder": encoder frozen, latent space and statistics kept
    threads: int = 2                     # torch intra-op threads (CPU)
    max_minutes: float = 0.0             # stop with a checkpoint after this much wall time; 0 = no limit
    stats_clips: int = 64
    eval_clips: int = 16
    export: str = ""                     # also write the final model folder here ("" = only out_dir/final)

    def validate(self) -> None:
        shapes.validate_canvas(self.size, self.source_frames)
        latent_frames_for(self.frames)
        checks = [
            (self.size % 8 == 0, "stage.size must be a multiple of 8"),
            (self.frames <= self.source_frames, "stage.frames must be <= stage.source_frames"),
            (self.crop % 8 == 0 and 0 <= self.crop <= self.size, "stage.crop must be 0 or a multiple of 8 <= size"),
            (self.crop_steps >= 0, "stage.crop_steps must be >= 0"),
            (0 <= self.recolor_prob <= 1, "stage.recolor_prob must be in [0, 1]"),
            (self.l1_weight >= 0 and self.l2_weight >= 0 and self.edge_weight >= 0 and self.latent_l2_weight >= 0,
             "stage loss weights must be >= 0"),
            (self.l1_weight + self.l2_weight > 0, "stage.l1_weight or stage.l2_weight must be > 0"),
            (self.palette_weight >= 0 and self.palette_temperature > 0,
             "stage.palette_weight must be >= 0 and stage.palette_temperature > 0"),
            (self.offpalette_weight >= 0 and self.offpalette_margin >= 0,
             "stage.offpalette_weight and stage.offpalette_margin must be >= 0"),
            (self.latent_noise >= 0, "stage.latent_noise must be >= 0"),
            (self.trainable in ("all", "decoder"), "stage.trainable must be 'all' or 'decoder'"),
            (self.threads >= 1, "stage.threads must be >= 1"),
            (self.max_minutes >= 0, "stage.max_minutes must be >= 0"),
            (self.stats_clips >= 1 and self.eval_clips >= 1, "stage.stats_clips and stage.eval_clips must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    def model_config(self) -> SmallVAEConfig:
        return SmallVAEConfig(encoder_channels=self.encoder_channels, encoder_blocks=self.encoder_blocks,
                              decoder_channels=self.decoder_channels, decoder_blocks=self.decoder_blocks,
                              output=self.output)


# ---------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------
def frames_to_tensor(frames: np.ndarray) -> Tensor:
    """uint8 `[T, H, W, 3]` -> float32 `[T, 3, H, W]` in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


_JUDGE_COLORS = np.array([(0, 0, 0), *shapes.COLORS.values()], dtype=np.float64)
_JUDGE_NAMES = ("black", *shapes.COLORS)


def judged_color(rgb: Sequence[int]) -> str:
    """The palette name (or "black") the ShapesBench judge assigns to an RGB colour: the nearest one."""
    return _JUDGE_NAMES[int(np.argmin(((_JUDGE_COLORS - np.asarray(rgb, dtype=np.float64)) ** 2).sum(1)))]


def random_object_color(attrs: shapes.ObjectAttrs, rng: np.random.Generator) -> tuple[int, int, int]:
    """A uniformly random RGB colour for an object with `attrs`, redrawn while the judge would call it black or
    it would make the object a held-out combination (a yellow triangle, a purple object moving up)."""
    while True:
        rgb = tuple(int(v) for v in rng.integers(0, 256, 3))
        name = judged_color(rgb)
        if name != "black" and not dataclasses.replace(attrs, color=name).held_out:
            return rgb


def recolor(frames: np.ndarray, objects: Sequence[shapes.ObjectAttrs], rng: np.random.Generator) -> np.ndarray:
    """A copy of `frames` in which every object's palette colour is replaced by `random_object_color`."""
    out = frames.copy()
    for attrs in objects:
        out[np.all(frames == shapes.COLORS[attrs.color], axis=-1)] = random_object_color(attrs, rng)
    return out


class ClipSource:
    """Training clips and their objects: rendered from seeds, or read from a `data shapes` folder (cached in
    memory, uint8)."""

    def __init__(self, folder: str, size: int, frames: int) -> None:
        self.size, self.frames = size, frames
        self.clips: list[tuple[np.ndarray, tuple[shapes.ObjectAttrs, ...]]] = []
        if folder:
            for record in read_manifest(Path(folder) / MANIFEST_NAME):
                clip = load_clip(Path(folder) / record["file"])
                if clip.shape[1] != size or clip.shape[0] < frames:
                    raise InputError(f"{record['file']}: {clip.shape[0]}x{clip.shape[1]} px clip; the stage needs "
                                     f"{size} px and >= {frames} frames")
                self.clips.append((clip, shapes.parse_caption(record["caption"])))

    def clip(self, index: int) -> tuple[np.ndarray, tuple[shapes.ObjectAttrs, ...]]:
        """Frames and objects of dataset clip `index` modulo the dataset size, or of the rendered clip with seed
        `index`."""
        if self.clips:
            return self.clips[index % len(self.clips)]
        spec, frames = shapes.render_seed(index, self.size, self.frames)
        return frames, spec.attrs


def training_batch(source: ClipSource, seed: int, step: int, batch: int, frames: int, crop: int = 0,
                   recolor_prob: float = 0.0) -> Tensor:
    """Pixels `[batch, frames, 3, H, W]` of step `step`, a pure function of (seed, step): windows of `frames`
    frames at random offsets, cropped to random 8-aligned `crop` x `crop` squares when `crop` > 0, with the
    objects recoloured (`recolor`) with probability `recolor_prob`."""
    rng = np.random.default_rng([seed, step])
    windows = []
    for _ in range(batch):
        clip, objects = source.clip(int(rng.integers(0, 2**53)))
        start = int(rng.integers(0, clip.shape[0] - frames + 1))
        window = clip[start:start + frames]
        if crop:
            top, left = (8 * int(rng.integers(0, (clip.shape[1] - crop) // 8 + 1)) for _ in range(2))
            window = window[:, top:top + crop, left:left + crop]
        if recolor_prob and rng.random() < recolor_prob:
            window = recolor(window, objects, rng)
        windows.append(frames_to_tensor(window))
    return torch.stack(windows)


def dataset_clips(base_seed: int, count: int, size: int, frames: int) -> Tensor:
    """`count` rendered clips `[count, frames, 3, size, size]` with seeds `dataset_clip_seed(base_seed, i)`."""
    return torch.stack([frames_to_tensor(shapes.render_seed(shapes.dataset_clip_seed(base_seed, i), size, frames)[1])
                        for i in range(count)])


# ---------------------------------------------------------------------------------------------------------------
# Loss, schedule, statistics, evaluation
# ---------------------------------------------------------------------------------------------------------------
def reconstruction_loss(model: SmallVAE, pixels: Tensor, stage: Config, gen: torch.Generator,
                        bf16: bool = False) -> dict[str, Tensor]:
    """Loss terms of one batch (see the module docstring); `loss` is their weighted sum. `bf16`: run the
    network under bfloat16 autocast (the weights and the loss stay float32)."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        with torch.set_grad_enabled(torch.is_grad_enabled() and stage.trainable == "all"):
            z = model.encode_raw(pixels).float()
        rms = z.detach().pow(2).mean().sqrt()
        noisy = z + stage.latent_noise * rms * torch.randn(z.shape, generator=gen) if stage.latent_noise else z
        out = model.decode_raw(noisy)[:, 3:].float()
    diff = out - pixels
    terms = {"l1": diff.abs().mean(), "l2": diff.pow(2).mean(),
             "edge": ((diff.diff(dim=-1)).abs().mean() + (diff.diff(dim=-2)).abs().mean()),
             "palette": palette_loss(out, pixels, stage.palette_temperature) if stage.palette_weight else
             torch.zeros(()),
             "offpalette": offpalette_loss(out, stage.offpalette_margin) if stage.offpalette_weight else
             torch.zeros(()), "latent_l2": z.pow(2).mean()}
    terms["loss"] = (stage.l1_weight * terms["l1"] + stage.l2_weight * terms["l2"]
                     + stage.edge_weight * terms["edge"] + stage.palette_weight * terms["palette"]
                     + stage.offpalette_weight * terms["offpalette"]
                     + stage.latent_l2_weight * terms["latent_l2"])
    return terms


def palette_loss(out: Tensor, target: Tensor, temperature: float) -> Tensor:
    """Cross-entropy between the judge's colour classes of the target pixels (nearest of black + palette, hard)
    and of the output pixels (softmax of -squared distance / temperature), pixels `[..., 3, H, W]` in [-1, 1].

    Near zero where an output pixel is clearly nearest to its target's class; large where the judge would
    assign it another colour (soft edges and thin tips of shapes), which L1/L2 weigh no more than other pixels.
    """
    centres = torch.from_numpy(_JUDGE_COLORS / 127.5 - 1.0).float()  # [K, 3]

    def sq_dist(x: Tensor) -> Tensor:  # [..., 3, H, W] -> [..., K, H, W]
        return (x.unsqueeze(-4) - centres.view(-1, 3, 1, 1)).pow(2).sum(-3)

    labels = sq_dist(target).argmin(-3)
    logits = -sq_dist(out) / temperature
    return F.cross_entropy(logits.flatten(0, -4), labels.flatten(0, -3))


def offpalette_loss(out: Tensor, margin: float) -> Tensor:
    """Mean hinge ``max(0, d - margin) / 255`` on each output pixel's RGB distance ``d`` (0-255 units) to the
    nearest judge colour (black or a palette colour), pixels ``[..., 3, H, W]`` in [-1, 1].

    Every pixel of a ShapesWorld clip is one of those colours. Unlike `palette_loss` it does not ask for the
    target pixel's colour: an edge pixel the decoder is unsure of may become the object's colour or black, but
    not the dim mixture of both that L1 settles on where the edge's place is uncertain."""
    centres = torch.from_numpy(_JUDGE_COLORS).to(out)                     # [K, 3], 0-255
    rgb = (out.movedim(-3, -1).reshape(-1, 1, 3) + 1.0) * 127.5              # [N, 1, 3]
    # the square root of a clamped sum, not cdist: the gradient of a zero distance must stay finite
    nearest = (rgb - centres).pow(2).sum(-1).amin(dim=-1).clamp_min(1e-12).sqrt()
    return F.relu(nearest - margin).mean() / 255.0


@torch.no_grad()
def latent_statistics(model: SmallVAE, clips: Tensor, batch: int = 4) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the raw latents of `clips` `[N, T, 3, H, W]`."""
    latents = torch.cat([model.encode_raw(clips[i:i + batch]) for i in range(0, len(clips), batch)])
    per_channel = latents.transpose(0, 2).flatten(1)  # [C, N * F * h * w]
    return per_channel.mean(1).tolist(), per_channel.std(1).clamp_min(1e-6).tolist()


def psnr(a: Tensor, b: Tensor) -> float:
    """PSNR in dB of two uint8-range videos given in [-1, 1] (peak-to-peak 2)."""
    mse = (a.float() - b.float()).pow(2).mean().item()
    return float("inf") if mse == 0 else 10.0 * math.log10(4.0 / mse)


@torch.no_grad()
def reconstruct(model: SmallVAE, pixels: Tensor, batch: int = 4) -> Tensor:
    """Encode and decode `[N, T, 3, H, W]` pixels, quantised to uint8 levels like saved videos."""
    out = torch.cat([model.decode(model.encode(pixels[i:i + batch])) for i in range(0, len(pixels), batch)])
    return ((out + 1.0) * 127.5).round() / 127.5 - 1.0


def reconstruct_folder(clips: str | Path, vae: Any, out: str | Path,
                       progress: Any = None) -> dict[str, float]:
    """Encode and decode every clip of a `data shapes` folder with `vae`; write the reconstructions (same file
    names, uint8 `.npz`) and a copy of the manifest to `out`, so `causal-forcing eval shapes --videos out` scores
    them. Returns the mean, min and max per-clip PSNR (dB) against the originals."""
    clips, out = Path(clips), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    records = read_manifest(clips / MANIFEST_NAME)
    values = []
    for done, record in enumerate(records, 1):
        frames = load_clip(clips / record["file"])
        with torch.inference_mode():
            decoded = vae.decode(vae.encode(frames_to_tensor(frames).unsqueeze(0)))[0]
        recon = ((decoded.permute(0, 2, 3, 1) + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
        save_clip(out / record["file"], recon)
        values.append(psnr(frames_to_tensor(recon), frames_to_tensor(frames)))
        if progress is not None:
            progress(done, len(records))
    write_manifest(out / MANIFEST_NAME, records)
    return {"psnr_mean": float(np.mean(values)), "psnr_min": float(np.min(values)),
            "psnr_max": float(np.max(values)), "clips": len(values)}


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------------------
# ---------------------------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------------------------
def _load_init(model: SmallVAE, folder: str) -> None:
    """Start from the weights of a `SmallVAE` folder (a previous run's `final`) with the same architecture."""
    init = SmallVAE.from_folder(folder)
    stats = {"latents_mean": model.config.latents_mean, "latents_std": model.config.latents_std}
    if dataclasses.replace(init.config, **stats) != model.config:
        raise ConfigError(f"train.init {folder} has another architecture than the stage config")
    model.load_state_dict(init.state_dict())


def finish(cfg: Any, model: SmallVAE, ema: EMA | None, out: Path) -> Path:
    """Measure latent statistics, save `out/final` (and `stage.export`), write the held-out PSNR."""
    stage = cfg.stage
    final = final_copy(model, ema, lambda: SmallVAE(model.config))
    if stage.trainable == "decoder":  # same encoder: keep the statistics every trained DiT was fitted to
        init = SmallVAE.from_folder(cfg.train.init).config
        mean, std = list(init.latents_mean), list(init.latents_std)
    else:
        mean, std = latent_statistics(final, dataset_clips(STATS_SEED_BASE, stage.stats_clips, stage.size,
                                                            stage.source_frames))
    final.with_stats(mean, std)
    clips = dataset_clips(EVAL_SEED_BASE, stage.eval_clips, stage.size, stage.source_frames)
    recon = reconstruct(final, clips)
    report = {"psnr_db": psnr(recon, clips), "eval_clips": stage.eval_clips, "frames": stage.source_frames,
              "size": stage.size, "eval_seed_base": EVAL_SEED_BASE}
    folder = final.save_folder(out / "final")
    write_text(folder / "eval.json", json.dumps(report, indent=2) + "\n")
    if stage.export:
        final.save_folder(stage.export)
    print(f"held-out reconstruction PSNR {report['psnr_db']:.2f} dB on {stage.eval_clips} clips; saved {folder}")
    return folder


def run(cfg: Any, resume: bool = False) -> Path:
    """Train (or continue training) the small VAE; returns `out_dir/final`, or `out_dir` when paused."""
    stage: Config = cfg.stage
    torch.set_num_threads(stage.threads)
    if cfg.train.precision == "fp16":
        raise ConfigError("the vae stage trains in fp32 or bf16 (train.precision), not fp16")
    bf16 = cfg.train.precision == "bf16"
    out = Path(cfg.train.out_dir)
    latest = resumable(out, resume)
    torch.manual_seed(cfg.train.seed)
    model = SmallVAE(stage.model_config()).train()
    if stage.trainable == "decoder":
        if not cfg.train.init:
            raise ConfigError("stage.trainable=decoder fine-tunes a trained VAE: set train.init to its folder")
        model.encoder.requires_grad_(False)
    if cfg.train.init and latest is None:
        _load_init(model, cfg.train.init)
    optimizer, ema, gen, step = start(cfg, model, out, latest)
    source = ClipSource(cfg.data.path, stage.size, stage.source_frames)

    def losses(at: int) -> dict[str, Tensor]:
        crop = stage.crop if at < stage.crop_steps else 0
        pixels = training_batch(source, cfg.train.seed, at, cfg.data.batch_size, stage.frames, crop,
                                stage.recolor_prob)
        return reconstruction_loss(model, pixels, stage, gen, bf16)

    if not train_loop(cfg, model, optimizer, ema, gen, out, step, losses, desc="vae", max_minutes=stage.max_minutes):
        return out
    return finish(cfg, model, ema, out)
