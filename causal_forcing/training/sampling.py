"""Periodic sample videos and ShapesBench scores during a training run (``train.sample_every``).

Every ``train.sample_every`` steps the trainer calls the stage's ``sample`` method, which calls
``sample_and_score(trainer, kind)`` once. The generator as it stands — its EMA weights once the run has them
(what ``final_ema/`` will hold), else its raw weights — generates one clip for each of the first
``train.sample_count`` prompts of ``train.sample_manifest`` (a ShapesWorld evaluation manifest, e.g.
``data/eval/manifest.jsonl``) with ``eval.models.evaluate``: MiniLM text embeddings at the model's
``text_len``, clips as long as the manifest's, decoded by the VAE at ``train.sample_vae``. The MP4s and the
ShapesBench report go to ``out_dir/samples/step-NNNNNNNN/``; the headline numbers are appended to
``out_dir/samples.jsonl`` (one line per sampling, lines of steps not yet reached again dropped on resume, like
``metrics.jsonl``).

Sampling uses its own seeded generators and restores torch's global generators, so a run with samples trains
exactly like one without.
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from ..checkpoints import atomic_path, load_into
from ..data.shapes import DEFAULT_FRAMES
from ..data.shapes_io import read_manifest
from ..errors import ConfigError
from ..eval.models import EvalSettings, Kind, evaluate
from ..models.frames import pixel_frames_for
from ..models.wan import WanDiT

SAMPLES_DIR = "samples"
SAMPLES_LOG = "samples.jsonl"
HEADLINE_SPLITS = ("all", "in_distribution", "held_out")
HEADLINE_KEYS = ("n", "total", "semantic", "quality", "all_correct")


@lru_cache(maxsize=2)
def _text_encoder(text_len: int, device: str) -> Any:
    """MiniLM per-token embeddings (loaded once per process and length)."""
    from ..models.text import build_text_encoder
    return build_text_encoder("minilm", text_len=text_len, device=device)


def _load_vae(path: str, device: torch.device) -> Any:
    from ..models.small_vae import load_vae
    return load_vae(path, device=device)


def eval_settings(cfg: Any, kind: Kind, frames: int) -> EvalSettings:
    """Sampler settings of a run: the stage's block size, the DMD generator's own few-step schedule, the
    run's seed; the remaining settings are ``EvalSettings``' defaults, as in the recipe's final evaluation."""
    s, t = cfg.stage, cfg.train
    settings = EvalSettings(kind=kind, block_size=getattr(s, "block_size", 1), frames=frames, seed=t.seed,
                            batch_size=t.sample_count, save_videos=t.sample_count)
    steps = getattr(s, "steps", None)
    if kind == "causal" and isinstance(steps, list):  # dmd: sample with the schedule the rollout uses
        settings.steps = tuple(steps)
        settings.first_block_steps = tuple(s.first_block_steps) or None
    return settings


def headline(step: int, kind: str, weights: str, report: dict) -> dict[str, Any]:
    """The line of ``samples.jsonl`` for one sampling: totals of every split and the error count."""
    row: dict[str, Any] = {"step": step, "kind": kind, "weights": weights, "seconds": report["seconds"],
                           "n_errors": report["n_errors"]}
    for split in HEADLINE_SPLITS:
        for key in HEADLINE_KEYS:
            row[f"{split}.{key}"] = report[split][key]
    return row


def append_headline(path: Path, row: dict[str, Any]) -> None:
    """Append ``row``, first dropping lines of this or later steps (left by a run that was resumed)."""
    kept = []
    if path.exists():
        kept = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] < row["step"]]
    with atomic_path(path) as tmp:
        tmp.write_text("".join(ln + "\n" for ln in kept) + json.dumps(row) + "\n")


def sample_and_score(trainer: Any, kind: Kind) -> dict | None:
    """Sample the ``generator`` network, score the clips with ShapesBench and record the result.

    Every rank must call this (gathering sharded weights is collective); rank 0 samples and returns the
    ShapesBench report, the other ranks return None.
    """
    t = trainer.cfg.train
    if not t.sample_manifest or not t.sample_vae:
        raise ConfigError("train.sample_every needs train.sample_manifest and train.sample_vae")
    net = trainer.trainables["generator"]
    use_ema = net.ema is not None
    weights = trainer.full_weights("generator", ema=use_ema)
    if not trainer.dist.is_main:
        return None
    device = trainer.device
    entries = read_manifest(t.sample_manifest)
    frames = int(entries[0].get("frames", DEFAULT_FRAMES))
    if trainer.cfg.data.max_frames:  # sample clips as long as the ones the run trains on
        frames = min(frames, pixel_frames_for(trainer.cfg.data.max_frames))
    out = trainer.out / SAMPLES_DIR / f"step-{trainer.step:08d}"
    cuda = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        model = WanDiT(net.raw.config)
        load_into(model, weights)
        model = model.to(device).eval().requires_grad_(False)
        model.attn_backend = net.raw.attn_backend
        text = _text_encoder(model.config.text_len, str(device))
        if text.dim != model.config.text_dim:
            raise ConfigError(f"periodic samples use MiniLM text ({text.dim}-d); the model expects "
                              f"text_dim={model.config.text_dim}")
        report = evaluate(model, _load_vae(t.sample_vae, device), text, t.sample_manifest,
                          eval_settings(trainer.cfg, kind, frames), out_dir=out, limit=t.sample_count)
    append_headline(trainer.out / SAMPLES_LOG, headline(trainer.step, kind, "ema" if use_ema else "raw", report))
    return report

