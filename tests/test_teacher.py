"""UniPC for flow models and the many-step teacher samplers / ODE-trajectory generators.

Truths used: diffusers' UniPCMultistepScheduler (an independent implementation of the same solver), the exact
PF-ODE of a Gaussian data distribution (closed form), the spec's grid values, and uncached reference loops
built directly on the DiT's attention layouts.
"""
from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import Tensor

from causal_forcing.models.attention import BlockCausal
from causal_forcing.pipelines.teacher import (
    cfg_combine,
    model_timestep,
    ode_trajectory_bidirectional,
    ode_trajectory_blockwise_kv,
    ode_trajectory_teacher_forcing,
    resolve_keep,
    sample_autoregressive,
    sample_bidirectional,
    solver_sigmas,
)
from causal_forcing.schedulers.unipc import (
    UniPCConfig,
    UniPCState,
    sample_euler,
    sample_unipc,
    unipc_sigmas,
    unipc_step,
)

HW = (4, 4)
C = 16


pytestmark = pytest.mark.usefixtures("one_thread")


def _contexts(model, batch: int = 1, seed: int = 3) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    cond = torch.randn(batch, cfg.text_len, cfg.text_dim, generator=g)
    neg = torch.randn(batch, cfg.text_len - 3, cfg.text_dim, generator=g)  # shorter: zero-padded by the model
    return cond, neg


def _noise(frames: int, batch: int = 1, seed: int = 11) -> Tensor:
    return torch.randn(batch, frames, C, *HW, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------------
# Schedules
# ---------------------------------------------------------------------------------------------------------
def test_unipc_sigmas_are_wans_grid():
    s = unipc_sigmas(50, 5.0)
    assert s.dtype == torch.float64 and s.shape == (51,)
    base = torch.linspace(0.999, 0, 51, dtype=torch.float64)[:-1]
    assert torch.allclose(s[:-1], 5 * base / (1 + 4 * base), atol=0, rtol=1e-15)
    assert s[-1] == 0 and abs(float(s[0]) - 4.995 / 4.996) < 1e-15


def test_euler_grid_matches_spec_ode_timesteps():
    t = 1000 * solver_sigmas("euler", 48, 5.0)
    assert t.shape == (49,) and t[-1] == 0
    expected = {0: 1000.0, 1: 995.76, 2: 991.38, 12: 937.5, 24: 833.333, 36: 625.0, 45: 250.0, 46: 178.57, 47: 96.15}
    for i, v in expected.items():
        assert abs(float(t[i]) - v) < 6e-3, (i, float(t[i]), v)


def test_model_timestep_truncates_like_wan():
    s = float(unipc_sigmas(50, 5.0)[0])
    assert model_timestep(s) == pytest.approx(999.7998, abs=1e-4)
    assert model_timestep(s, integer_timesteps=True) == 999.0
    assert model_timestep(0.0926, integer_timesteps=True) == 92.0


# ---------------------------------------------------------------------------------------------------------
# UniPC against diffusers and against the exact ODE
# ---------------------------------------------------------------------------------------------------------
def _analytic_flow(x: Tensor, sigma: float) -> Tensor:
    """A smooth nonlinear stand-in for a flow model."""
    return torch.sin(3 * x) * (1 + sigma) - 0.5 * x + sigma ** 2


def _diffusers_trajectory(x: Tensor, steps: int, shift: float, order: int, variant: str,
                          disable: tuple[int, ...]) -> list[Tensor]:
    from diffusers import UniPCMultistepScheduler

    sched = UniPCMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=shift,
                                    solver_order=order, solver_type=variant, predict_x0=True,
                                    lower_order_final=True, final_sigmas_type="zero",
                                    disable_corrector=list(disable))
    # Custom sigmas are shifted by diffusers itself: feed the unshifted Wan base grid.
    sched.set_timesteps(sigmas=torch.linspace(0.999, 0, steps + 1, dtype=torch.float64)[:-1].numpy())
    sched.set_begin_index(0)
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, t in enumerate(sched.timesteps):
            x = sched.step(_analytic_flow(x, float(sched.sigmas[i])), t, x).prev_sample
            out.append(x)
    assert torch.allclose(sched.sigmas.double(), unipc_sigmas(steps, shift), atol=1e-7)
    return out


