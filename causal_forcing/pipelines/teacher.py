"""Many-step classifier-free-guided samplers of the teachers, and the ODE-trajectory data generators.

* ``sample_bidirectional`` – the whole clip jointly (bidirectional attention), UniPC or Euler.
* ``autoregressive_blocks`` / ``sample_autoregressive`` – the stage-1 AR teacher's sampler (spec §3, last
  paragraph): block by block, a many-step solve with a KV cache per CFG branch; after each block the clean
  block is written at t = 0 into both caches with ``streaming.commit_block``.
* ``ode_trajectory_teacher_forcing`` / ``ode_trajectory_blockwise_kv`` – stage-2a ODE data (spec §5.1):
  Euler, all frames share t, each block conditioned on the ground-truth clean history. The first runs the
  teacher-forcing layout [clean GT; noisy] over the whole clip; the second integrates block by block with KV
  caches and commits the GT block before the next one. They compute the same trajectories.
* ``ode_trajectory_bidirectional`` – Self Forcing's ODE data from the bidirectional teacher (spec §5.5).

Conventions. σ runs from σ_0 down to 0; the model sees t = 1000·σ (float32; ``integer_timesteps`` truncates
it to an integer like Wan's UniPC scheduler does) and predicts the flow v = ε − x0. Solver math is float64
(``schedulers.unipc``, ``schedulers.flow.euler_step``); latents between steps are float32 (float64 if the
given noise is float64), whatever the model's dtype.

Classifier-free guidance (spec §13 item 9): ``guidance_form="standard"`` is v = v_u + g·(v_c − v_u) (ODE data
g = 6, AR teacher g = 3, CD g = 3); ``"cond_plus"`` is the DMD convention v = v_c + g·(v_c − v_u), i.e.
standard with g + 1. Because x0 = x − σ·v is affine in v at fixed (x, σ), guiding the flow and guiding the
x0 prediction are the same thing. Without a negative context the sampler is unguided (g must then be 1).
The two branches use separate KV caches (and text caches); ``batch_cfg`` runs them as one forward of batch
2B over a cache whose first B rows are the conditional branch and last B rows the negative one — rows never
attend to each other, so this is the same computation with half the calls.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from ..models.attention import Bidirectional, TeacherForcing
from ..models.kv_cache import KVCache
from ..models.wan import WanDiT
from ..schedulers.flow import euler_step
from ..schedulers.unipc import (
    StepCallback,
    UniPCConfig,
    sample_unipc,
    shifted_sigmas,
    unipc_sigmas,
)
from .streaming import commit_block

Solver = Literal["unipc", "euler"]
GuidanceForm = Literal["standard", "cond_plus"]
# A flow function maps (x, σ) to the (guided) flow prediction at that σ.
FlowFn = Callable[[Tensor, float], Tensor]

ODE_KEEP_TEACHER_FORCING = (0, 12, 24, 36, -2, -1)
ODE_KEEP_BIDIRECTIONAL = (0, 12, 24, 36, -1)


# ---------------------------------------------------------------------------------------------------------
# Guidance and ODE solving
# ---------------------------------------------------------------------------------------------------------
def cfg_combine(cond: Tensor, uncond: Tensor, guidance: float, form: GuidanceForm = "standard") -> Tensor:
    """Guided prediction in float32: ``standard`` u + g·(c − u), ``cond_plus`` c + g·(c − u)."""
    c, u = cond.float(), uncond.float()
    if form == "standard":
        return u + guidance * (c - u)
    if form == "cond_plus":
        return c + guidance * (c - u)
    raise ValueError(f"unknown guidance form {form!r} (use 'standard' or 'cond_plus')")


@dataclass(frozen=True, eq=False)
class Guidance:
    """The text conditioning of a sampler: prompt, optional negative prompt, scale and form, batching."""

    context: Tensor
    negative_context: Tensor | None = None
    scale: float = 1.0
    form: GuidanceForm = "standard"
    batched: bool = False

    def __post_init__(self) -> None:
        if self.form not in ("standard", "cond_plus"):
            raise ValueError(f"unknown guidance form {self.form!r} (use 'standard' or 'cond_plus')")
        if self.negative_context is None and not (self.form == "standard" and self.scale == 1.0):
            raise ValueError("guidance without a negative context needs form='standard' and scale 1")
        if self.negative_context is not None and self.negative_context.shape[0] != self.context.shape[0]:
            raise ValueError(f"negative context has batch {self.negative_context.shape[0]}, "
                             f"the context has {self.context.shape[0]}")

    @property
    def guided(self) -> bool:
        return self.negative_context is not None

    @property
    def batch_size(self) -> int:
        return self.context.shape[0]

    def stacked_context(self, text_len: int) -> Tensor:
        """[context; negative] along the batch, both zero-padded to ``text_len`` (as the model pads them)."""
        if self.negative_context is None:
            raise ValueError("an unguided sampler has no negative context to stack")
        return torch.cat([_pad_tokens(self.context, text_len), _pad_tokens(self.negative_context, text_len)])


def _pad_tokens(context: Tensor, text_len: int) -> Tensor:
    B, L, C = context.shape
    if L >= text_len:
        return context
    return torch.cat([context, context.new_zeros(B, text_len - L, C)], dim=1)


def _twice(x: Tensor) -> Tensor:
    return torch.cat([x, x])


@dataclass
class BranchCaches:
    """The KV caches of the two CFG branches (``negative`` is None when unguided or batched)."""

    cond: KVCache
    negative: KVCache | None = None


def new_branch_caches(model: WanDiT, guide: Guidance, *, latent_hw: tuple[int, int],
                      capacity_frames: int) -> BranchCaches:
    """Fresh caches for a guided stream: one per branch, or one of batch 2B when ``guide.batched``."""
    B = guide.batch_size
    if guide.guided and guide.batched:
        return BranchCaches(model.new_cache(batch_size=2 * B, latent_hw=latent_hw, capacity_frames=capacity_frames))
    cond = model.new_cache(batch_size=B, latent_hw=latent_hw, capacity_frames=capacity_frames)
    neg = (model.new_cache(batch_size=B, latent_hw=latent_hw, capacity_frames=capacity_frames)
           if guide.guided else None)
    return BranchCaches(cond, neg)


def guided_flow(model: WanDiT, x: Tensor, t: Tensor, guide: Guidance, *, caches: BranchCaches | None = None,
                start_frame: int = 0, layout: Bidirectional | TeacherForcing | None = None,
                clean_x: Tensor | None = None) -> Tensor:
    """The (CFG-combined) flow prediction for x at timesteps t, float32. With ``caches`` x is a block at
    ``start_frame`` of a cached stream; otherwise ``layout`` (and ``clean_x`` for teacher forcing) apply."""
    kw = {"layout": layout, "start_frame": start_frame}
    if not guide.guided:
        return model(x, t, guide.context, cache=caches.cond if caches else None, clean_x=clean_x, **kw).float()
    if guide.batched:
        both = model(_twice(x), _twice(t), guide.stacked_context(model.config.text_len),
                     cache=caches.cond if caches else None,
                     clean_x=_twice(clean_x) if clean_x is not None else None, **kw)
        v_c, v_u = both.chunk(2)
    else:
        v_c = model(x, t, guide.context, cache=caches.cond if caches else None, clean_x=clean_x, **kw)
        v_u = model(x, t, guide.negative_context, cache=caches.negative if caches else None, clean_x=clean_x, **kw)
    return cfg_combine(v_c, v_u, guide.scale, guide.form)


def commit_branches(model: WanDiT, x0: Tensor, guide: Guidance, caches: BranchCaches, start_frame: int) -> None:
    """Write a clean block at t = 0 into the caches of both branches (``streaming.commit_block``)."""
    if guide.guided and guide.batched:
        commit_block(model, _twice(x0), context=guide.stacked_context(model.config.text_len), cache=caches.cond,
                     start_frame=start_frame)
        return
    commit_block(model, x0, context=guide.context, cache=caches.cond, start_frame=start_frame)
    if caches.negative is not None:
        commit_block(model, x0, context=guide.negative_context, cache=caches.negative, start_frame=start_frame)


def model_timestep(sigma: float, integer_timesteps: bool = False) -> float:
    """t = 1000·σ, truncated to an integer when ``integer_timesteps`` (Wan's UniPC casts timesteps to int64)."""
    t = 1000.0 * sigma
    return float(math.floor(t)) if integer_timesteps else t


def flow_fn_for(model: WanDiT, guide: Guidance, *, integer_timesteps: bool = False, **forward_kwargs) -> FlowFn:
    """A FlowFn running ``guided_flow`` with every frame at t = model_timestep(σ)."""
    def flow(x: Tensor, sigma: float) -> Tensor:
        t = torch.full(x.shape[:2], model_timestep(sigma, integer_timesteps), dtype=torch.float32, device=x.device)
        return guided_flow(model, x, t, guide, **forward_kwargs)
    return flow


def solver_sigmas(solver: Solver, steps: int, shift: float) -> Tensor:
    """σ_0 … σ_N (float64, ending at 0): Wan's UniPC grid (σ_max 0.999) or the Euler ODE grid (σ_max 1)."""
    if solver == "unipc":
        return unipc_sigmas(steps, shift)
    if solver == "euler":
        return shifted_sigmas(steps, shift, sigma_max=1.0)
    raise ValueError(f"unknown solver {solver!r} (use 'unipc' or 'euler')")


def integrate(flow: FlowFn, x: Tensor, sigmas: Tensor | Sequence[float], solver: Solver = "unipc", *,
              unipc: UniPCConfig | None = None, callback: StepCallback | None = None) -> Tensor:
    """Solve the flow ODE from x at σ[0] to σ[−1]; ``callback(i, x_i, σ_i, x0_i)`` sees every evaluation."""
    sig = [float(s) for s in torch.as_tensor(sigmas, dtype=torch.float64).reshape(-1)]
    if solver == "unipc":
        def denoise(xi: Tensor, sigma: float) -> Tensor:
            return xi.double() - sigma * flow(xi, sigma).double()
        return sample_unipc(denoise, x, sig, unipc or UniPCConfig(), callback)
    if solver == "euler":
        for i in range(len(sig) - 1):
            v = flow(x, sig[i])
            if callback is not None:
                callback(i, x, sig[i], x.double() - sig[i] * v.double())
            x = euler_step(x, v, sig[i], sig[i + 1])
        return x
    raise ValueError(f"unknown solver {solver!r} (use 'unipc' or 'euler')")


# ---------------------------------------------------------------------------------------------------------
# Noise
# ---------------------------------------------------------------------------------------------------------
def initial_noise(shape: Sequence[int], *, noise: Tensor | None, generator: torch.Generator | int | None,
                  device: torch.device) -> Tensor:
    """The starting latents: explicit ``noise`` (shape-checked; float64 stays float64, else float32), or one
    draw of ``shape`` from a seeded generator (an int is a seed for a CPU generator)."""
    shape = tuple(int(s) for s in shape)
    if noise is not None:
        if tuple(noise.shape) != shape:
            raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {shape}")
        dtype = torch.float64 if noise.dtype == torch.float64 else torch.float32
        return noise.to(device, dtype)
    if generator is None:
        raise ValueError("pass explicit noise or a seeded generator (or an int seed)")
    if isinstance(generator, int):
        generator = torch.Generator().manual_seed(generator)
    return torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32).to(device)


