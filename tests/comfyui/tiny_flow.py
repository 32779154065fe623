"""Helpers for flow-model tests of Style Reference Image: any sampler on the tiny SD3.5, a 16-channel VAE stand-in.

ComfyUI's VAE class builds a 16-channel AutoencoderKL only from a full-size state dict (its config path
keeps 4 latent channels), so the tests encode with `FixedLatentVAE`: an object with the one method the
node calls, not a mock of ComfyUI.
"""

from __future__ import annotations

from dataclasses import dataclass

import comfy.model_patcher
import comfy.sample
import torch

from multicond.core.diffusers_binding.tiny_dit import LATENT_CHANNELS

from . import tiny_dit

VAE_SCALE = 8  # SD3's and Flux's VAEs downscale by 8, as SD1.x/SDXL's


@dataclass(frozen=True)
class FixedLatentVAE:
    """encode: a 16-channel latent at 1/8 of the image's size, fixed noise plus the image's 8x8 means."""

    seed: int = 0
    channels: int = LATENT_CHANNELS

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        means = torch.nn.functional.avg_pool2d(pixels.movedim(-1, 1), VAE_SCALE).mean(1, keepdim=True)
        generator = torch.Generator().manual_seed(self.seed)
        noise = torch.randn(pixels.shape[0], self.channels, *means.shape[-2:], generator=generator)
        return noise + 2 * means


def sample(model: comfy.model_patcher.ModelPatcher, batch: int = 3, height: int = 16, width: int = 12, steps: int = 4,
           cfg: float = 4.0, sampler: str = "euler", scheduler: str = "normal", seed: int = 42,
           positive: list | None = None, negative: list | None = None) -> torch.Tensor:
    """`tiny_dit.sample` with any sampler and scheduler, inside inference_mode as ComfyUI's executor runs it
    (prompts: the tiny SD3's unless given, e.g. `tiny_dit.flux_conditioning` for a Flux model)."""
    with torch.inference_mode():
        latent = torch.zeros(batch, LATENT_CHANNELS, height, width)
        noise = comfy.sample.prepare_noise(latent, seed)
        positive = positive if positive is not None else tiny_dit.conditioning(1)
        negative = negative if negative is not None else tiny_dit.conditioning(2)
        return comfy.sample.sample(model, noise, steps, cfg, sampler, scheduler, positive, negative, latent, seed=seed,
                                   disable_pbar=True).clone()


def build_flux(seed: int = 0) -> comfy.model_patcher.ModelPatcher:
    """`tiny_dit.build_flux`'s Flux-dev-shaped model (ModelSamplingFlux) with small random weights, so it can run."""
    from . import tiny

    model = tiny_dit.build_flux()
    tiny.randomize(model.model.diffusion_model, seed)
    return model


def flux_conditioning(seed: int, tokens: int = 7, guidance: float = 3.5) -> list:
    """A Flux-dev prompt for `build_flux`: context width 32, pooled 16, the distilled guidance."""
    generator = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, tokens, 32, generator=generator),
             {"pooled_output": torch.randn(1, 16, generator=generator), "guidance": guidance}]]
