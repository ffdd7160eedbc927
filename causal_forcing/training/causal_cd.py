"""Stage 2b — causal consistency distillation, Causal Forcing++ (spec §6).

Student f_θ (trainable), the frozen AR teacher, and a target f_θ⁻ whose weights are the EMA of the student
(here literally the trainer's EMA shadow, evaluated with ``torch.func.functional_call`` — no third copy of
the network). Per step: n ~ U{0..N−2} on the shift-5 N-step grid, t = t_n, t' = t_{n+1} for every frame;
x_t = (1−σ_t)x0 + σ_t ε; one CFG Euler step of the teacher x_t → x_{t'} (teacher forcing with the ground-truth
history); loss = ‖f_θ(x_t, t) − f_θ⁻(x_{t'}, t')‖² on x0 predictions, all with clean ground-truth context.
All timesteps stay float32 (the reference's bf16 timesteps distort Δt).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.func import functional_call

from ..data.latents import LatentDataset
from ..errors import ConfigError
from ..models.attention import Backend, TeacherForcing
from ..pipelines.teacher import cfg_combine
from ..schedulers.flow import add_noise, euler_step, flow_grid, flow_to_x0
from .sampling import sample_and_score
from .common import Conditioner, build_dit, data_stream


@dataclass
class Config:
    teacher: str = ""              # the AR stage-1 model (default: train.init)
    block_size: int = 1
    grid_steps: int = 48           # discrete_cd_N
    shift: float = 5.0
    guidance: float = 3.0          # standard CFG scale of the teacher step
    target_decay: float = 0.99     # EMA decay of the target network (from step 0)
    attn_backend: Backend = "auto"

    def validate(self) -> None:
        if self.grid_steps < 2 or self.block_size < 1:
            raise ConfigError("stage.grid_steps must be >= 2 and stage.block_size >= 1")
        if not 0.0 < self.target_decay < 1.0:
            raise ConfigError("stage.target_decay must be in (0, 1)")


class Stage:
    name = "causal-cd"
    Config = Config

    def setup(self, tr: Any) -> None:
        cfg = tr.cfg
        s = cfg.stage
        student = build_dit(tr)
        teacher = build_dit(tr, init=s.teacher or cfg.train.init)
        self.teacher = tr.add_frozen("teacher", teacher)
        self.model = tr.add_trainable("generator", student, ema_decay=s.target_decay, ema_start=0)
        self.data = data_stream(tr, "data", LatentDataset(cfg.data.path, max_frames=cfg.data.max_frames))
        self.cond = Conditioner(cfg.data, tr.device)
        t, sig = flow_grid(s.grid_steps, s.shift)
        self.grid_t, self.grid_s = t.to(tr.device), sig.to(tr.device)

    def _target_x0(self, tr: Any, x: torch.Tensor, t: torch.Tensor, ctx, clean) -> torch.Tensor:
        tr_state = tr.trainables["generator"]
        layout = TeacherForcing(tr.cfg.stage.block_size)
        with torch.no_grad():
            if tr_state.ema is None:  # before the first update the target equals the student
                flow = tr_state.raw(x, t, ctx, layout=layout, clean_x=clean)
            else:
                flow = functional_call(tr_state.raw, tr_state.ema.shadow, (x, t, ctx),
                                       {"layout": layout, "clean_x": clean}, strict=False)
        return flow_to_x0(x, flow.float(), t / 1000.0)

    def sample(self, tr: Any) -> None:
        """Periodic samples + ShapesBench scores (``train.sample_every``) with the few-step sampler."""
        sample_and_score(tr, "causal")

    def step(self, tr: Any) -> dict[str, float]:
        s = tr.cfg.stage
        batch = self.data.next()
        x0 = batch["latents"].to(tr.device)
        ctx = self.cond(batch)
        B, F = x0.shape[:2]
        n = tr.randint(0, s.grid_steps - 1, (B,))
        t, t_next = self.grid_t[n][:, None].expand(B, F), self.grid_t[n + 1][:, None].expand(B, F)
        sig, sig_next = self.grid_s[n][:, None].expand(B, F), self.grid_s[n + 1][:, None].expand(B, F)
        eps = tr.randn(tuple(x0.shape))
        xt = add_noise(x0, eps, sig)
        layout = TeacherForcing(s.block_size)
        with torch.no_grad(), tr.autocast():
            v_c = self.teacher(xt, t, ctx, layout=layout, clean_x=x0).float()
            if s.guidance != 1.0:
                v_u = self.teacher(xt, t, self.cond.negative(ctx), layout=layout, clean_x=x0).float()
                v_c = cfg_combine(v_c, v_u, s.guidance)
        x_next = euler_step(xt, v_c, sig, sig_next)
        target = self._target_x0(tr, x_next, t_next, ctx, x0)
        with tr.autocast():
            flow = self.model(xt, t, ctx, layout=layout, clean_x=x0)
        pred = flow_to_x0(xt, flow.float(), sig)
        loss = (pred - target).pow(2).mean()
        metrics = tr.optimize("generator", loss)
        return {"loss": loss.item(), **metrics}
