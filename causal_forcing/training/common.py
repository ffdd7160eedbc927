"""Pieces shared by the training stages: building networks, text conditioning, timestep sampling."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError
from ..models.wan import WanDiT
from ..schedulers.flow import shift_sigma, training_grid, training_loss_weights


def build_dit(trainer: Any, init: str | None = None, *, ema: bool | None = None, preset_cfg=None) -> WanDiT:
    """A WanDiT from ``model`` config; weights from ``init`` (default ``train.init``) or Wan's random init."""
    cfg = trainer.cfg
    model = WanDiT(preset_cfg or cfg.model.build_config())
    path = cfg.train.init if init is None else init
    if path:
        trainer.load_init(model, path, ema=cfg.train.init_ema if ema is None else ema)
    else:
        model.init_weights()
    model.attn_backend = getattr(cfg.stage, "attn_backend", "auto")
    return model


class Conditioner:
    """Text embeddings for a batch: stored with the data (``data.text_encoder: dataset``), or encoded with a
    text encoder (cached per prompt). The negative / unconditional embedding is the encoded negative prompt,
    or zeros for stored embeddings."""

    def __init__(self, data_cfg: Any, device: torch.device):
        self.device = device
        d = data_cfg
        self.kind = d.text_encoder
        self.negative_prompt = d.negative_prompt
        self.encoder = None
        if self.kind != "dataset":
            from ..models.text import build_text_encoder
            kw: dict[str, Any] = {"device": str(self.device)}
            if d.text_len:
                kw["text_len"] = d.text_len
            if d.text_encoder_path:
                kw["folder" if self.kind == "umt5" else "model_path"] = d.text_encoder_path
            self.encoder = build_text_encoder(self.kind, **kw)

    def __call__(self, batch: dict[str, Any]) -> Tensor:
        if self.encoder is None:
            if "context" not in batch:
                raise ConfigError("the dataset has no stored text embeddings; set data.text_encoder to an encoder kind")
            return batch["context"].to(self.device)
        return self.encoder.encode([r.get("caption", "") for r in batch["records"]]).to(self.device, torch.float32)

    def negative(self, like: Tensor) -> Tensor:
        if self.encoder is None:
            return torch.zeros_like(like)
        neg = self.encoder.encode([self.negative_prompt]).to(self.device, torch.float32)
        return neg.expand(like.shape[0], *neg.shape[1:])


def data_stream(trainer: Any, name: str, dataset: Any, seed_offset: int = 0) -> Any:
    """Register a resumable, rank-sharded batch stream over ``dataset`` with the run's data settings."""
    from ..data.latents import BatchStream
    cfg = trainer.cfg
    stream = BatchStream(dataset, cfg.data.batch_size, seed=cfg.train.seed + seed_offset, shuffle=cfg.data.shuffle,
                         rank=trainer.dist.rank, world_size=trainer.dist.world_size)
    return trainer.add_stream(name, stream)


def drop_condition(trainer: Any, context: Tensor, negative: Tensor, p: float) -> Tensor:
    """Classifier-free-guidance dropout: replace each sample's context by the negative one with prob. p."""
    if p <= 0:
        return context
    drop = torch.rand(context.shape[0], generator=trainer.gen, device=trainer.device) < p
    return torch.where(drop[:, None, None], negative, context)


def block_grid_indices(trainer: Any, batch: int, frames: int, block_size: int) -> Tensor:
    """Training-grid indices k ~ U{0..999}, one per block, repeated over the block's frames: [B, F]."""
    blocks = -(-frames // block_size)
    k = trainer.randint(0, 1000, (batch, blocks))
    return k.repeat_interleave(block_size, dim=1)[:, :frames]


def grid_t_sigma(k: Tensor, shift: float) -> tuple[Tensor, Tensor]:
    grid_t, grid_s = training_grid(shift)
    return grid_t.to(k.device)[k], grid_s.to(k.device)[k]


def loss_weights(k: Tensor, weighting: str, shift: float) -> Tensor:
    if weighting == "none":
        return torch.ones(k.shape, device=k.device)
    if weighting == "bsmntw":
        return training_loss_weights(shift).to(k.device)[k]
    raise ConfigError(f"unknown loss weighting {weighting!r} (use 'bsmntw' or 'none')")


def early_frame_weights(num_frames: int, early_frames: int, early_weight: float, like: Tensor) -> Tensor:
    """[F] loss weights: ``early_weight`` for the first ``early_frames`` frames, 1 after, normalised to mean 1."""
    w = torch.ones(num_frames, dtype=like.dtype, device=like.device)
    w[:early_frames] = early_weight
    return w / w.mean()


def dmd_timesteps(trainer: Any, batch: int, shift: float, t_min: float = 20.0, t_max: float = 980.0) -> Tensor:
    """DMD / critic timesteps: u ~ U{0..999}, t = 1000·shift(u/1000), clamped to [t_min, t_max] (float32)."""
    u = trainer.randint(0, 1000, (batch,)).to(torch.float32)
    t = 1000.0 * shift_sigma(u / 1000.0, shift)
    return t.clamp(t_min, t_max)
