"""UniPC multistep sampling for rectified-flow models, as plain functions (k-diffusion style).

UniPC (Zhao et al. 2023) is a predictor (UniP) + corrector (UniC) multistep solver of the probability-flow
ODE, written here in its data-prediction ("x0") form with the σ-parametrisation of rectified flow:

    x_σ = α_σ·x0 + σ·ε,   α_σ = 1 − σ,   λ_σ = log(α_σ / σ)   (log-SNR / 2, increasing as σ → 0).

This is exactly what Wan's ``FlowUniPCMultistepScheduler`` and diffusers' ``UniPCMultistepScheduler`` with
``use_flow_sigmas=True, prediction_type="flow_prediction", predict_x0=True`` compute; the differences are
that nothing here is hidden state (a small immutable ``UniPCState`` is passed in and returned) and that all
solver math runs in float64 (results are cast back to the caller's dtype).

One step at σ_i with the model's x0 prediction m_i at the (uncorrected) sample x_i:

1. Corrector (UniC, skipped at the first step and for steps listed in ``disable_corrector``): re-do the
   previous predictor step σ_{i−1} → σ_i from the stored sample, now also using m_i. The corrected sample
   replaces x_i (the model is *not* evaluated again; m_i is reused, as in UniPC).
2. Predictor (UniP) σ_i → σ_{i+1} with the last ``p`` x0 predictions, p = min(order, steps done + 1) and, with
   ``lower_order_final``, p ≤ steps left (so the final step is first order).

A final step to σ = 0 is the limit λ → ∞ of the first-order update, which returns m_i itself; no corrector
runs after it because the model is never evaluated at σ = 0. Higher-order updates are undefined there, so a
schedule ending at 0 needs ``lower_order_final`` (the default).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Literal

import torch
from torch import Tensor

from .flow import shift_sigma

Variant = Literal["bh1", "bh2"]
# A denoiser maps (x, σ) to the model's x0 prediction; σ is a Python float.
Denoiser = Callable[[Tensor, float], Tensor]
# A callback receives (step index, sample the model saw, σ, x0 prediction).
StepCallback = Callable[[int, Tensor, float, Tensor], None]

WAN_UNIPC_SIGMA_MAX = 0.999


def shifted_sigmas(num_steps: int, shift: float, *, sigma_max: float = 1.0, sigma_min: float = 0.0,
                   final_sigma: float = 0.0) -> Tensor:
    """σ_0 … σ_N (float64, N + 1 values): shift(linspace(σ_max, σ_min, N + 1)[:−1]) then ``final_sigma``.

    ``sigma_max = 1`` gives the Euler grid of the ODE-data scripts (σ_0 = 1), ``0.999`` Wan's UniPC grid.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if not 0.0 <= sigma_min < sigma_max <= 1.0:
        raise ValueError(f"need 0 <= sigma_min < sigma_max <= 1, got {sigma_min}, {sigma_max}")
    base = torch.linspace(sigma_max, sigma_min, num_steps + 1, dtype=torch.float64)[:-1]
    final = torch.tensor([final_sigma], dtype=torch.float64)
    return torch.cat([shift_sigma(base, float(shift)), final])


def unipc_sigmas(num_steps: int, shift: float = 5.0, sigma_max: float = WAN_UNIPC_SIGMA_MAX) -> Tensor:
    """Wan's UniPC schedule: shift(linspace(σ_max, 0, N + 1)[:−1]) followed by a final σ = 0 (float64, N + 1).

    The model timesteps are t_i = 1000·σ_i (Wan truncates them to integers; see the teacher pipeline).
    """
    return shifted_sigmas(num_steps, shift, sigma_max=sigma_max)


@dataclass(frozen=True)
class UniPCConfig:
    """How UniPC steps: ``order`` 1..3, B(h) ``variant``, lower-order final steps, disabled correctors."""

    order: int = 2
    variant: Variant = "bh2"
    lower_order_final: bool = True
    disable_corrector: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.order not in (1, 2, 3):
            raise ValueError(f"UniPC order must be 1, 2 or 3, got {self.order}")
        if self.variant not in ("bh1", "bh2"):
            raise ValueError(f"UniPC variant must be 'bh1' or 'bh2', got {self.variant!r}")
        object.__setattr__(self, "disable_corrector", tuple(int(i) for i in self.disable_corrector))


