"""Stage 2a data — ODE trajectories of a teacher, saved at the few-step list's timesteps (spec §5.1, §5.5).

``kind: causal`` (Causal Forcing): the AR stage-1 teacher, every frame's trajectory conditioned on the
*ground-truth* clean history (teacher forcing, computed block by block with the KV cache), Euler on the
shift-5 48-step grid, CFG; kept entries [0, 12, 24, 36, -2, -1] = x at the warped 4-step timesteps, the ODE
solution and the ground-truth latent.
``kind: bidirectional`` (the Self Forcing baseline): the bidirectional teacher over the whole clip, kept
entries [0, 12, 24, 36, -1].

Output: a latent dataset of kind ``ode`` (latents [K, F, C, H, W], the source record and text embedding).
Work is sharded over torchrun ranks (sample i goes to rank i mod world); every sample's noise is a function of
(seed, sample id), and samples already written are skipped, so an interrupted run continues where it stopped
and produces the same data.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from ..checkpoints import load_dit_weights, load_into
from ..data.latents import LatentDataset, LatentWriter
from ..errors import ConfigError
from ..models.wan import WanDiT
from ..pipelines.teacher import (
    ode_trajectory_bidirectional,
    ode_trajectory_blockwise_kv,
    ode_trajectory_teacher_forcing,
)
from ..schedulers.flow import flow_grid
from .common import Conditioner
from .trainer import DistInfo, resolve_device


@dataclass
class Config:
    teacher: str = ""                         # teacher weights (stage-1 output, or the bidirectional model)
    teacher_ema: bool = False
    kind: Literal["causal", "bidirectional"] = "causal"
    block_size: int = 1
    steps: int = 48
    shift: float = 5.0
    guidance: float = 6.0
    keep: list[int] = field(default_factory=list)   # default: the 4-step points 0, S/4, S/2, 3S/4 of the S-step
                                                    # grid, then [-2, -1] causal / [-1] bidirectional
    method: Literal["blockwise-kv", "teacher-forcing"] = "blockwise-kv"
    out: str = ""                             # output dataset folder
    num_samples: int = 0                      # 0 = every sample of data.path
    shard_size: int = 16
    batch_size: int = 1

    def validate(self) -> None:
        if not self.teacher:
            raise ConfigError("stage.teacher: path of the teacher weights is required")
        if not self.out:
            raise ConfigError("stage.out: output dataset folder is required")
        if self.block_size < 1 or self.steps < 2 or self.batch_size < 1:
            raise ConfigError("stage.block_size, stage.batch_size must be >= 1 and stage.steps >= 2")
        if not self.keep and self.steps % 4:
            raise ConfigError(f"stage.steps must be a multiple of 4 for the default stage.keep (the 4-step "
                              f"points of the grid), got {self.steps}; or give stage.keep")

    def keep_indices(self) -> list[int]:
        if self.keep:
            return list(self.keep)
        quarter = self.steps // 4   # 48 steps: [0, 12, 24, 36] = the warped 1000, 750, 500, 250
        return [0, quarter, 2 * quarter, 3 * quarter] + ([-2, -1] if self.kind == "causal" else [-1])


def sample_seed(seed: int, sample_id: str) -> int:
    """A stable per-sample seed: noise depends only on (seed, id), not on order, rank or resumption."""
    digest = hashlib.sha256(f"{seed}:{sample_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _kept_timesteps(cfg: Config) -> list[float]:
    t, _ = flow_grid(cfg.steps, cfg.shift)
    return [float(t[i]) for i in cfg.keep_indices() if 0 <= i < cfg.steps]


def run(cfg: Any, resume: bool = False) -> Path:
    s: Config = cfg.stage
    info = DistInfo.from_env()
    device = resolve_device(cfg.train.device, info.local_rank)
    state, teacher_cfg = load_dit_weights(s.teacher, ema=s.teacher_ema)
    model = WanDiT(teacher_cfg or cfg.model.build_config())
    load_into(model, state)
    model = model.to(device).eval().requires_grad_(False)
    source = LatentDataset(cfg.data.path, max_frames=cfg.data.max_frames)

    cond = Conditioner(cfg.data, device)
    meta = {"source": str(cfg.data.path), "teacher": s.teacher, "teacher_kind": s.kind, "block_size": s.block_size,
            "keep": s.keep_indices(), "timesteps": _kept_timesteps(s), "steps": s.steps, "shift": s.shift,
            "guidance": s.guidance, "seed": cfg.train.seed}
    writer = LatentWriter(s.out, kind="ode", shard_size=s.shard_size, dtype=torch.float32, meta=meta,
                          writer_id=info.rank if info.world_size > 1 else None)
    if writer.done_ids and not resume:
        raise ConfigError(f"{s.out} already holds {len(writer.done_ids)} trajectories; pass --resume to continue")
    n = len(source) if s.num_samples <= 0 else min(s.num_samples, len(source))
    pending = [i for i in range(n) if i % info.world_size == info.rank
            and str(source.records[i].get("id", i)) not in writer.done_ids]
    bar = _bar(len(pending), info.is_main and cfg.train.progress)
    with writer:
        for start in range(0, len(pending), s.batch_size):
            idx = pending[start:start + s.batch_size]
            items = [source[i] for i in idx]
            batch = {"latents": torch.stack([it["latents"] for it in items]),
                     "records": [it["record"] for it in items]}
            if all("context" in it for it in items):
                batch["context"] = torch.stack([it["context"] for it in items])
            ctx = cond(batch)
            neg = cond.negative(ctx) if s.guidance != 1.0 else None
            clean = batch["latents"].to(device)
            noise = torch.stack([
                torch.randn(clean.shape[1:], generator=torch.Generator().manual_seed(
                    sample_seed(cfg.train.seed, str(it["record"].get("id", i)))))
                for i, it in zip(idx, items)]).to(device)
            with torch.no_grad():
                traj = _trajectory(model, s, ctx, neg, clean, noise)
            for j, it in enumerate(items):
                rec = dict(it["record"])
                writer.add(traj[j].cpu(), rec, ctx[j].cpu() if "context" in batch else None)
            if bar is not None:
                bar.update(len(idx))
    if bar is not None:
        bar.close()
    return Path(s.out)


def _trajectory(model: WanDiT, s: Config, ctx, neg, clean, noise):
    keep = s.keep_indices()
    if s.kind == "bidirectional":
        return ode_trajectory_bidirectional(model, ctx, neg, shape=tuple(clean.shape), steps=s.steps, shift=s.shift,
                                            guidance=s.guidance, keep=keep, noise=noise)
    fn = ode_trajectory_blockwise_kv if s.method == "blockwise-kv" else ode_trajectory_teacher_forcing
    return fn(model, ctx, neg, clean, block_size=s.block_size, steps=s.steps, shift=s.shift, guidance=s.guidance,
              keep=keep, noise=noise)


def _bar(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm
    return tqdm(total=total, desc="ode-data", dynamic_ncols=True)