@pytest.mark.parametrize("order,variant,disable", [(2, "bh2", ()), (1, "bh2", ()), (3, "bh2", ()),
                                                   (2, "bh1", ()), (2, "bh2", (0, 4))])
def test_unipc_matches_diffusers(order, variant, disable):
    steps, shift = 12, 5.0
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ref = _diffusers_trajectory(x.clone(), steps, shift, order, variant, disable)
    sig = unipc_sigmas(steps, shift)
    cfg = UniPCConfig(order=order, variant=variant, disable_corrector=disable)
    state, ours = UniPCState(), []
    for i in range(steps):
        x0 = x - float(sig[i]) * _analytic_flow(x, float(sig[i]))
        x, state = unipc_step(x, x0, sig, state, cfg)
        ours.append(x)
    # diffusers' bh1 returns NaN on a final step to σ = 0 (α·B(h)·0 with B(h) = −∞); compare the rest and
    # check that ours ends at the x0 prediction.
    n_cmp = steps - 1 if variant == "bh1" else steps
    for i in range(n_cmp):
        assert torch.allclose(ours[i], ref[i], atol=1e-5, rtol=0), (i, (ours[i] - ref[i]).abs().max())
    assert torch.isfinite(ours[-1]).all()
    assert not torch.allclose(ours[-1], ours[-2])


def test_unipc_higher_order_to_zero_needs_lower_order_final():
    sig = unipc_sigmas(3, 5.0)

    def den(xi, s):
        return 0.5 * xi
    with pytest.raises(ValueError, match="lower_order_final"):
        sample_unipc(den, torch.ones(2, dtype=torch.float64), sig, UniPCConfig(order=2, lower_order_final=False))
    with pytest.raises(ValueError, match="0 < σ < 1"):
        sample_unipc(den, torch.ones(2, dtype=torch.float64), [1.0, 0.5, 0.0])


def _gaussian_problem(n: int = 1000):
    """Per-coordinate Gaussian data N(μ, s²): the exact denoiser and the exact PF-ODE map.

    x_σ ~ N((1 − σ)μ, (1 − σ)²s² + σ²); E[x0 | x_σ] is affine; the ODE preserves z = (x_σ − (1 − σ)μ)/std(σ),
    so the solution from σ_0 is μ + s·z.
    """
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(n, generator=g, dtype=torch.float64)
    s = 0.5 + 1.5 * torch.rand(n, generator=g, dtype=torch.float64)
    x = torch.randn(n, generator=g, dtype=torch.float64)

    def std(sig: float) -> Tensor:
        return (((1 - sig) * s) ** 2 + sig ** 2).sqrt()

    def denoise(xi: Tensor, sig: float) -> Tensor:
        return mu + (1 - sig) * s ** 2 / std(sig) ** 2 * (xi - (1 - sig) * mu)

    def exact(x_start: Tensor, sig0: float) -> Tensor:
        return mu + s * (x_start - (1 - sig0) * mu) / std(sig0)

    return x, denoise, exact


def _slope(ns: list[int], errs: list[float]) -> float:
    lx = torch.tensor([math.log(n) for n in ns], dtype=torch.float64)
    ly = torch.tensor([math.log(e) for e in errs], dtype=torch.float64)
    lx = lx - lx.mean()
    return float(-(lx * (ly - ly.mean())).sum() / (lx * lx).sum())


def test_unipc_converges_to_exact_ode_solution_faster_than_euler():
    x, denoise, exact = _gaussian_problem()
    ns = [16, 32, 64, 128]
    err_unipc, err_euler = [], []
    for n in ns:
        sig = unipc_sigmas(n, shift=1.0)
        truth = exact(x, float(sig[0]))
        err_unipc.append(float((sample_unipc(denoise, x, sig) - truth).abs().max()))
        err_euler.append(float((sample_euler(denoise, x, sig) - truth).abs().max()))
    assert err_unipc[-1] < 1e-3
    assert _slope(ns, err_unipc) > 1.8          # second order (bh2, order 2, first-order final step)
    assert 0.85 < _slope(ns, err_euler) < 1.15  # first order
    assert all(u < e / 20 for u, e in zip(err_unipc[1:], err_euler[1:]))


