"""Rectified-flow noise math as plain functions.

Conventions (spec §2): x_t = (1 - σ)·x0 + σ·ε, the network predicts the flow v = ε - x0, timesteps t live in
[0, 1000] and σ ≈ t / 1000. Everything here is float32/float64; callers never do sigma math in bf16.

Two ways to turn a timestep into σ:
  * ``"grid"``  – the reference's behaviour: σ of the nearest point of the 1000-step shifted training grid
                  (so t = 250 gives σ = 0.2516, and t = 0 gives σ = 0.00498);
  * ``"exact"`` – σ = t / 1000 (the clean choice; the reference's grids differ between its networks).

Layouts: latents are [B, F, C, H, W]; σ broadcasts from a scalar, [B] or [B, F].
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Literal, Sequence

import torch
from torch import Tensor

SigmaMode = Literal["grid", "exact"]
NUM_TRAIN_TIMESTEPS = 1000


def shift_sigma(sigma: Tensor | float, shift: float) -> Tensor | float:
    """The timestep shift of Wan / SD3: σ' = shift·σ / (1 + (shift - 1)·σ)."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def flow_grid(num_steps: int, shift: float = 5.0, *, sigma_max: float = 1.0, sigma_min: float = 0.0,
              extra_one_step: bool = True) -> tuple[Tensor, Tensor]:
    """(timesteps, sigmas) of a shifted flow-matching grid, float32, computed like the reference scheduler.

    With ``extra_one_step`` the base grid is linspace(σ_max, σ_min, N + 1)[:-1], so σ_min itself is excluded
    (the 1000-step training grid ends at t = 4.98). Without it, linspace(σ_max, σ_min, N).
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if extra_one_step:
        sigmas = torch.linspace(sigma_max, sigma_min, num_steps + 1)[:-1]
    else:
        sigmas = torch.linspace(sigma_max, sigma_min, num_steps)
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    return sigmas * NUM_TRAIN_TIMESTEPS, sigmas


@lru_cache(maxsize=8)
def _training_grid_cpu(shift: float, num: int) -> tuple[Tensor, Tensor]:
    return flow_grid(num, shift)


def training_grid(shift: float = 5.0, num: int = NUM_TRAIN_TIMESTEPS) -> tuple[Tensor, Tensor]:
    """The 1000-step training grid (timesteps, sigmas), float32 on CPU. Do not modify the returned tensors."""
    return _training_grid_cpu(float(shift), int(num))


def training_loss_weights(shift: float = 5.0, num: int = NUM_TRAIN_TIMESTEPS) -> Tensor:
    """Stage-1 ("bsmntw") per-grid-point loss weights: a Gaussian bump around t = 500, min 0, summing to num."""
    t, _ = training_grid(shift, num)
    y = torch.exp(-2 * ((t - num / 2) / num) ** 2)
    y_shifted = y - y.min()
    return y_shifted * (num / y_shifted.sum())


def grid_index(t: Tensor, shift: float = 5.0) -> Tensor:
    """Index of the nearest training-grid timestep for every element of t (int64, same shape as t)."""
    grid_t, _ = training_grid(shift)
    grid_t = grid_t.to(t.device)
    return (t.detach().to(torch.float32).unsqueeze(-1) - grid_t).abs().argmin(dim=-1)


def sigma_from_t(t: Tensor | float, mode: SigmaMode = "grid", shift: float = 5.0) -> Tensor:
    """σ for timestep(s) t (float32). ``grid``: nearest training-grid σ (reference); ``exact``: t / 1000."""
    t = torch.as_tensor(t, dtype=torch.float32)
    if mode == "exact":
        return t.to(torch.float32) / NUM_TRAIN_TIMESTEPS
    if mode == "grid":
        _, grid_s = training_grid(shift)
        return grid_s.to(t.device)[grid_index(t, shift)]
    raise ValueError(f"unknown sigma mode {mode!r} (use 'grid' or 'exact')")


def warp_timesteps(step_list: Sequence[float], shift: float = 5.0) -> Tensor:
    """Map a config denoising list (e.g. [1000, 750, 500, 250]) onto the shifted grid: s ↦ grid[1000 - s].

    A trailing 0 maps to t = 0 (the appended end point) and is kept, so callers may strip it.
    """
    grid_t, _ = training_grid(shift)
    extended = torch.cat([grid_t, torch.zeros(1)])
    idx = torch.as_tensor([NUM_TRAIN_TIMESTEPS - int(round(float(s))) for s in step_list], dtype=torch.long)
    if (idx < 0).any() or (idx > NUM_TRAIN_TIMESTEPS).any():
        raise ValueError(f"denoising steps must lie in [0, {NUM_TRAIN_TIMESTEPS}], got {list(step_list)}")
    return extended[idx]


def _expand(sigma: Tensor, like: Tensor) -> Tensor:
    """Broadcast σ of shape [], [B] or [B, F] against a [B, F, ...] tensor."""
    sigma = torch.as_tensor(sigma, device=like.device)
    return sigma.reshape(sigma.shape + (1,) * (like.dim() - sigma.dim()))


def add_noise(x0: Tensor, noise: Tensor, sigma: Tensor | float) -> Tensor:
    """x_t = (1 - σ)·x0 + σ·ε, in the dtype of x0 with σ in float32 (matches the reference bit for bit)."""
    s = _expand(torch.as_tensor(sigma, dtype=torch.float32), x0).to(x0.dtype)
    return (1 - s) * x0 + s * noise


def flow_to_x0(x_t: Tensor, flow: Tensor, sigma: Tensor | float) -> Tensor:
    """x0 = x_t - σ·v, computed in float64 and cast back to the flow's dtype."""
    s = _expand(torch.as_tensor(sigma, dtype=torch.float64), x_t).to(torch.float64)
    return (x_t.double() - s * flow.double()).to(flow.dtype)


