"""Encode a ShapesWorld clip folder (`causal-forcing data shapes`) into a latent dataset (`data.latents`).

Each clip of the folder's manifest becomes one sample: `latents` [F, C, h, w] (the VAE's normalised latents,
[21, 16, 8, 8] for 81 frames at 64 px), optionally `context` [text_len, dim] (per-token text embeddings of the
training caption), and a record: the manifest entry with `id` (the clip file's stem), `caption` (the caption
to train on: the manifest's `train_caption`, a paraphrase or the canonical caption) and `canonical` (the
canonical caption, which the judge scores against).

Resumable and atomic: `LatentWriter` writes whole shards atomically and keeps buffered samples when the run is
interrupted, and a rerun skips every id already stored. Clips are encoded one at a time, so a sample's latents
do not depend on which other clips shared its batch: an interrupted and resumed run stores the same dataset as
an uninterrupted one. Rerunning on a folder written with another VAE, text encoder or source raises InputError.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError
from .latents import LatentDataset, LatentWriter
from .shapes_io import MANIFEST_NAME, load_clip, read_manifest

__all__ = ["EncodeSummary", "encode_clips", "reencode_text", "sample_record"]

_CHECKED_META = ("source", "vae", "text_encoder", "text_len")
"""Dataset metadata that must match when a run continues an existing folder."""


@dataclass(frozen=True)
class EncodeSummary:
    """What one `encode_clips` call did."""

    out: Path
    total: int      # clips in the manifest (after `limit`)
    encoded: int    # clips encoded by this call
    skipped: int    # clips already in the dataset


def sample_record(entry: dict[str, Any]) -> dict[str, Any]:
    """Dataset record of one manifest entry: the entry plus `id`, `caption` (training caption), `canonical`."""
    record = {k: v for k, v in entry.items() if k != "train_caption"}
    record.update(id=Path(entry["file"]).stem, caption=entry.get("train_caption", entry["caption"]),
                  canonical=entry["caption"])
    return record


def _frames_to_pixels(frames: Any) -> torch.Tensor:
    """uint8 `[T, H, W, 3]` -> float32 `[1, T, 3, H, W]` in [-1, 1]."""
    return (torch.from_numpy(frames.copy()).permute(0, 3, 1, 2).float() / 127.5 - 1.0).unsqueeze(0)


def _check_meta(folder: Path, meta: dict[str, Any]) -> None:
    """Refuse to continue a dataset written from another source, VAE or text encoder."""
    path = folder / "meta.json"
    if not path.exists():
        return
    existing = json.loads(path.read_text())
    for key in _CHECKED_META:
        if existing.get(key) != meta[key]:
            raise InputError(f"{folder} was written with {key}={existing.get(key)!r}, this run has {meta[key]!r}; "
                             f"choose another --out")


def encode_clips(clips: str | Path, vae: Any, out: str | Path, *, vae_name: str = "", text_encoder: Any = None,
                 text_encoder_name: str = "", shard_size: int = 64, limit: int | None = None,
                 progress: Callable[[int, int], None] | None = None) -> EncodeSummary:
    """Encode the clips of `clips/manifest.jsonl` with `vae` (a `WanVAE` or `SmallVAE`, on any device: each clip is
    moved to its parameters' device) into the dataset `out`.

    `text_encoder` (a `models.text` encoder, optional) adds `context`; `vae_name` / `text_encoder_name` are
    recorded in `meta.json` and checked when a later run continues the folder. `limit` encodes only the first
    clips; `progress(done, total)` is called after each clip. Returns counts of encoded and skipped clips.
    """
    clips = Path(clips)
    entries = read_manifest(clips / MANIFEST_NAME)[:limit]
    text_len = int(text_encoder.text_len) if text_encoder is not None else None
    meta = {"source": str(clips.resolve()), "vae": vae_name, "text_encoder": text_encoder_name or None,
            "text_len": text_len, "latent_channels": int(vae.latent_channels)}
    out = Path(out)
    _check_meta(out, meta)
    skipped = 0
    device = next(iter(vae.parameters())).device if hasattr(vae, "parameters") else torch.device("cpu")
    with LatentWriter(out, kind="latents", shard_size=shard_size, meta=meta) as writer:
        for done, entry in enumerate(entries, 1):
            record = sample_record(entry)
            if record["id"] in writer.done_ids:
                skipped += 1
            else:
                with torch.inference_mode():
                    pixels = _frames_to_pixels(load_clip(clips / entry["file"])).to(device)
                    latents = vae.encode(pixels)[0].float().cpu()
                    context = (text_encoder.encode([record["caption"]])[0].float().cpu()
                               if text_encoder is not None else None)
                writer.add(latents, record, context)
            if progress is not None:
                progress(done, len(entries))
    return EncodeSummary(out=out, total=len(entries), encoded=len(entries) - skipped, skipped=skipped)


def reencode_text(src: str | Path, out: str | Path, text_encoder: Any, *, text_encoder_name: str,
                  max_frames: int = 0, shard_size: int = 64, batch_size: int = 64,
                  progress: Callable[[int, int], None] | None = None) -> EncodeSummary:
    """Copy the latent dataset `src` into `out` with every sample's `context` re-encoded by `text_encoder` from its
    record's training caption, keeping only the first `max_frames` latent frames (0: all). No VAE is run, so this
    is how a second text encoding of one set of clips is made in seconds (e.g. `minilm-clauses` for the prefix
    model of the bundled pipeline). Resumable like `encode_clips`; refuses to continue a folder written from another
    source or text encoder."""
    data = LatentDataset(src, max_frames=max_frames)
    meta = {"source": str(Path(src).resolve()), "vae": data.meta.get("vae"),
            "text_encoder": text_encoder_name, "text_len": int(text_encoder.text_len),
            "latent_channels": data.meta.get("latent_channels"), "max_frames": max_frames or None}
    out = Path(out)
    _check_meta(out, meta)
    with LatentWriter(out, kind="latents", shard_size=shard_size, meta=meta) as writer:
        missing = [i for i in range(len(data)) if str(data.records[i].get("id")) not in writer.done_ids]
        skipped = len(data) - len(missing)
        for start in range(0, len(missing), batch_size):
            items = [data[i] for i in missing[start:start + batch_size]]
            with torch.inference_mode():
                contexts = text_encoder.encode([it["record"]["caption"] for it in items]).float().cpu()
            for it, context in zip(items, contexts):
                writer.add(it["latents"], it["record"], context)
            if progress is not None:
                progress(skipped + start + len(items), len(data))
    return EncodeSummary(out=out, total=len(data), encoded=len(data) - skipped, skipped=skipped)