# ---------------------------------------------------------------------------------------------------------
# Teacher samplers
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("solver", ["unipc", "euler"])
def test_single_block_autoregressive_equals_bidirectional(tiny_model, solver):
    cond, neg = _contexts(tiny_model)
    noise = _noise(3)
    kw = {"steps": 5, "shift": 5.0, "guidance": 3.0, "solver": solver}
    bi = sample_bidirectional(tiny_model, cond, neg, noise=noise, **kw)
    ar = sample_autoregressive(tiny_model, cond, neg, num_frames=3, latent_hw=HW, block_size=3, noise=noise, **kw)
    assert torch.allclose(ar, bi, atol=1e-5), (ar - bi).abs().max()
    assert (bi - noise).abs().max() > 0.1


def test_guidance_one_equals_unguided_and_forms_agree(tiny_model):
    cond, neg = _contexts(tiny_model)
    noise = _noise(2)
    kw = {"num_frames": 2, "latent_hw": HW, "block_size": 1, "steps": 4, "noise": noise}
    plain = sample_autoregressive(tiny_model, cond, None, guidance=1.0, **kw)
    g1 = sample_autoregressive(tiny_model, cond, neg, guidance=1.0, **kw)
    assert torch.allclose(g1, plain, atol=1e-5), (g1 - plain).abs().max()
    g3 = sample_autoregressive(tiny_model, cond, neg, guidance=3.0, **kw)
    assert (g3 - plain).abs().max() > 1e-2
    g2_plus = sample_autoregressive(tiny_model, cond, neg, guidance=2.0, guidance_form="cond_plus", **kw)
    assert torch.allclose(g2_plus, g3, atol=1e-5)
    with pytest.raises(ValueError, match="negative context"):
        sample_autoregressive(tiny_model, cond, None, guidance=3.0, **kw)


def test_cfg_combine_conventions():
    c, u = torch.tensor([2.0]), torch.tensor([0.5])
    assert cfg_combine(c, u, 3.0).item() == pytest.approx(0.5 + 3 * 1.5)
    assert cfg_combine(c, u, 3.0, "cond_plus").item() == pytest.approx(2.0 + 3 * 1.5)


def _reference_autoregressive(model, cond: Tensor, neg: Tensor, noise: Tensor, *, block_size: int, steps: int,
                              guidance: float, initial: Tensor | None = None) -> Tensor:
    """No KV cache: each block is denoised inside a block-causal forward over [clean history; block] with the
    history at t = 0, once per branch, guided as v_u + g·(v_c − v_u), solved with UniPC."""
    sig = unipc_sigmas(steps, 5.0)
    history = [] if initial is None else [initial]
    frames = noise.shape[1]
    for f0 in range(0, frames, block_size):
        block = noise[:, f0:f0 + block_size]
        n = block.shape[1]
        past = torch.cat(history, dim=1) if history else block[:, :0]

        def denoise(x: Tensor, s: float, past: Tensor = past, n: int = n) -> Tensor:
            full = torch.cat([past, x.float()], dim=1)
            t = torch.zeros(full.shape[:2])
            t[:, past.shape[1]:] = 1000 * s
            v = [model(full, t, ctx, layout=BlockCausal(block_size))[:, -n:] for ctx in (cond, neg)]
            flow = v[1].double() + guidance * (v[0].double() - v[1].double())
            return x.double() - s * flow

        history.append(sample_unipc(denoise, block, sig).float())
    return torch.cat(history, dim=1)


@pytest.mark.parametrize("block_size,batch_cfg", [(2, False), (1, False), (2, True)])
def test_autoregressive_matches_uncached_reference(tiny_model, block_size, batch_cfg):
    cond, neg = _contexts(tiny_model, batch=2)
    noise = _noise(4, batch=2)
    with torch.no_grad():
        ref = _reference_autoregressive(tiny_model, cond, neg, noise, block_size=block_size, steps=4, guidance=3.0)
    ar = sample_autoregressive(tiny_model, cond, neg, num_frames=4, latent_hw=HW, block_size=block_size, steps=4,
                               guidance=3.0, noise=noise, batch_cfg=batch_cfg)
    assert torch.allclose(ar, ref, atol=1e-4), (ar - ref).abs().max()