@dataclass(frozen=True)
class UniPCState:
    """What UniPC carries between steps (immutable; ``unipc_step`` returns a new one).

    ``step``: index i of the σ the next call is at. ``x0_history``: float64 x0 predictions at σ_{i−k} … σ_{i−1},
    oldest first (at most ``order``). ``last_sample``: float64 sample the previous predictor started from.
    ``last_order``: the order of that predictor (the corrector uses the same order).
    """

    step: int = 0
    x0_history: tuple[Tensor, ...] = field(default=(), repr=False)
    last_sample: Tensor | None = field(default=None, repr=False)
    last_order: int = 0


def _lam(sigma: float) -> float:
    """λ = log(α/σ) with α = 1 − σ; +∞ at σ = 0."""
    return math.inf if sigma == 0.0 else math.log1p(-sigma) - math.log(sigma)


def _validate_sigmas(sigmas: Tensor) -> list[float]:
    s = [float(v) for v in torch.as_tensor(sigmas, dtype=torch.float64).reshape(-1)]
    if len(s) < 2:
        raise ValueError("a UniPC schedule needs at least two sigmas (one step)")
    if any(not 0.0 < v < 1.0 for v in s[:-1]) or not 0.0 <= s[-1] < 1.0:
        raise ValueError("UniPC needs 0 < σ < 1 for every evaluated σ and 0 <= σ_final < 1 "
                         "(λ = log((1 − σ)/σ) must be finite)")
    if any(b >= a for a, b in pairwise(s)):
        raise ValueError("UniPC sigmas must be strictly decreasing")
    return s


def _bh_coefficients(h: float, rks: Sequence[float], variant: Variant) -> tuple[float, float, Tensor, Tensor]:
    """(h·φ1, B(h), R, b) of the x0-form UniPC update with step h in λ and ratios rks (last one = 1).

    R[j, k] = r_k^j and b_j = j!·h·φ_{j+1}(h) / B(h) with hh = −h, as in the UniPC paper (Alg. 1 / eq. 8).
    """
    hh = -h
    h_phi_1 = math.expm1(hh)
    b_h = hh if variant == "bh1" else math.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1.0
    factorial = 1
    rows, b = [], []
    r = torch.tensor(list(rks), dtype=torch.float64)
    for j in range(1, len(rks) + 1):
        rows.append(r ** (j - 1))
        b.append(h_phi_k * factorial / b_h)
        factorial *= j + 1
        h_phi_k = h_phi_k / hh - 1.0 / factorial
    return h_phi_1, b_h, torch.stack(rows), torch.tensor(b, dtype=torch.float64)


def _base_update(x: Tensor, m0: Tensor, sigma_s: float, sigma_t: float, h_phi_1: float) -> Tensor:
    """First-order (DDIM) part: σ_t/σ_s·x − α_t·(e^{−h} − 1)·m0; exactly m0 when σ_t = 0."""
    if sigma_t == 0.0:
        return m0.clone()
    return (sigma_t / sigma_s) * x - (1.0 - sigma_t) * h_phi_1 * m0


def _differences(history: Sequence[Tensor], sigmas: Sequence[float], index: int, h: float,
                 order: int) -> tuple[list[float], list[Tensor]]:
    """r_k and D1_k = (m_{−k} − m0)/r_k for k = 1 … order − 1, with m0 = history[−1] at σ[index]."""
    lam0 = _lam(sigmas[index])
    rks, d1s = [], []
    for k in range(1, order):
        rk = (_lam(sigmas[index - k]) - lam0) / h
        rks.append(rk)
        d1s.append((history[-(k + 1)] - history[-1]) / rk)
    return rks, d1s


def unip_update(x: Tensor, history: Sequence[Tensor], sigmas: Sequence[float], index: int, order: int,
                variant: Variant = "bh2") -> Tensor:
    """UniP predictor σ[index] → σ[index + 1] of order ``order`` from float64 x and x0 history (m0 last)."""
    sigma_s, sigma_t = sigmas[index], sigmas[index + 1]
    if sigma_t == 0.0:
        if order != 1:
            raise ValueError("a UniPC step to σ = 0 must be first order (use lower_order_final)")
        return history[-1].clone()
    h = _lam(sigma_t) - _lam(sigma_s)
    rks, d1s = _differences(history, sigmas, index, h, order)
    h_phi_1, b_h, R, b = _bh_coefficients(h, rks + [1.0], variant)
    x_t = _base_update(x, history[-1], sigma_s, sigma_t, h_phi_1)
    if order == 1:
        return x_t
    if order == 2:
        rhos = [0.5]
    else:
        rhos = torch.linalg.solve(R[:-1, :-1], b[:-1]).tolist()
    residual = sum(rho * d for rho, d in zip(rhos, d1s))
    return x_t - (1.0 - sigma_t) * b_h * residual


