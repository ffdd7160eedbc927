"""Flow-matching math against closed forms."""
import math

import pytest
import torch

from causal_forcing.schedulers.flow import (FewStepSchedule, add_noise, euler_step, flow_grid, flow_to_x0,
                                            grid_index, shift_sigma, sigma_from_t, training_grid,
                                            training_loss_weights, warp_timesteps, x0_to_flow)


def test_shift_closed_form():
    assert shift_sigma(0.5, 5.0) == pytest.approx(5 * 0.5 / (1 + 4 * 0.5))
    assert shift_sigma(1.0, 8.0) == pytest.approx(1.0) and shift_sigma(0.0, 8.0) == 0.0


def test_training_grid_shape_and_ends():
    t, s = training_grid()
    assert t.shape == (1000,) and t.dtype == torch.float32
    assert t[0] == 1000 and s[-1] == pytest.approx(5 * 0.001 / (1 + 4 * 0.001), rel=1e-5)
    assert torch.all(t[1:] < t[:-1])


def test_warped_lists_closed_form():
    # s ↦ 1000·shift5(s/1000)
    for s in (1000, 750, 500, 250):
        assert float(warp_timesteps([s])[0]) == pytest.approx(1000 * shift_sigma(s / 1000, 5.0), abs=1e-3)
    assert float(warp_timesteps([0])[0]) == 0.0


def test_sigma_modes():
    assert float(sigma_from_t(250.0, "exact")) == 0.25
    assert float(sigma_from_t(250.0, "grid")) == pytest.approx(0.2515974, abs=1e-6)
    assert float(sigma_from_t(0.0, "grid")) == pytest.approx(0.00498, abs=1e-5)
    assert int(grid_index(torch.tensor(937.5))) == 250
    with pytest.raises(ValueError):
        sigma_from_t(1.0, "linear")


def test_noise_x0_flow_round_trip():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 3, 4, 5, 5, generator=g), torch.randn(2, 3, 4, 5, 5, generator=g)
    sigma = torch.rand(2, 3, generator=g) * 0.9 + 0.05
    xt = add_noise(x0, eps, sigma)
    v = eps - x0  # the true flow
    assert torch.allclose(flow_to_x0(xt, v, sigma), x0, atol=1e-5)
    assert torch.allclose(x0_to_flow(xt, x0, sigma), v, atol=1e-4)


def test_euler_is_exact_for_straight_paths():
    """With the true (constant) flow of one data point, one Euler step from σ to 0 lands exactly on x0."""
    x0, eps = torch.randn(1, 2, 3, 4, 4), torch.randn(1, 2, 3, 4, 4)
    xt = add_noise(x0, eps, 0.7)
    assert torch.allclose(euler_step(xt, eps - x0, 0.7, 0.0), x0, atol=1e-6)


def test_loss_weights():
    w = training_loss_weights()
    assert w[0] == 0 and float(w.sum()) == pytest.approx(1000, rel=1e-4)
    assert int(w.argmax()) == 833 and float(w.max()) == pytest.approx(2.076, abs=2e-3)


def test_flow_grid_48():
    t, _ = flow_grid(48, 5.0)
    assert torch.allclose(t[[0, 12, 24, 36]], warp_timesteps([1000, 750, 500, 250]))


def test_few_step_schedule():
    s = FewStepSchedule.from_config([1000, 500, 0], first_block=[1000, 750, 500, 250])
    assert s.steps == pytest.approx((1000.0, 833.3333)) and len(s.for_block(0)) == 4
    assert s.for_block(1) == s.steps
    assert math.isclose(float(s.sigma(1000.0)), 1.0)
    with pytest.raises(ValueError):
        FewStepSchedule.from_config([0])
    with pytest.raises(ValueError):
        warp_timesteps([1200])