def _model_device(model: WanDiT) -> torch.device:
    return next(model.parameters()).device


def _whole_clip_noise(model: WanDiT, context: Tensor, shape: Sequence[int] | None, noise: Tensor | None,
                      generator: torch.Generator | int | None) -> Tensor:
    """The starting latents of a whole-clip sampler, on the model's device: of ``shape``, or of the shape of the
    explicit ``noise``; checks the text context against their batch size."""
    if shape is None:
        if noise is None:
            raise ValueError("pass the latent shape or explicit noise")
        shape = tuple(noise.shape)
    x = initial_noise(shape, noise=noise, generator=generator, device=_model_device(model))
    _check_context(model, context, x.shape[0])
    return x


def _check_context(model: WanDiT, context: Tensor, batch_size: int) -> None:
    if context.shape[0] != batch_size:
        raise ValueError(f"context has batch {context.shape[0]}, the latents have {batch_size}")
    if context.shape[-1] != model.config.text_dim:
        raise ValueError(f"context has {context.shape[-1]} channels, the model expects {model.config.text_dim}")


def _guidance(model: WanDiT, context: Tensor, negative_context: Tensor | None, guidance: float,
              form: GuidanceForm, batched: bool) -> Guidance:
    device = _model_device(model)
    neg = negative_context.to(device) if negative_context is not None else None
    return Guidance(context.to(device), neg, float(guidance), form, batched)


