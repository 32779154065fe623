"""DDIM inversion and reference pinning."""

from __future__ import annotations

import math

import pytest
import torch

from multicond.core.chunks import chunk_layout
from multicond.core.inversion import (FLOW_SIGMA_CEILING, ddim_invert, ddim_timesteps, flow_inversion_sigmas,
                                      flow_invert, nearest_step, pinned_step)


def sd_alphas_cumprod() -> torch.Tensor:
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)


def test_leading_timesteps():
    steps = ddim_timesteps(50)
    assert steps[:3] == [981, 961, 941] and steps[-1] == 1 and len(steps) == 50


def test_inversion_is_exact_for_the_true_noise():
    alphas = sd_alphas_cumprod()
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(1, 4, 8, 8, generator=g, dtype=torch.float64), torch.randn(1, 4, 8, 8, generator=g, dtype=torch.float64)
    timesteps = ddim_timesteps(10)
    start = alphas[0].sqrt() * x0 + (1 - alphas[0]).sqrt() * eps  # the clean latent sits at alphas_cumprod[0]
    trajectory = ddim_invert(start, lambda z, t: eps, alphas, timesteps)
    assert trajectory.shape == (11, 1, 4, 8, 8)
    torch.testing.assert_close(trajectory[-1], start)
    for i, t in enumerate(timesteps):
        torch.testing.assert_close(trajectory[i], alphas[t].sqrt() * x0 + (1 - alphas[t]).sqrt() * eps)


def test_noise_is_predicted_at_the_next_timestep_from_the_current_latent():
    seen = []
    ddim_invert(torch.zeros(1), lambda z, t: seen.append(t) or torch.zeros(1), sd_alphas_cumprod(), ddim_timesteps(5))
    assert seen == [1, 201, 401, 601, 801]


def test_pinning_follows_the_original_callback():
    assert [pinned_step(s, 5) for s in range(9)] == [5, 6, 6, 6, 6, 6, 6, 7, 8]
    assert [pinned_step(s, 0) for s in range(3)] == [0, 1, 2]


def test_nearest_step():
    steps = ddim_timesteps(50)
    assert nearest_step(999.0, steps) == 0 and nearest_step(0.0, steps) == 49 and nearest_step(950.0, steps) == 2


def test_chunk_layout_rows():
    layout = chunk_layout(3, 9, reference_index=1)
    assert layout.reference_rows == [1, 4, 7]
    assert layout.reference_of_row().tolist() == [1, 1, 1, 4, 4, 4, 7, 7, 7]
    assert layout.target_rows == [0, 2, 3, 5, 6, 8]


def shifted_sigmas(steps: int, shift: float = 3.0) -> list[float]:
    """SD3's schedule shape (time_snr_shift of a linear ramp), descending from 1, with the sampler's trailing 0."""
    ramp = [1 - i / steps for i in range(steps)]
    return [shift * t / (1 + (shift - 1) * t) for t in ramp] + [0.0]


def euler_forward(latent: torch.Tensor, velocity, sigmas: list[float]) -> torch.Tensor:
    """A sampler's Euler pass down `sigmas` (descending), velocity at the current point."""
    z = latent
    for sigma, sigma_next in zip(sigmas, sigmas[1:]):
        z = z + (sigma_next - sigma) * velocity(z, sigma)
    return z


def test_flow_schedule_drops_the_final_zero_and_stays_below_one():
    sigmas = flow_inversion_sigmas(shifted_sigmas(10))
    assert len(sigmas) == 10 and sigmas[0] == FLOW_SIGMA_CEILING < 1 and sigmas[-1] > 0
    assert sigmas[1:] == shifted_sigmas(10)[1:-1]
    with pytest.raises(ValueError, match="descending"):
        flow_inversion_sigmas([0.1, 0.5, 0.9])


def test_flow_inversion_is_exact_for_a_constant_field_and_the_sampler_returns_the_input():
    g = torch.Generator().manual_seed(0)
    x0, eps = (torch.randn(1, 16, 8, 6, generator=g, dtype=torch.float64) for _ in range(2))
    sigmas = flow_inversion_sigmas(shifted_sigmas(12))
    start = (1 - sigmas[-1]) * x0 + sigmas[-1] * eps  # the clean latent as x at the smallest sigma
    trajectory = flow_invert(start, lambda z, sigma: eps - x0, sigmas)  # a straight path: v = eps - x0 everywhere
    assert trajectory.shape == (12, 1, 16, 8, 6)
    for sigma, latent in zip(sigmas, trajectory):
        torch.testing.assert_close(latent, (1 - sigma) * x0 + sigma * eps)
    torch.testing.assert_close(euler_forward(trajectory[0], lambda z, sigma: eps - x0, sigmas), start)


def test_flow_inversion_of_a_linear_field_is_first_order():
    """v = a·x: the exact flow is x·exp(a·Δσ); Euler's error and the round trip's both halve with twice the steps."""
    a, x = 0.8, torch.ones(3, dtype=torch.float64)

    def field(z: torch.Tensor, sigma: float) -> torch.Tensor:
        return a * z

    errors, round_trips = [], []
    for steps in (20, 40, 80):
        sigmas = [0.9 - 0.85 * i / steps for i in range(steps + 1)]  # one interval, finer and finer
        trajectory = flow_invert(x, field, sigmas)
        errors.append(float((trajectory[0] - x * math.exp(a * (sigmas[0] - sigmas[-1]))).abs().max()))
        round_trips.append(float((euler_forward(trajectory[0], field, sigmas) - x).abs().max()))
    for worse, better in (errors[:2], errors[1:], round_trips[:2], round_trips[1:]):
        assert 1.7 < worse / better < 2.3
    assert errors[-1] < 2e-2 and round_trips[-1] < 1e-2


def test_flow_velocity_is_taken_at_the_less_noisy_point():
    seen = []
    sigmas = flow_inversion_sigmas(shifted_sigmas(4))
    flow_invert(torch.zeros(1), lambda z, sigma: seen.append(sigma) or torch.zeros(1), sigmas)
    assert seen == sorted(sigmas)[:-1]


def test_nearest_sigma():
    sigmas = flow_inversion_sigmas(shifted_sigmas(10))
    assert nearest_step(1.0, sigmas) == 0 and nearest_step(0.0, sigmas) == 9
    assert nearest_step(sigmas[4] + 1e-3, sigmas) == 4