def x0_to_flow(x_t: Tensor, x0: Tensor, sigma: Tensor | float) -> Tensor:
    """v = (x_t - x0) / σ, computed in float64 and cast back to x0's dtype."""
    s = _expand(torch.as_tensor(sigma, dtype=torch.float64), x_t).to(torch.float64)
    return ((x_t.double() - x0.double()) / s).to(x0.dtype)


def euler_step(x: Tensor, flow: Tensor, sigma: Tensor | float, sigma_next: Tensor | float) -> Tensor:
    """One Euler step of the probability-flow ODE dx/dσ = v, in float64, cast back to x's dtype."""
    s = _expand(torch.as_tensor(sigma, dtype=torch.float64), x)
    s_next = _expand(torch.as_tensor(sigma_next, dtype=torch.float64), x)
    return (x.double() + flow.double() * (s_next - s)).to(x.dtype)


@dataclass(frozen=True)
class FewStepSchedule:
    """The few-step denoising schedule of a distilled causal generator (spec §3).

    ``steps`` is the warped timestep list used for every block, ``first_block`` an optional separate list for
    the first generated block (the 1- and 2-step models use the 4-step list there). ``sigma_mode`` chooses
    how σ is derived from t for x0 conversion and renoising.
    """

    steps: tuple[float, ...]
    first_block: tuple[float, ...] | None = None
    sigma_mode: SigmaMode = "grid"
    shift: float = 5.0

    @classmethod
    def from_config(cls, steps: Sequence[float], first_block: Sequence[float] | None = None, *,
                    warp: bool = True, sigma_mode: SigmaMode = "grid", shift: float = 5.0) -> "FewStepSchedule":
        """Build from config-style lists (e.g. [1000, 750, 500, 250]), warping them when ``warp`` is set."""
        def prep(lst: Sequence[float]) -> tuple[float, ...]:
            vals = warp_timesteps(lst, shift) if warp else torch.as_tensor(list(lst), dtype=torch.float32)
            vals = [float(v) for v in vals]
            if vals and vals[-1] == 0.0:  # a trailing 0 is the end point, not a model evaluation
                vals = vals[:-1]
            if not vals:
                raise ValueError("a denoising step list needs at least one non-zero timestep")
            return tuple(vals)
        return cls(prep(steps), prep(first_block) if first_block is not None else None, sigma_mode, shift)

    def for_block(self, block_index: int) -> tuple[float, ...]:
        if block_index == 0 and self.first_block is not None:
            return self.first_block
        return self.steps

    def sigma(self, t: Tensor | float) -> Tensor:
        return sigma_from_t(t, self.sigma_mode, self.shift)
