"""`matcher` stage: train the text–frame matcher (`models.matcher`) that chooses the best of N frame-0
candidates in a pipeline (`pipelines.first_frame`, `first_frame.candidates`).

Data (built once, to `out_dir/data.pt`; a pure function of `train.seed` and the stage config): `stage.frames`
ShapesWorld clips are rendered (never a held-out combination), their first frame is encoded with `stage.vae`,
and each frame gets its caption plus `stage.negatives` wrong captions, all encoded with `stage.text_encoder` (the
encoder whose embeddings the first-frame model reads). A caption is the canonical one or, with probability
`stage.paraphrase_prob`, a paraphrase, so the matcher reads prompts in any form the world's grammar allows. A
wrong caption (`negative_attrs`) keeps the motion words and changes what a frame shows: one attribute (size,
colour or shape) of one object, an attribute swapped between two objects, or an object added or removed; the
wrong caption never names a held-out combination either. The last `stage.val_frames` frames are not trained on.

Training: binary cross-entropy on (frame, caption) pairs, positives weighted `stage.pos_weight`; the frame gets
Gaussian noise of a random std up to `stage.latent_noise` (generated frames are not as clean as encoded ones).
The batch of step `s` is a pure function of (`train.seed`, `s`), and checkpoints (`training.loop`) make
`--resume` continue exactly. At the end the (EMA) matcher goes to `out_dir/final` (and `stage.export`), with
`eval.json`: on the validation frames, how often the true caption scores above every wrong one.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from ..checkpoints import atomic_path
from ..data import shapes
from ..data.shapes import ObjectAttrs
from ..errors import ConfigError
from ..models.matcher import FrameTextMatcher, MatcherConfig, save_matcher
from .loop import final_copy, resumable, start, train_loop, write_text

DATA_FILE = "data.pt"
DATA_SEED_BASE = 3_333_333
"""Dataset seed of the matcher's frames (plus `train.seed`), apart from the other stages' clips."""
_FIELDS = ("size", "color", "shape")


@dataclass
class Config:
    """The `stage:` section of `configs/shapes/matcher.yaml`."""

    size: int = 64                   # canvas side (pixels)
    vae: str = "shapes"              # the VAE whose latents the first-frame model makes
    text_encoder: str = "minilm"     # the text encoder the first-frame model reads (models/text.py kinds)
    text_len: int = 32
    frames: int = 16000              # frames in the dataset (the last val_frames are held back)
    val_frames: int = 1000
    negatives: int = 2               # wrong captions per frame
    paraphrase_prob: float = 0.5
    latent_noise: float = 0.3        # max std of the Gaussian noise added to training latents
    pos_weight: float = 2.0
    patch: int = 2
    dim: int = 128
    num_heads: int = 4
    num_layers: int = 3
    ffn_dim: int = 256
    threads: int = 2                 # torch intra-op threads (CPU)
    max_minutes: float = 0.0         # stop with a checkpoint after this much wall time; 0 = no limit
    export: str = ""                 # also write the final matcher folder here

    def validate(self) -> None:
        shapes.validate_canvas(self.size, shapes.MIN_FRAMES)
        checks = [
            (self.size % 8 == 0, "stage.size must be a multiple of 8"),
            (self.frames > self.val_frames >= 1, "stage.frames must exceed stage.val_frames >= 1"),
            (self.negatives >= 1, "stage.negatives must be >= 1"),
            (0.0 <= self.paraphrase_prob <= 1.0, "stage.paraphrase_prob must be in [0, 1]"),
            (self.latent_noise >= 0.0, "stage.latent_noise must be >= 0"),
            (self.pos_weight > 0.0, "stage.pos_weight must be > 0"),
            (self.threads >= 1, "stage.threads must be >= 1"),
            (self.max_minutes >= 0, "stage.max_minutes must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    def model_config(self, latent_channels: int, spatial_factor: int, text_dim: int) -> MatcherConfig:
        side = self.size // spatial_factor
        return MatcherConfig(in_dim=latent_channels, latent_hw=(side, side), patch=self.patch, text_dim=text_dim,
                             text_len=self.text_len, dim=self.dim, num_heads=self.num_heads,
                             num_layers=self.num_layers, ffn_dim=self.ffn_dim)


# ---------------------------------------------------------------------------------------------------------------
# Wrong captions
# ---------------------------------------------------------------------------------------------------------------
def _looks(attrs: Sequence[ObjectAttrs]) -> list[tuple[str, str, str]]:
    """What a still frame of ``attrs`` shows: the objects' (size, colour, shape), in no order."""
    return sorted((a.size, a.color, a.shape) for a in attrs)