# ---------------------------------------------------------------------------------------------------------
# Samplers
# ---------------------------------------------------------------------------------------------------------
@torch.no_grad()
def sample_bidirectional(model: WanDiT, context: Tensor, negative_context: Tensor | None = None, *,
                         shape: Sequence[int] | None = None, noise: Tensor | None = None,
                         generator: torch.Generator | int | None = None, steps: int = 50, shift: float = 5.0,
                         guidance: float = 5.0, solver: Solver = "unipc", guidance_form: GuidanceForm = "standard",
                         unipc: UniPCConfig | None = None, integer_timesteps: bool = False,
                         batch_cfg: bool = False) -> Tensor:
    """Sample a whole clip [B, F, C, H, W] jointly with bidirectional attention and CFG (defaults: Wan T2V).

    ``shape`` (or the shape of ``noise``) is the latent shape; σ follows ``solver_sigmas(solver, steps, shift)``.
    """
    x = _whole_clip_noise(model, context, shape, noise, generator)
    guide = _guidance(model, context, negative_context, guidance, guidance_form, batch_cfg)
    flow = flow_fn_for(model, guide, integer_timesteps=integer_timesteps, layout=Bidirectional())
    return integrate(flow, x, solver_sigmas(solver, steps, shift), solver, unipc=unipc)


