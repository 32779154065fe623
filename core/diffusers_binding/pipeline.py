"""StyleAligned with a diffusers pipeline: DDIM inversion of a reference image, pinned sampling.

`invert_image` encodes an image with the pipeline's VAE and inverts it with core `ddim_invert`
(noise predicted with CFG 2 on an [uncond, cond] batch, as StyleAligned's `inversion.py`);
`pin_reference` gives the starting latent and the `callback_on_step_end` that holds the reference
row on the inverted trajectory; `generate` runs a pipeline with the binding installed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from diffusers import DDIMScheduler, DiffusionPipeline, StableDiffusionXLPipeline
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from ..inversion import INVERSION_GUIDANCE, PIN_OFFSET, ddim_invert, pinned_step
from ..style import StyleAlignedArgs
from .style_aligned import install_style_aligned

StepCallback = Callable[[DiffusionPipeline, int, Any, dict[str, torch.Tensor]], dict[str, torch.Tensor]]


def image_to_tensor(image: Image.Image | np.ndarray) -> torch.Tensor:
    """An RGB image (PIL, or HxWx3 uint8) as a (1, 3, H, W) float tensor with pixels in [-1, 1]."""
    array = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"expected an RGB image of shape (H, W, 3), got {array.shape}")
    pixels = torch.from_numpy(np.array(array, dtype=np.float32)) / 255.0  # a copy: PIL arrays are read-only
    return (pixels * 2 - 1).permute(2, 0, 1).unsqueeze(0)


@torch.no_grad()
def encode_image(pipe: DiffusionPipeline, image: Image.Image | np.ndarray) -> torch.Tensor:
    """The VAE latent of an image: `latent_dist.mean * scaling_factor`, encoded in float32."""
    vae = pipe.vae
    dtype = vae.dtype
    if dtype != torch.float32:
        vae.to(torch.float32)  # SD VAEs overflow in float16; the original encodes in float32 too
    try:
        pixels = image_to_tensor(image).to(vae.device)
        latent = vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor
    finally:
        if dtype != torch.float32:
            vae.to(dtype)
    return latent


@torch.no_grad()
def cfg_unet_inputs(pipe: DiffusionPipeline, prompt: str, height: int, width: int) -> dict[str, Any]:
    """UNet keyword inputs for a batch [uncond, cond] of one image, as the pipeline builds them.

    SDXL: the empty negative prompt becomes zeros (`force_zeros_for_empty_prompt`) and the time ids
    are (height, width), (0, 0), (height, width), what the pipeline uses when sampling at that size
    (the original hard-codes 1024, its sampling size).
    """
    device = pipe.unet.device
    if isinstance(pipe, StableDiffusionXLPipeline):
        cond, uncond, pooled, uncond_pooled = pipe.encode_prompt(prompt, device=device, num_images_per_prompt=1,
                                                                 do_classifier_free_guidance=True)
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=cond.dtype, device=device)
        added = {"text_embeds": torch.cat([uncond_pooled, pooled]), "time_ids": time_ids.repeat(2, 1)}
        return {"encoder_hidden_states": torch.cat([uncond, cond]), "added_cond_kwargs": added}
    cond, uncond = pipe.encode_prompt(prompt, device, 1, True)
    return {"encoder_hidden_states": torch.cat([uncond, cond])}


def _check_ddim(pipe: DiffusionPipeline) -> DDIMScheduler:
    if not isinstance(pipe.scheduler, DDIMScheduler):
        raise ValueError(f"DDIM inversion needs the pipeline's scheduler to be DDIMScheduler, got "
                         f"{type(pipe.scheduler).__name__}; set pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)")
    return pipe.scheduler


@torch.no_grad()
def invert_latent(pipe: DiffusionPipeline, latent: torch.Tensor, prompt: str, steps: int = 50,
                  guidance_scale: float = INVERSION_GUIDANCE) -> torch.Tensor:
    """DDIM-invert a (1, C, h, w) latent; `zts[0]` is the noisiest, `zts[-1]` the latent itself.

    Uses the pipeline's scheduler timesteps for `steps`, so sampling with the same number of steps
    walks the same trajectory back.
    """
    scheduler = _check_ddim(pipe)
    scheduler.set_timesteps(steps)
    unet = pipe.unet
    scale = pipe.vae_scale_factor
    inputs = cfg_unet_inputs(pipe, prompt, latent.shape[-2] * scale, latent.shape[-1] * scale)

    def predict_noise(z: torch.Tensor, t: int) -> torch.Tensor:
        batch = torch.cat([z, z]).to(unet.device, unet.dtype)
        uncond, cond = unet(batch, t, **inputs).sample.float().chunk(2)
        return uncond + guidance_scale * (cond - uncond)

    timesteps = [int(t) for t in scheduler.timesteps]
    return ddim_invert(latent.float(), predict_noise, scheduler.alphas_cumprod, timesteps,
                       float(scheduler.final_alpha_cumprod))


def invert_image(pipe: DiffusionPipeline, image: Image.Image | np.ndarray, prompt: str, steps: int = 50,
                 guidance_scale: float = INVERSION_GUIDANCE) -> torch.Tensor:
    """Encode `image` with the VAE and DDIM-invert it (`invert_latent`); the trajectory `zts`."""
    return invert_latent(pipe, encode_image(pipe, image), prompt, steps, guidance_scale)


@dataclass(frozen=True)
class PinnedReference:
    """A reference row held on an inverted trajectory while the other rows are sampled."""

    zts: torch.Tensor
    offset: int = PIN_OFFSET
    row: int = 0

    @property
    def start(self) -> torch.Tensor:
        """The reference's starting latent, `zts[offset]`."""
        return self.zts[self.offset]

    def callback(self, pipe: DiffusionPipeline, step: int, timestep: Any,
                 tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`callback_on_step_end`: after step `step` the reference holds the input of step `step + 1`."""
        latents = tensors["latents"]
        latents[self.row] = self.zts[pinned_step(step + 1, self.offset)][0].to(latents.device, latents.dtype)
        return {"latents": latents}


def pin_reference(zts: torch.Tensor, offset: int = PIN_OFFSET, row: int = 0) -> PinnedReference:
    """The start latent and step callback of StyleAligned's `make_inversion_callback`."""
    steps = zts.shape[0] - 1
    if not 0 <= offset < steps:
        raise ValueError(f"the pin offset must be in 0..{steps - 1} for a {steps}-step trajectory, got {offset}")
    return PinnedReference(zts, offset, row)


def row_generators(seed: int, rows: int) -> list[torch.Generator]:
    """One CPU generator per image, seeded `seed + row`: an image's noise does not depend on the batch."""
    return [torch.Generator("cpu").manual_seed(seed + row) for row in range(rows)]


def initial_latents(pipe: DiffusionPipeline, rows: int, height: int, width: int, seed: int,
                    reference: PinnedReference | None = None) -> torch.Tensor:
    """The starting noise of every row, the reference row replaced by its pinned start latent."""
    shape = (rows, pipe.unet.config.in_channels, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
    latents = randn_tensor(shape, generator=row_generators(seed, rows), dtype=torch.float32)
    if reference is not None:
        if reference.start.shape[-2:] != shape[-2:]:
            raise ValueError(f"the reference latent is {tuple(reference.start.shape[-2:])} but the images are "
                             f"{shape[-2:]}; invert the reference image at the generation size")
        latents[reference.row] = reference.start[0].float() / pipe.scheduler.init_noise_sigma
    return latents.to(pipe.unet.device, pipe.unet.dtype)


def default_size(pipe: DiffusionPipeline) -> int:
    return pipe.unet.config.sample_size * pipe.vae_scale_factor


def generate(pipe: DiffusionPipeline, prompts: Sequence[str], args: StyleAlignedArgs | None = StyleAlignedArgs(), *,
             steps: int = 50, guidance_scale: float = 7.5, seed: int = 0, height: int | None = None,
             width: int | None = None, reference: PinnedReference | None = None, output_type: str = "pil",
             **pipeline_kwargs: Any) -> Any:
    """Sample `prompts` as one batch, the first image being the style reference.

    `args=None` samples without StyleAligned. `reference` pins row 0 on an inverted trajectory
    (`pin_reference(invert_image(...))`). Each image's noise comes from `seed + index`. Returns
    the pipeline's `images`.
    """
    if guidance_scale <= 1 and args is not None:
        raise ValueError("StyleAligned here expects classifier-free guidance (guidance_scale > 1): the UNet batch "
                         "must be the [uncond, cond] chunks")
    if reference is not None:
        _check_ddim(pipe)
    height = height or default_size(pipe)
    width = width or default_size(pipe)
    latents = initial_latents(pipe, len(prompts), height, width, seed, reference)
    call = dict(prompt=list(prompts), num_inference_steps=steps, guidance_scale=guidance_scale, height=height,
                width=width, latents=latents, output_type=output_type, **pipeline_kwargs)
    if reference is not None:
        call.update(callback_on_step_end=reference.callback, callback_on_step_end_tensor_inputs=["latents"])
    if args is None:
        return pipe(**call).images
    with install_style_aligned(pipe, args):
        return pipe(**call).images
