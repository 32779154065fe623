"""Inversion of a reference latent (DDIM for UNets, Euler for flow models) and the pinning of the reference row.

DDIM, as StyleAligned's `inversion.py`: timesteps ascending, the noise predicted with CFG (2 by
default) at the *next* timestep from the current latent, and the deterministic DDIM update
z_next = sqrt(a_next) * x0_hat + sqrt(1 - a_next) * eps. Latents here are on the VP scale the
UNet sees (ComfyUI's model input after `calculate_input`, diffusers' scheduler latents).

Flow models (SD3/SD3.5, Flux; x_σ = (1 − σ)·x0 + σ·ε, velocity v = ε − x0): the flow ODE run
backwards by plain Euler, σ ascending from the schedule's smallest σ, with the velocity taken at
the less noisy point (dit.md §3.5). Latents are x_σ as the model takes them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

NoisePrediction = Callable[[torch.Tensor, int], torch.Tensor]
Velocity = Callable[[torch.Tensor, float], torch.Tensor]

INVERSION_GUIDANCE = 2.0
PIN_OFFSET = 5
# ComfyUI's sampler ends with x / (1 − σ_last) on flow models: ending at σ = 1 divides by zero (dit.md §3.5).
FLOW_SIGMA_CEILING = 1.0 - 1e-4


def ddim_timesteps(steps: int, train_steps: int = 1000, steps_offset: int = 1) -> list[int]:
    """diffusers' DDIM "leading" spacing, descending: 981, 961, ..., 1 for 50 steps."""
    if not 1 <= steps <= train_steps:
        raise ValueError(f"steps must be in 1..{train_steps}, got {steps}")
    ratio = train_steps // steps
    return [i * ratio + steps_offset for i in reversed(range(steps))]


def ddim_invert(latent: torch.Tensor, predict_noise: NoisePrediction, alphas_cumprod: torch.Tensor,
                timesteps: Sequence[int], final_alpha_cumprod: float | None = None) -> torch.Tensor:
    """Invert a clean latent along `timesteps` (descending, as a sampler lists them).

    Returns the trajectory `zts` with `zts[0]` the noisiest latent and `zts[-1]` the input, so
    `zts[i]` is the latent at denoising step i. `final_alpha_cumprod` is used below t=0
    (diffusers' `set_alpha_to_one=False` gives `alphas_cumprod[0]`, the default).
    """
    final = float(alphas_cumprod[0]) if final_alpha_cumprod is None else final_alpha_cumprod
    stride = timesteps[0] - timesteps[1] if len(timesteps) > 1 else 1000
    trajectory = [latent]
    z = latent
    for t in reversed(timesteps):
        t_current = min(t - stride, 999)
        a_current = float(alphas_cumprod[t_current]) if t_current >= 0 else final
        a_next = float(alphas_cumprod[t])
        eps = predict_noise(z, t)
        x0 = (z - (1 - a_current) ** 0.5 * eps) / a_current ** 0.5
        z = a_next ** 0.5 * x0 + (1 - a_next) ** 0.5 * eps
        trajectory.append(z)
    return torch.stack(trajectory).flip(0)


def pinned_step(step: int, offset: int = PIN_OFFSET) -> int:
    """Which trajectory latent the reference row holds at denoising step `step`.

    The original starts the reference from `zts[offset]` and after step i overwrites it with
    `zts[max(offset + 1, i + 1)]`: the input of step s >= 1 is `zts[max(offset + 1, s)]`.
    """
    return offset if step == 0 else max(offset + 1, step)


def flow_inversion_sigmas(sigmas: Sequence[float], ceiling: float = FLOW_SIGMA_CEILING) -> list[float]:
    """A sampler's descending σ schedule as the flow inversion runs it, noisiest first.

    The trailing σ = 0 goes (the inversion starts from the clean latent at the smallest positive σ,
    where v = (x − D)/σ is defined) and σ is clamped to `ceiling`, below 1.
    """
    kept = [min(float(sigma), ceiling) for sigma in sigmas if float(sigma) > 0]
    if len(kept) < 2 or any(a < b for a, b in zip(kept, kept[1:])):
        raise ValueError(f"expected a descending schedule of two or more positive sigmas, got {list(sigmas)}")
    return kept


def flow_invert(latent: torch.Tensor, velocity: Velocity, sigmas: Sequence[float]) -> torch.Tensor:
    """Invert a clean latent along `sigmas` (descending, as `flow_inversion_sigmas` lists them) by Euler.

    x_{σ_{i+1}} = x_{σ_i} + (σ_{i+1} − σ_i)·v(x_{σ_i}, σ_i), σ ascending; `latent` is taken as x at
    the smallest σ. Returns the trajectory with `[i]` the latent at `sigmas[i]`: `[0]` the noisiest,
    `[-1]` the input.
    """
    ascending = [float(sigma) for sigma in reversed(sigmas)]
    trajectory = [latent]
    z = latent
    for sigma, sigma_next in zip(ascending, ascending[1:]):
        # Plain Euler inversion, RF-Inversion's baseline (arXiv 2410.10792); its controlled ODE is not implemented.
        z = z + (sigma_next - sigma) * velocity(z, sigma)
        trajectory.append(z)
    return torch.stack(trajectory).flip(0)


def nearest_step(timestep: float, timesteps: Sequence[float]) -> int:
    """Index of the inversion timestep (or flow σ) nearest to a sampler's continuous timestep (or σ)."""
    return min(range(len(timesteps)), key=lambda i: abs(timesteps[i] - timestep))