def unic_update(x_prev: Tensor, history: Sequence[Tensor], model_t: Tensor, sigmas: Sequence[float],
                index: int, order: int, variant: Variant = "bh2") -> Tensor:
    """UniC corrector of the step σ[index − 1] → σ[index] that started at x_prev, using the new x0 ``model_t``
    at σ[index]; ``history`` holds the x0 predictions up to σ[index − 1] (m0 last), ``order`` is that step's."""
    sigma_s, sigma_t = sigmas[index - 1], sigmas[index]
    h = _lam(sigma_t) - _lam(sigma_s)
    rks, d1s = _differences(history, sigmas, index - 1, h, order)
    h_phi_1, b_h, R, b = _bh_coefficients(h, rks + [1.0], variant)
    m0 = history[-1]
    x_t = _base_update(x_prev, m0, sigma_s, sigma_t, h_phi_1)
    rhos = [0.5] if order == 1 else torch.linalg.solve(R, b).tolist()
    residual = sum(rho * d for rho, d in zip(rhos[:-1], d1s)) + rhos[-1] * (model_t - m0)
    return x_t - (1.0 - sigma_t) * b_h * residual


def step_order(config: UniPCConfig, step: int, num_steps: int) -> int:
    """Predictor order at step ``step`` of ``num_steps``: warm-up from 1, lowered near the end if configured."""
    order = min(config.order, step + 1)
    if config.lower_order_final:
        order = min(order, num_steps - step)
    return order


def unipc_step(x: Tensor, x0: Tensor, sigmas: Tensor | Sequence[float], state: UniPCState,
               config: UniPCConfig = UniPCConfig()) -> tuple[Tensor, UniPCState]:
    """One UniPC step: corrector on x (from the previous step) then predictor to the next σ.

    ``x`` is the sample at σ[state.step] the model was evaluated on, ``x0`` its x0 prediction. Returns the
    sample at σ[state.step + 1] (cast to x's dtype) and the new state.
    """
    s = _validate_sigmas(torch.as_tensor(sigmas))
    i, n = state.step, len(s) - 1
    if not 0 <= i < n:
        raise ValueError(f"UniPC state is at step {i}, the schedule has {n} steps")
    m_t = x0.to(torch.float64)
    sample = x.to(torch.float64)
    if i > 0 and state.last_sample is not None and (i - 1) not in config.disable_corrector:
        sample = unic_update(state.last_sample, state.x0_history, m_t, s, i, state.last_order, config.variant)
    history = (state.x0_history + (m_t,))[-config.order:]
    order = step_order(config, i, n)
    if s[i + 1] == 0.0 and order != 1:
        raise ValueError("a UniPC schedule ending at σ = 0 needs lower_order_final=True (or order 1)")
    x_next = unip_update(sample, history, s, i, order, config.variant)
    return x_next.to(x.dtype), UniPCState(i + 1, history, sample, order)


def sample_unipc(denoise: Denoiser, x: Tensor, sigmas: Tensor | Sequence[float],
                 config: UniPCConfig = UniPCConfig(), callback: StepCallback | None = None) -> Tensor:
    """Integrate from x at σ[0] down to σ[−1] with UniPC; ``denoise(x, σ)`` returns the x0 prediction."""
    sig = [float(v) for v in torch.as_tensor(sigmas, dtype=torch.float64).reshape(-1)]
    state = UniPCState()
    for i in range(len(sig) - 1):
        x0 = denoise(x, sig[i])
        if callback is not None:
            callback(i, x, sig[i], x0)
        x, state = unipc_step(x, x0, sig, state, config)
    return x


def sample_euler(denoise: Denoiser, x: Tensor, sigmas: Tensor | Sequence[float],
                 callback: StepCallback | None = None) -> Tensor:
    """Euler integration of dx/dσ = (x − x0)/σ (the flow) from σ[0] to σ[−1], in float64, for comparisons."""
    sig = [float(v) for v in torch.as_tensor(sigmas, dtype=torch.float64).reshape(-1)]
    for i in range(len(sig) - 1):
        x0 = denoise(x, sig[i])
        if callback is not None:
            callback(i, x, sig[i], x0)
        xd, x0d = x.to(torch.float64), x0.to(torch.float64)
        x = (xd + (xd - x0d) / sig[i] * (sig[i + 1] - sig[i])).to(x.dtype)
    return x
