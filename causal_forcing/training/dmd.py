"""Stage 3 — asymmetric DMD with self-forcing rollout (spec §7).

* Generator G: the causal few-step student (init from causal-ode / causal-cd), rolled out with its own KV cache
  by the library's streaming sampler (``CausalStream`` with exit steps): every block is denoised up to a random
  exit step, only the exit step's forward records gradients, finished blocks go into the cache detached.
* Real score R: a frozen bidirectional teacher, with CFG x0_real = x0_c + g·(x0_c − x0_u) (g = 3 is standard
  CFG 4, the reference's convention).
* Fake score F (critic): a bidirectional network trained on the generator's samples by flow matching.
  (``stage.score_layout: teacher_forcing`` makes both scores causal instead: an AR teacher as real score, each
  noised frame seeing the rollout's clean frames before it; not in the paper.)
* Iteration s: a generator update when s % update_ratio == 0, then always a critic update; each draws its own
  prompts and rollout. EMA of the generator from ``ema.start_step``.
Generator loss: grad = (x0_fake − x0_real) / mean|x − x0_real| per sample, loss = ½‖x − sg(x − grad)‖² (float64),
so ∂loss/∂x = grad / numel. Timesteps t = 1000·shift(u/1000), u ~ U{0..999}, clamped to [t_min, t_max];
σ = t / 1000 for both scores (the reference mixes grids there, spec §13.6).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.distributed as dist

from ..checkpoints import load_dit_weights, load_into
from ..data.latents import LatentDataset, PromptDataset
from ..errors import ConfigError
from ..models.attention import Backend, TeacherForcing
from ..models.wan import WanDiT
from ..pipelines.streaming import CausalStream, SeededNoise, StreamConfig
from ..pipelines.teacher import cfg_combine
from ..schedulers.flow import FewStepSchedule, add_noise, flow_to_x0
from .sampling import sample_and_score
from .common import Conditioner, build_dit, data_stream, dmd_timesteps


@dataclass
class Config:
    real_score: str = ""                  # frozen bidirectional teacher weights
    real_ema: bool = False
    fake_score: str = ""                  # critic init (default: real_score)
    block_size: int = 1
    num_frames: int = 0                   # latent frames per rollout (0: from the dataset's latents)
    latent_hw: list[int] = field(default_factory=list)   # [h, w] (empty: from the dataset's latents)
    steps: list[float] = field(default_factory=lambda: [1000.0, 750.0, 500.0, 250.0])
    first_block_steps: list[float] = field(default_factory=list)
    warp: bool = True
    sigma_mode: Literal["grid", "exact"] = "grid"
    guidance: float = 3.0                 # x0_c + g (x0_c - x0_u)
    update_ratio: int = 5                 # critic updates per generator update
    lr_critic: float = 4e-7
    betas_critic: tuple[float, float] = (0.0, 0.999)
    shift: float = 5.0
    t_min: float = 20.0
    t_max: float = 980.0
    commit_t: float = 0.0                 # context noise of the rollout's cache refresh
    same_step_across_blocks: bool = True
    # How both scores see a noised rollout: "bidirectional" (the paper: full attention, a bidirectional teacher),
    # or "teacher_forcing" (an AR teacher as real score: frame k noised, attending to the rollout's own clean
    # frames before it, as in stage-1 training; the critic likewise) — an experiment beyond the paper.
    score_layout: Literal["bidirectional", "teacher_forcing"] = "bidirectional"
    attn_backend: Backend = "auto"

    def validate(self) -> None:
        if not self.real_score:
            raise ConfigError("stage.real_score: path of the bidirectional teacher is required")
        if self.update_ratio < 1 or self.block_size < 1:
            raise ConfigError("stage.update_ratio and stage.block_size must be >= 1")
        if self.latent_hw and len(self.latent_hw) != 2:
            raise ConfigError("stage.latent_hw must be [h, w]")
        if not 0 <= self.t_min < self.t_max <= 1000:
            raise ConfigError("stage.t_min / t_max must satisfy 0 <= t_min < t_max <= 1000")

    def schedule(self) -> FewStepSchedule:
        return FewStepSchedule.from_config(self.steps, self.first_block_steps or None, warp=self.warp,
                                           sigma_mode=self.sigma_mode, shift=self.shift)


def _load_score(path: str, ema: bool) -> WanDiT:
    state, cfg = load_dit_weights(path, ema=ema)
    if cfg is None:
        raise ConfigError(f"{path}: no model config next to the weights; use a model folder")
    model = WanDiT(cfg)
    load_into(model, state)
    return model


class Stage:
    name = "dmd"
    Config = Config

    def setup(self, tr: Any) -> None:
        cfg = tr.cfg
        s = cfg.stage
        self.schedule = s.schedule()
        self.gen_model = build_dit(tr)
        tr.add_trainable("generator", self.gen_model)
        real = _load_score(s.real_score, s.real_ema)
        real.attn_backend = s.attn_backend
        self.real = tr.add_frozen("real", real)
        fake = _load_score(s.fake_score or s.real_score, False)
        fake.attn_backend = s.attn_backend
        self.fake = tr.add_trainable("critic", fake, lr=s.lr_critic, betas=s.betas_critic, ema_decay=0.0,
                                     export=False)
        if str(cfg.data.path).endswith(".txt"):
            ds = PromptDataset(cfg.data.path)
        else:
            ds = LatentDataset(cfg.data.path, max_frames=cfg.data.max_frames)
        self.frames, self.hw = self._shape(ds, s)
        self.gen_data = data_stream(tr, "generator_data", ds)
        self.critic_data = data_stream(tr, "critic_data", ds, seed_offset=1)
        self.cond = Conditioner(cfg.data, tr.device)

    @staticmethod
    def _shape(ds: Any, s: Config) -> tuple[int, tuple[int, int]]:
        if s.num_frames and s.latent_hw:
            return s.num_frames, (s.latent_hw[0], s.latent_hw[1])
        if isinstance(ds, PromptDataset):
            raise ConfigError("a prompt-file dataset needs stage.num_frames and stage.latent_hw")
        lat = ds[0]["latents"]
        lat = lat[-1] if ds.kind == "ode" else lat  # [F, C, H, W]
        return (s.num_frames or lat.shape[0]), (tuple(s.latent_hw) or tuple(lat.shape[-2:]))

    # ---- rollout --------------------------------------------------------------------------------------
    def _exit_steps(self, tr: Any) -> dict[int, int]:
        """Exit step per block (broadcast from rank 0 so every rank rolls out alike)."""
        s = tr.cfg.stage
        n_first, n_rest = len(self.schedule.for_block(0)), len(self.schedule.steps)
        blocks = -(-self.frames // s.block_size)
        if s.same_step_across_blocks:
            e = int(tr.randint(0, n_rest, (1,)))
            steps = [e] * blocks
            if self.schedule.first_block is not None:
                steps[0] = int(tr.randint(0, n_first, (1,)))
        else:
            steps = [int(tr.randint(0, n_first if b == 0 else n_rest, (1,))) for b in range(blocks)]
        if dist.is_initialized():
            t = torch.tensor(steps, device=tr.device)
            dist.broadcast(t, src=0)
            steps = t.tolist()
        return dict(enumerate(steps))

    def rollout(self, tr: Any, ctx: torch.Tensor, grad: bool) -> torch.Tensor:
        s = tr.cfg.stage
        exits = self._exit_steps(tr)
        stream = CausalStream(self.gen_model, ctx, latent_hw=self.hw, num_frames=self.frames,
                              config=StreamConfig(block_size=s.block_size, schedule=self.schedule,
                                                  commit_t=s.commit_t),
                              noise=SeededNoise.from_generator(tr.gen), exit_steps=exits.__getitem__,
                              grad_exit=grad)
        with tr.autocast():
            return torch.cat(list(stream), dim=1).float()

    # ---- losses ---------------------------------------------------------------------------------------
    def _noised(self, tr: Any, x: torch.Tensor):
        s = tr.cfg.stage
        B, F = x.shape[:2]
        t = dmd_timesteps(tr, B, s.shift, s.t_min, s.t_max)
        sigma = (t / 1000.0)[:, None].expand(B, F)
        eps = tr.randn(tuple(x.shape))
        return t, sigma, eps, add_noise(x.detach(), eps, sigma)

    def _score_kwargs(self, tr: Any, x: torch.Tensor) -> dict[str, Any]:
        """Extra forward arguments of both scores: none (bidirectional), or the rollout as clean history."""
        s = tr.cfg.stage
        if s.score_layout == "teacher_forcing":
            return {"layout": TeacherForcing(s.block_size), "clean_x": x.detach()}
        return {}

    def generator_loss(self, tr: Any, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        s = tr.cfg.stage
        t, sigma, _, xt = self._noised(tr, x)
        kw = self._score_kwargs(tr, x)
        with torch.no_grad(), tr.autocast():
            x0_fake = flow_to_x0(xt, self.fake(xt, t, ctx, **kw).float(), sigma)
            x0_c = flow_to_x0(xt, self.real(xt, t, ctx, **kw).float(), sigma)
            x0_u = flow_to_x0(xt, self.real(xt, t, self.cond.negative(ctx), **kw).float(), sigma)
            x0_real = cfg_combine(x0_c, x0_u, s.guidance, "cond_plus")
            norm = (x.detach() - x0_real).abs().mean(dim=(1, 2, 3, 4), keepdim=True)
            grad = torch.nan_to_num((x0_fake - x0_real) / norm)
        x64 = x.double()
        return 0.5 * (x64 - (x64 - grad.double()).detach()).pow(2).mean()

    def critic_loss(self, tr: Any, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        t, _, eps, xt = self._noised(tr, x)
        with tr.autocast():
            flow = self.fake(xt, t, ctx, **self._score_kwargs(tr, x))
        return (flow.float() - (eps - x.detach())).pow(2).mean()

    def sample(self, tr: Any) -> None:
        """Periodic samples + ShapesBench scores (``train.sample_every``) with the few-step sampler."""
        sample_and_score(tr, "causal")

    def step(self, tr: Any) -> dict[str, float]:
        s = tr.cfg.stage
        metrics: dict[str, float] = {}
        if tr.step % s.update_ratio == 0:
            batch = self.gen_data.next()
            ctx = self.cond(batch)
            x = self.rollout(tr, ctx, grad=True)
            loss = self.generator_loss(tr, x, ctx)
            metrics.update(tr.optimize("generator", loss), generator_loss=loss.item())
        batch = self.critic_data.next()
        ctx = self.cond(batch)
        with torch.no_grad():
            x = self.rollout(tr, ctx, grad=False)
        loss = self.critic_loss(tr, x, ctx)
        metrics.update(tr.optimize("critic", loss), critic_loss=loss.item())
        return metrics