def test_autoregressive_with_initial_latent_matches_reference(tiny_model):
    cond, neg = _contexts(tiny_model)
    image = _noise(1, seed=5)
    noise = _noise(2)
    with torch.no_grad():
        ref = _reference_autoregressive(tiny_model, cond, neg, noise, block_size=1, steps=3, guidance=3.0,
                                        initial=image)
    ar = sample_autoregressive(tiny_model, cond, neg, num_frames=3, latent_hw=HW, block_size=1, steps=3,
                               guidance=3.0, noise=noise, initial_latent=image)
    assert torch.equal(ar[:, :1], image)
    assert torch.allclose(ar, ref, atol=1e-4), (ar - ref).abs().max()


def test_seeded_generator_equals_explicit_noise(tiny_model):
    cond, neg = _contexts(tiny_model)
    shape = (1, 2, C, *HW)
    a = sample_bidirectional(tiny_model, cond, neg, shape=shape, generator=torch.Generator().manual_seed(7), steps=3)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(7))
    b = sample_bidirectional(tiny_model, cond, neg, noise=noise, steps=3)
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="seeded generator"):
        sample_bidirectional(tiny_model, cond, neg, shape=shape, steps=3)


# ---------------------------------------------------------------------------------------------------------
# ODE trajectories
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("block_size,batch_cfg", [(2, False), (1, True)])
def test_teacher_forcing_trajectory_equals_blockwise_kv(tiny_model, block_size, batch_cfg):
    cond, neg = _contexts(tiny_model)
    clean = _noise(4, seed=21)
    noise = _noise(4)
    kw = {"block_size": block_size, "steps": 6, "guidance": 6.0, "keep": (0, 2, 4, -2, -1), "noise": noise}
    tf = ode_trajectory_teacher_forcing(tiny_model, cond, neg, clean, **kw)
    kv = ode_trajectory_blockwise_kv(tiny_model, cond, neg, clean, batch_cfg=batch_cfg, **kw)
    assert tf.shape == (1, 5, 4, C, *HW)
    assert torch.allclose(tf, kv, atol=1e-4), (tf - kv).abs().max()
    assert torch.equal(tf[:, 0], noise) and torch.equal(tf[:, -1], clean)
    if batch_cfg:
        tf_batched = ode_trajectory_teacher_forcing(tiny_model, cond, neg, clean, batch_cfg=True, **kw)
        assert torch.allclose(tf_batched, tf, atol=1e-5)
    # The history matters: a different ground truth changes later blocks but not the first one.
    other = ode_trajectory_teacher_forcing(tiny_model, cond, neg, clean.flip(1), **kw)
    assert torch.allclose(other[:, :4, :block_size], tf[:, :4, :block_size], atol=1e-5)
    assert (other[:, 3, block_size:] - tf[:, 3, block_size:]).abs().max() > 1e-3


def test_first_block_trajectory_is_the_bidirectional_ode_of_that_block(tiny_model):
    cond, neg = _contexts(tiny_model)
    noise = _noise(4)
    tf = ode_trajectory_teacher_forcing(tiny_model, cond, neg, _noise(4, seed=21), block_size=2, steps=6,
                                        keep=(0, 2, 4, -2), noise=noise)
    bi = ode_trajectory_bidirectional(tiny_model, cond, neg, noise=noise[:, :2], steps=6, shift=5.0,
                                      keep=(0, 2, 4, -1))
    assert torch.allclose(tf[:, :, :2], bi, atol=1e-5), (tf[:, :, :2] - bi).abs().max()


def test_bidirectional_trajectory_ends_at_the_euler_sample(tiny_model):
    cond, neg = _contexts(tiny_model)
    noise = _noise(2)
    traj = ode_trajectory_bidirectional(tiny_model, cond, neg, noise=noise, steps=8, keep=(0, 2, 4, 6, -1))
    assert traj.shape == (1, 5, 2, C, *HW) and torch.equal(traj[:, 0], noise)
    final = sample_bidirectional(tiny_model, cond, neg, noise=noise, steps=8, shift=8.0, guidance=6.0,
                                 solver="euler")
    assert torch.allclose(traj[:, -1], final, atol=1e-6)
    assert resolve_keep((0, 12, 24, 36, -1), 49) == [0, 12, 24, 36, 48]
    with pytest.raises(ValueError, match="outside"):
        resolve_keep((49,), 49)