def _allowed(attrs: list[ObjectAttrs]) -> bool:
    return not any(a.held_out for a in attrs) and len({a.color for a in attrs}) == len(attrs)


def _changed(attrs: tuple[ObjectAttrs, ...], rng: np.random.Generator) -> list[ObjectAttrs]:
    out = list(attrs)
    i = int(rng.integers(len(out)))
    name = _FIELDS[int(rng.integers(3))]
    values = {"size": tuple(shapes.SIZES), "color": tuple(shapes.COLORS), "shape": shapes.SHAPES}[name]
    other = [v for v in values if v != getattr(out[i], name)]
    out[i] = ObjectAttrs(**{**out[i].__dict__, name: other[int(rng.integers(len(other)))]})
    return out


def _swapped(attrs: tuple[ObjectAttrs, ...], rng: np.random.Generator) -> list[ObjectAttrs] | None:
    if len(attrs) != 2:
        return None
    differ = [f for f in _FIELDS if getattr(attrs[0], f) != getattr(attrs[1], f)]
    if not differ:
        return None
    name = differ[int(rng.integers(len(differ)))]
    a, b = attrs
    return [ObjectAttrs(**{**a.__dict__, name: getattr(b, name)}),
            ObjectAttrs(**{**b.__dict__, name: getattr(a, name)})]


def _recounted(attrs: tuple[ObjectAttrs, ...], rng: np.random.Generator) -> list[ObjectAttrs]:
    if len(attrs) == 2:
        return [attrs[int(rng.integers(2))]]
    extra = ObjectAttrs(size=tuple(shapes.SIZES)[int(rng.integers(len(shapes.SIZES)))],
                        color=tuple(shapes.COLORS)[int(rng.integers(len(shapes.COLORS)))],
                        shape=shapes.SHAPES[int(rng.integers(len(shapes.SHAPES)))],
                        motion=shapes.MOTIONS[int(rng.integers(len(shapes.MOTIONS)))])
    return [attrs[0], extra] if rng.random() < 0.5 else [extra, attrs[0]]


def negative_attrs(attrs: tuple[ObjectAttrs, ...], rng: np.random.Generator) -> tuple[ObjectAttrs, ...]:
    """What a wrong caption for a frame showing ``attrs`` says: one attribute of one object changed (half the
    time), an attribute swapped between two objects (0.3), or an object added or removed (0.2); never a held-out
    combination, never two objects of one colour, and never what a still frame of ``attrs`` shows too (a swap of
    colours between objects that differ only in motion is no wrong caption for frame 0)."""
    for _ in range(1000):
        kind = rng.random()
        out = _changed(attrs, rng) if kind < 0.5 else _swapped(attrs, rng) if kind < 0.8 else _recounted(attrs, rng)
        if out is not None and _allowed(out) and _looks(out) != _looks(attrs):
            return tuple(out)
    raise RuntimeError(f"no wrong caption found for {shapes.canonical_caption(attrs)!r}")


def _caption(attrs: tuple[ObjectAttrs, ...], rng: np.random.Generator, paraphrase_prob: float) -> str:
    if rng.random() < paraphrase_prob:
        return shapes.paraphrase(attrs, rng)
    return shapes.canonical_caption(attrs)


# ---------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def build_dataset(stage: Config, seed: int, vae: Any, text_encoder: Any, progress: bool = False) -> dict:
    """``{"latents": [N, C, h, w] fp16, "text": [N, 1 + negatives, L, D] fp16, "captions": [[str]]}``: frame 0 of
    ``stage.frames`` rendered clips, each with its caption first and then the wrong ones."""
    rng = np.random.default_rng(DATA_SEED_BASE + seed)
    frames, captions = [], []
    index = 0
    while len(frames) < stage.frames:
        spec, clip = shapes.render_seed(shapes.dataset_clip_seed(DATA_SEED_BASE + seed, index), stage.size,
                                        shapes.MIN_FRAMES)
        index += 1
        if spec.held_out:
            continue
        frames.append(clip[0])
        captions.append([_caption(spec.attrs, rng, stage.paraphrase_prob)] +
                        [_caption(negative_attrs(spec.attrs, rng), rng, stage.paraphrase_prob)
                         for _ in range(stage.negatives)])
    pixels = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).unsqueeze(1).float() / 127.5 - 1.0
    latents = torch.cat([vae.encode(pixels[i:i + 250])[:, 0] for i in range(0, len(pixels), 250)]).half()
    flat = [c for group in captions for c in group]
    text = []
    for i in range(0, len(flat), 512):
        text.append(text_encoder.encode(flat[i:i + 512]).half())
        if progress:
            print(f"matcher data: {min(i + 512, len(flat))}/{len(flat)} captions encoded", flush=True)
    embeddings = torch.cat(text).reshape(len(frames), 1 + stage.negatives, *text[0].shape[1:])
    return {"latents": latents, "text": embeddings, "captions": captions}


