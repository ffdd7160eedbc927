"""Stage 2a — ODE regression of the few-step causal student (spec §5.4, §5.5).

``mode: causal`` (Causal Forcing): data from the AR teacher (``ode-data`` with kind causal). One step index
k ~ U{0..3} shared by all frames; the student sees the trajectory point at t_k in the teacher-forcing layout
with the ground-truth clean history and regresses its x0 prediction onto the teacher's ODE solution.
``mode: self-forcing`` (the baseline): data from the bidirectional teacher; an independent step index per
block, block-causal attention over the noisy frames (no clean context), target = the ODE solution.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from ..data.latents import LatentDataset
from ..errors import ConfigError
from ..models.attention import Backend, BlockCausal, TeacherForcing
from ..schedulers.flow import flow_to_x0
from .sampling import sample_and_score
from .common import Conditioner, build_dit, data_stream


@dataclass
class Config:
    block_size: int = 1
    mode: Literal["causal", "self-forcing"] = "causal"
    attn_backend: Backend = "auto"
    num_points: int = 4      # trajectory entries used as inputs (the few-step list); the rest are targets

    def validate(self) -> None:
        if self.block_size < 1 or self.num_points < 1:
            raise ConfigError("stage.block_size and stage.num_points must be >= 1")


class Stage:
    name = "causal-ode"
    Config = Config

    def setup(self, tr: Any) -> None:
        cfg = tr.cfg
        ds = LatentDataset(cfg.data.path, max_frames=cfg.data.max_frames)
        if ds.kind != "ode":
            raise ConfigError(f"data.path {cfg.data.path} is a {ds.kind!r} dataset; causal-ode needs ODE data")
        self.timesteps = [float(t) for t in ds.meta["timesteps"]][:cfg.stage.num_points]
        keep = ds.meta["keep"]
        if cfg.stage.mode == "causal" and keep[-1] != -1:
            raise ConfigError("causal mode needs ODE data with the ground-truth latent (ode-data kind causal)")
        if cfg.stage.mode == "causal" and ds.meta.get("teacher_kind") != "causal":
            raise ConfigError("causal mode needs ODE data from the causal teacher (ode-data kind causal)")
        # The target is the ODE solution: entry -2 of causal data (-1 is the ground truth), -1 of bidirectional
        # data, whichever mode reads it.
        solution = -2 if ds.meta.get("teacher_kind") == "causal" else -1
        if solution not in keep:
            raise ConfigError(f"ODE data {cfg.data.path} does not hold the ODE solution (keep entry {solution})")
        self.target_index = keep.index(solution)
        self.model = tr.add_trainable("generator", build_dit(tr))
        self.data = data_stream(tr, "data", ds)
        self.cond = Conditioner(cfg.data, tr.device)

    def sample(self, tr: Any) -> None:
        """Periodic samples + ShapesBench scores (``train.sample_every``) with the few-step sampler."""
        sample_and_score(tr, "causal")

    def step(self, tr: Any) -> dict[str, float]:
        s = tr.cfg.stage
        batch = self.data.next()
        ode = batch["latents"].to(tr.device)          # [B, K, F, C, H, W]
        ctx = self.cond(batch)
        B, _, F = ode.shape[:3]
        target = ode[:, self.target_index]
        times = torch.tensor(self.timesteps, device=tr.device)
        n = len(self.timesteps)
        if s.mode == "causal":
            k = tr.randint(0, n, (B, 1)).expand(B, F)          # one step index for every frame
        else:
            blocks = -(-F // s.block_size)
            k = tr.randint(0, n, (B, blocks)).repeat_interleave(s.block_size, dim=1)[:, :F]
        x = torch.gather(ode[:, :n], 1, k[:, None, :, None, None, None].expand(B, 1, F, *ode.shape[3:]))[:, 0]
        t = times[k]
        with tr.autocast():
            if s.mode == "causal":
                flow = self.model(x, t, ctx, layout=TeacherForcing(s.block_size), clean_x=ode[:, -1])
            else:
                flow = self.model(x, t, ctx, layout=BlockCausal(s.block_size))
        x0 = flow_to_x0(x, flow.float(), t / 1000.0)
        loss = (x0 - target).pow(2).mean()
        metrics = tr.optimize("generator", loss)
        return {"loss": loss.item(), **metrics}
