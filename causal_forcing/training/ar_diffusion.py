"""Stage 1 — AR diffusion by teacher forcing (spec §4).

The block-causal model is trained as a many-step diffusion model on clean data: per-block timesteps from the
1000-step grid, noisy frames attend to the *clean ground-truth* previous blocks ([clean; noisy] layout), flow
target ε − x0, per-frame "bsmntw" loss weights. Frame-wise (block_size 1) and chunk-wise (3) alike.
The ``bidirectional`` stage (a base / teacher model) shares this loss with full attention and one timestep
per sample.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from ..data.latents import LatentDataset
from ..errors import ConfigError
from ..models.attention import Backend, Bidirectional, TeacherForcing
from ..schedulers.flow import add_noise
from .sampling import sample_and_score
from .common import (Conditioner, block_grid_indices, build_dit, data_stream, drop_condition,
                     early_frame_weights, grid_t_sigma, loss_weights)


@dataclass
class Config:
    block_size: int = 1
    shift: float = 5.0
    loss_weighting: Literal["bsmntw", "none"] = "bsmntw"
    cond_dropout: float = 0.0          # probability of training a sample unconditionally (for CFG later)
    context_noise_max_t: float = 0.0   # noise augmentation of the clean context: t_ctx ~ U[0, max] per block
    # The loss of the first ``early_frames`` latent frames counts ``early_weight`` times as much as that of the
    # others (frame weights normalised to mean 1 over the clip). The first frames are where a caption's direction
    # must be read (later frames follow the motion already on screen); 0 / 1.0 = plain mean.
    early_frames: int = 0
    early_weight: float = 1.0
    attn_backend: Backend = "auto"

    def validate(self) -> None:
        if self.block_size < 1:
            raise ConfigError("stage.block_size must be >= 1")
        if not 0.0 <= self.cond_dropout < 1.0:
            raise ConfigError("stage.cond_dropout must be in [0, 1)")
        if not 0.0 <= self.context_noise_max_t <= 1000.0:
            raise ConfigError("stage.context_noise_max_t must be in [0, 1000]")
        if self.early_frames < 0:
            raise ConfigError("stage.early_frames must be >= 0")
        if not self.early_weight > 0.0:
            raise ConfigError("stage.early_weight must be > 0")


class DiffusionStage:
    """Flow-matching training of one network; ``causal`` picks teacher forcing vs full attention."""

    causal = True
    name = "ar-diffusion"
    Config = Config

    def setup(self, tr: Any) -> None:
        cfg = tr.cfg
        self.model = tr.add_trainable("generator", build_dit(tr))
        self.data = data_stream(tr, "data", LatentDataset(cfg.data.path, max_frames=cfg.data.max_frames))
        self.cond = Conditioner(cfg.data, tr.device)

    def step(self, tr: Any) -> dict[str, float]:
        s = tr.cfg.stage
        batch = self.data.next()
        x0 = batch["latents"].to(tr.device)
        ctx = self.cond(batch)
        ctx = drop_condition(tr, ctx, self.cond.negative(ctx), s.cond_dropout)
        B, F = x0.shape[:2]
        k = block_grid_indices(tr, B, F, s.block_size if self.causal else F)
        t, sigma = grid_t_sigma(k, s.shift)
        eps = tr.randn(tuple(x0.shape))
        xt = add_noise(x0, eps, sigma)
        kwargs: dict[str, Any] = {"layout": Bidirectional()}
        if self.causal:
            clean, clean_t = x0, None
            if s.context_noise_max_t > 0:
                u = torch.rand((B, F), generator=tr.gen, device=tr.device)
                clean_t = _blockwise(u * s.context_noise_max_t, s.block_size)
                clean = add_noise(x0, tr.randn(tuple(x0.shape)), clean_t / 1000.0)
            kwargs = {"layout": TeacherForcing(s.block_size), "clean_x": clean, "clean_t": clean_t}
        with tr.autocast():
            flow = self.model(xt, t, ctx, **kwargs)
        per_frame = (flow.float() - (eps - x0)).pow(2).mean(dim=(2, 3, 4))
        weights = loss_weights(k, s.loss_weighting, s.shift) * early_frame_weights(F, s.early_frames, s.early_weight,
                                                                                     per_frame)
        loss = (per_frame * weights).mean()
        metrics = tr.optimize("generator", loss)
        return {"loss": loss.item(), **metrics}


    def sample(self, tr: Any) -> None:
        """Periodic samples + ShapesBench scores (``train.sample_every``): many-step CFG sampling."""
        sample_and_score(tr, "autoregressive" if self.causal else "bidirectional")


def _blockwise(v: torch.Tensor, block: int) -> torch.Tensor:
    return v[:, ::block].repeat_interleave(block, dim=1)[:, :v.shape[1]]


class Stage(DiffusionStage):
    """Stage 1: teacher-forcing AR diffusion."""