def load_or_build_dataset(cfg: Any, out: Path) -> dict:
    """``out/data.pt`` when it exists (written atomically), else built and written there."""
    path = out / DATA_FILE
    if path.is_file():
        return torch.load(path, map_location="cpu", weights_only=True)
    from ..models.small_vae import load_vae
    from ..models.text import build_text_encoder
    stage = cfg.stage
    vae = load_vae(stage.vae)
    text_encoder = build_text_encoder(stage.text_encoder, text_len=stage.text_len, device="cpu", cache_size=0)
    data = build_dataset(stage, cfg.train.seed, vae, text_encoder, progress=cfg.train.progress)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save({"latents": data["latents"], "text": data["text"]}, tmp)
    return data


def training_batch(data: dict, seed: int, step: int, batch: int, val_frames: int, latent_noise: float
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(latents [B·K, C, h, w], text [B·K, L, D], labels [B·K]) of step ``step``, K = 1 + negatives: a pure
    function of (seed, step)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    n = data["latents"].shape[0] - val_frames
    idx = torch.randint(n, (batch,), generator=gen)
    z = data["latents"][idx].float()
    z = z + torch.randn(z.shape, generator=gen) * torch.rand(batch, 1, 1, 1, generator=gen) * latent_noise
    k = data["text"].shape[1]
    text = data["text"][idx].float().transpose(0, 1).reshape(k * batch, *data["text"].shape[2:])
    labels = torch.cat([torch.ones(batch), torch.zeros((k - 1) * batch)])
    return z.repeat(k, 1, 1, 1), text, labels


@torch.no_grad()
def ranking_accuracy(model: FrameTextMatcher, data: dict, val_frames: int, batch: int = 250) -> dict[str, float]:
    """On the last ``val_frames`` frames: how often the true caption outscores every wrong one, how often it
    scores > 0 and how often a wrong one scores < 0."""
    z, text = data["latents"][-val_frames:].float(), data["text"][-val_frames:].float()
    scores = torch.cat([torch.stack([model(z[i:i + batch], text[i:i + batch, j]) for j in range(text.shape[1])], 1)
                        for i in range(0, val_frames, batch)])
    return {"ranking": float((scores[:, 0] > scores[:, 1:].max(1).values).float().mean()),
            "positive": float((scores[:, 0] > 0).float().mean()),
            "negative": float((scores[:, 1:] < 0).float().mean())}


# ---------------------------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------------------------
def run(cfg: Any, resume: bool = False) -> Path:
    """Train (or continue training) the matcher; returns `out_dir/final`, or `out_dir` when paused."""
    stage: Config = cfg.stage
    torch.set_num_threads(stage.threads)
    out = Path(cfg.train.out_dir)
    latest = resumable(out, resume)
    data = load_or_build_dataset(cfg, out)
    latents, text = data["latents"], data["text"]
    torch.manual_seed(cfg.train.seed)
    model = FrameTextMatcher(stage.model_config(latents.shape[1], stage.size // latents.shape[-1],
                                                text.shape[-1])).train()
    optimizer, ema, gen, step = start(cfg, model, out, latest)
    pos_weight = torch.tensor(stage.pos_weight)

    def losses(at: int) -> dict[str, torch.Tensor]:
        z, txt, labels = training_batch(data, cfg.train.seed, at, cfg.data.batch_size, stage.val_frames,
                                        stage.latent_noise)
        return {"loss": F.binary_cross_entropy_with_logits(model(z, txt), labels, pos_weight=pos_weight)}

    if not train_loop(cfg, model, optimizer, ema, gen, out, step, losses, desc="matcher",
                      max_minutes=stage.max_minutes):
        return out
    final = final_copy(model, ema, lambda: FrameTextMatcher(model.config))
    folder = save_matcher(final, out / "final")
    report = {**ranking_accuracy(final, data, stage.val_frames), "val_frames": stage.val_frames,
              "negatives": stage.negatives}
    write_text(folder / "eval.json", json.dumps(report, indent=2) + "\n")
    if stage.export:
        save_matcher(final, stage.export)
    print(f"matcher: the true caption ranks first for {report['ranking']:.3f} of {stage.val_frames} held-back "
          f"frames; saved {folder}")
    return folder