@torch.no_grad()
def autoregressive_blocks(model: WanDiT, context: Tensor, negative_context: Tensor | None = None, *,
                          num_frames: int, latent_hw: tuple[int, int], block_size: int = 1, steps: int = 50,
                          shift: float = 5.0, guidance: float = 3.0, solver: Solver = "unipc",
                          noise: Tensor | None = None, generator: torch.Generator | int | None = None,
                          initial_latent: Tensor | None = None, guidance_form: GuidanceForm = "standard",
                          unipc: UniPCConfig | None = None, integer_timesteps: bool = False,
                          batch_cfg: bool = False, commit_last: bool = False) -> Iterator[Tensor]:
    """Yield finished latent blocks [B, n, C, H, W] of the many-step AR teacher (spec §3, last paragraph).

    ``num_frames`` counts all latent frames including an ``initial_latent`` (I2V / extension), which is
    committed at t = 0 into both caches and yielded first. ``noise`` covers the generated frames only
    ([B, num_frames − F_in, C, H, W]); otherwise it is drawn once, up front, from ``generator``. Per block:
    the ``steps``-step solve runs every model call at the block's start frame (the first call appends the
    block to each cache, later ones overwrite it), then the clean block is committed at t = 0 into both
    caches — after the block is yielded, and not after the last block unless ``commit_last``.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    device = _model_device(model)
    B, C = context.shape[0], model.config.in_dim
    n_in = 0 if initial_latent is None else initial_latent.shape[1]
    if num_frames <= n_in:
        raise ValueError(f"num_frames={num_frames} leaves no frame to generate after {n_in} input frame(s)")
    x_all = initial_noise((B, num_frames - n_in, C, *latent_hw), noise=noise, generator=generator, device=device)
    _check_context(model, context, B)
    guide = _guidance(model, context, negative_context, guidance, guidance_form, batch_cfg)
    caches = new_branch_caches(model, guide, latent_hw=tuple(latent_hw), capacity_frames=num_frames)
    sigmas = solver_sigmas(solver, steps, shift)

    frame = 0
    if initial_latent is not None:
        img = initial_latent.to(device, x_all.dtype)
        commit_branches(model, img, guide, caches, start_frame=0)
        frame = n_in
        yield img
    while frame < num_frames:
        n = min(block_size, num_frames - frame)
        flow = flow_fn_for(model, guide, integer_timesteps=integer_timesteps, caches=caches, start_frame=frame)
        x0 = integrate(flow, x_all[:, frame - n_in:frame - n_in + n], sigmas, solver, unipc=unipc)
        yield x0
        if frame + n < num_frames or commit_last:
            commit_branches(model, x0, guide, caches, start_frame=frame)
        frame += n


def sample_autoregressive(model: WanDiT, context: Tensor, negative_context: Tensor | None = None, *,
                          num_frames: int, latent_hw: tuple[int, int], block_size: int = 1, steps: int = 50,
                          shift: float = 5.0, guidance: float = 3.0, solver: Solver = "unipc",
                          noise: Tensor | None = None, generator: torch.Generator | int | None = None,
                          initial_latent: Tensor | None = None, guidance_form: GuidanceForm = "standard",
                          unipc: UniPCConfig | None = None, integer_timesteps: bool = False,
                          batch_cfg: bool = False) -> Tensor:
    """All latent frames [B, num_frames, C, H, W] of ``autoregressive_blocks`` (same arguments)."""
    blocks = autoregressive_blocks(model, context, negative_context, num_frames=num_frames, latent_hw=latent_hw,
                                   block_size=block_size, steps=steps, shift=shift, guidance=guidance,
                                   solver=solver, noise=noise, generator=generator, initial_latent=initial_latent,
                                   guidance_form=guidance_form, unipc=unipc, integer_timesteps=integer_timesteps,
                                   batch_cfg=batch_cfg)
    return torch.cat(list(blocks), dim=1)


# ---------------------------------------------------------------------------------------------------------
# ODE trajectories (training data)
# ---------------------------------------------------------------------------------------------------------
def resolve_keep(keep: Sequence[int], length: int) -> list[int]:
    """Non-negative positions of ``keep`` (negative = from the end) in a trajectory of ``length`` entries."""
    out = []
    for k in keep:
        i = int(k) + length if int(k) < 0 else int(k)
        if not 0 <= i < length:
            raise ValueError(f"trajectory index {k} is outside a trajectory of {length} entries")
        out.append(i)
    return out


def _recorded_solve(flow: FlowFn, x: Tensor, sigmas: Tensor, wanted: set[int]) -> dict[int, Tensor]:
    """Euler-integrate and return {i: x_i} for the wanted indices of [x_0, …, x_{N−1}, x_N = solution]."""
    record: dict[int, Tensor] = {}

    def keep_step(i: int, xi: Tensor, _sigma: float, _x0: Tensor) -> None:
        if i in wanted:
            record[i] = xi
    solution = integrate(flow, x, sigmas, "euler", callback=keep_step)
    record[len(sigmas) - 1] = solution
    return record


def _check_clean(model: WanDiT, clean_x: Tensor, context: Tensor) -> None:
    if clean_x.dim() != 5 or clean_x.shape[2] != model.config.in_dim:
        raise ValueError(f"clean_x must be [B, F, {model.config.in_dim}, H, W], got {list(clean_x.shape)}")
    _check_context(model, context, clean_x.shape[0])


@torch.no_grad()
def ode_trajectory_teacher_forcing(model: WanDiT, context: Tensor, negative_context: Tensor | None,
                                   clean_x: Tensor, *, block_size: int = 1, steps: int = 48, shift: float = 5.0,
                                   guidance: float = 6.0, keep: Sequence[int] = ODE_KEEP_TEACHER_FORCING,
                                   noise: Tensor | None = None, generator: torch.Generator | int | None = None,
                                   guidance_form: GuidanceForm = "standard", batch_cfg: bool = False) -> Tensor:
    """Stage-2a ODE data (spec §5.1) with the teacher-forcing layout: [B, len(keep), F, C, H, W] float32.

    Euler on σ = shift(linspace(1, 0, steps + 1)[:−1]) then 0; at every step all frames share t and the
    teacher sees [clean_x (t = 0); x] in the ``TeacherForcing(block_size)`` layout, so every noisy block
    attends to the ground-truth clean blocks before it. ``keep`` indexes [x_0 … x_{steps−1}, ODE solution,
    clean_x] (−2 = solution, −1 = the GT latent).
    """
    _check_clean(model, clean_x, context)
    device = _model_device(model)
    clean = clean_x.to(device, torch.float32)
    x = initial_noise(clean.shape, noise=noise, generator=generator, device=device)
    idx = resolve_keep(keep, steps + 2)
    guide = _guidance(model, context, negative_context, guidance, guidance_form, batch_cfg)
    flow = flow_fn_for(model, guide, layout=TeacherForcing(block_size), clean_x=clean)
    record = _recorded_solve(flow, x, solver_sigmas("euler", steps, shift), set(idx))
    record[steps + 1] = clean.to(x.dtype)
    return torch.stack([record[i] for i in idx], dim=1).float()


@torch.no_grad()
def ode_trajectory_blockwise_kv(model: WanDiT, context: Tensor, negative_context: Tensor | None,
                                clean_x: Tensor, *, block_size: int = 1, steps: int = 48, shift: float = 5.0,
                                guidance: float = 6.0, keep: Sequence[int] = ODE_KEEP_TEACHER_FORCING,
                                noise: Tensor | None = None, generator: torch.Generator | int | None = None,
                                guidance_form: GuidanceForm = "standard", batch_cfg: bool = False) -> Tensor:
    """The KV-cache form of ``ode_trajectory_teacher_forcing`` (same arguments and result).

    For each block: integrate all steps with the block's KV-cached forwards (one cache per CFG branch), then
    commit the *ground-truth* clean block at t = 0 before the next block. Each block then sees exactly what
    the teacher-forcing layout shows it, at a fraction of the cost for multi-frame blocks.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    _check_clean(model, clean_x, context)
    device = _model_device(model)
    clean = clean_x.to(device, torch.float32)
    x_all = initial_noise(clean.shape, noise=noise, generator=generator, device=device)
    idx = resolve_keep(keep, steps + 2)
    guide = _guidance(model, context, negative_context, guidance, guidance_form, batch_cfg)
    num_frames = clean.shape[1]
    caches = new_branch_caches(model, guide, latent_hw=tuple(clean.shape[-2:]), capacity_frames=num_frames)
    sigmas = solver_sigmas("euler", steps, shift)
    per_block: list[dict[int, Tensor]] = []
    for f0 in range(0, num_frames, block_size):
        f1 = min(f0 + block_size, num_frames)
        flow = flow_fn_for(model, guide, caches=caches, start_frame=f0)
        record = _recorded_solve(flow, x_all[:, f0:f1], sigmas, set(idx))
        record[steps + 1] = clean[:, f0:f1].to(x_all.dtype)
        per_block.append(record)
        if f1 < num_frames:
            commit_branches(model, clean[:, f0:f1], guide, caches, start_frame=f0)
    return torch.stack([torch.cat([r[i] for r in per_block], dim=1) for i in idx], dim=1).float()


