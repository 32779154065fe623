"""DDIM inversion and reference pinning."""

from __future__ import annotations

import torch

from multicond.core.chunks import chunk_layout
from multicond.core.inversion import ddim_invert, ddim_timesteps, nearest_step, pinned_step


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