@torch.no_grad()
def ode_trajectory_bidirectional(model: WanDiT, context: Tensor, negative_context: Tensor | None, *,
                                 shape: Sequence[int] | None = None, noise: Tensor | None = None,
                                 generator: torch.Generator | int | None = None, steps: int = 48,
                                 shift: float = 8.0, guidance: float = 6.0,
                                 keep: Sequence[int] = ODE_KEEP_BIDIRECTIONAL,
                                 guidance_form: GuidanceForm = "standard", batch_cfg: bool = False) -> Tensor:
    """Self Forcing's ODE data (spec §5.5): the bidirectional teacher over the whole clip, Euler, CFG.

    Returns [B, len(keep), F, C, H, W] float32, ``keep`` indexing [x_0 … x_{steps−1}, ODE solution]
    (default [0, 12, 24, 36, −1], shift 8 as in Self Forcing).
    """
    x = _whole_clip_noise(model, context, shape, noise, generator)
    idx = resolve_keep(keep, steps + 1)
    guide = _guidance(model, context, negative_context, guidance, guidance_form, batch_cfg)
    flow = flow_fn_for(model, guide, layout=Bidirectional())
    record = _recorded_solve(flow, x, solver_sigmas("euler", steps, shift), set(idx))
    return torch.stack([record[i] for i in idx], dim=1).float()
