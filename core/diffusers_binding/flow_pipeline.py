"""StyleAligned with SD3/SD3.5 and Flux pipelines: flow inversion of a reference image and pinned sampling.

The flow counterpart of `pipeline.py`. `invert_flow_image` encodes an image with the pipeline's VAE
(`(mean − shift_factor)·scaling_factor`) and inverts it up the flow ODE with core `flow_invert` along the
σ schedule the pipeline itself samples with (`flow_sigmas`), so pinning by step index is pinning by σ;
SD3 predicts the velocity with CFG on an [uncond, cond] batch (2 by default, as the UNet inversion),
Flux-dev with its distilled guidance at the sampling's value (it has no uncond). `generate_flow` samples
a batch with `install_style_aligned_dit` / `install_style_aligned_flux` installed and the reference row
held on the trajectory (Flux: the packed latents the pipeline steps).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any, Final, Literal

import numpy as np
import torch
from diffusers import (DiffusionPipeline, FluxPipeline, FluxTransformer2DModel, SD3Transformer2DModel,
                       StableDiffusion3Pipeline)
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from ..inversion import INVERSION_GUIDANCE, PIN_OFFSET, flow_inversion_sigmas, flow_invert
from ..joint_style import JointStyle
from ..layers import LayerSelection
from ..style import StyleAlignedArgs
from .joint_style import CFG_CHUNKS, install_style_aligned_dit
from .joint_style_flux import ALIGNEDGEN_STYLE, install_style_aligned_flux
from .pipeline import PinnedReference, image_to_tensor, pin_reference, row_generators, sample_batch

FLUX_PACK = 2  # Flux packs 2x2 latent pixels into one token
FAMILY_DEFAULT: Final = "family default"  # SD3: the paper's StyleAlignedArgs(); Flux: AlignedGen's
Style = StyleAlignedArgs | JointStyle | Literal["family default"] | None


def flow_family(pipe: Any) -> str | None:
    """"sd3" for a pipeline with an SD3/SD3.5 transformer, "flux" for one with a Flux transformer (text-to-image,
    ControlNet, ... pipelines alike), None for any other."""
    transformer = getattr(pipe, "transformer", None) if isinstance(pipe, DiffusionPipeline) else None
    if isinstance(transformer, SD3Transformer2DModel):
        return "sd3"
    return "flux" if isinstance(transformer, FluxTransformer2DModel) else None


def _family(pipe: Any) -> str:
    family = flow_family(pipe)
    if family is None:
        raise TypeError(f"expected an SD3/SD3.5 or Flux pipeline, got {type(pipe).__name__}")
    return family


def default_flow_size(pipe: DiffusionPipeline) -> int:
    """The pipeline's own default side in pixels (SD3: the transformer's sample size; Flux: 1024)."""
    if flow_family(pipe) == "flux":
        return pipe.default_sample_size * pipe.vae_scale_factor
    return pipe.transformer.config.sample_size * pipe.vae_scale_factor


def latent_size(pipe: DiffusionPipeline, height: int, width: int) -> tuple[int, int]:
    """The unpacked latent's (h, w) the pipeline samples for an image of height x width (Flux: even sides)."""
    if flow_family(pipe) == "flux":
        step = pipe.vae_scale_factor * FLUX_PACK
        return FLUX_PACK * (height // step), FLUX_PACK * (width // step)
    return height // pipe.vae_scale_factor, width // pipe.vae_scale_factor


def first_call_of_step(pipe: DiffusionPipeline, seen: set[tuple[int, Any]]) -> bool:
    """Whether a transformer call is the first of the scheduler's current step, noting it in `seen`: a Flux true-CFG
    step calls the transformer a second time, with the negative prompt."""
    scheduler = pipe.scheduler
    step = (id(scheduler.timesteps), scheduler.step_index)
    if step in seen:
        return False
    seen.add(step)
    return True


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) → Flux's tokens (B, h/2·w/2, 4C), row-major, each token its 2x2 patch (FluxPipeline._pack_latents)."""
    batch, channels, height, width = latents.shape
    patches = latents.view(batch, channels, height // 2, 2, width // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(batch, (height // 2) * (width // 2), channels * 4)


def flow_sigmas(pipe: DiffusionPipeline, steps: int, height: int, width: int) -> list[float]:
    """The σ schedule the pipeline samples `steps` steps with at this size, noisiest first, without the final 0.

    Set on a copy of the pipeline's scheduler exactly as `StableDiffusion3Pipeline`/`FluxPipeline.__call__`
    set theirs (Flux: linearly spaced σ shifted by mu of the token count); tested against the pipelines.
    """
    scheduler = copy.deepcopy(pipe.scheduler)
    config = scheduler.config
    rows, columns = latent_size(pipe, height, width)
    patch = FLUX_PACK if flow_family(pipe) == "flux" else pipe.transformer.config.patch_size
    options: dict[str, Any] = {}
    if config.get("use_dynamic_shifting"):
        max_shift = config.get("max_shift", 1.15 if flow_family(pipe) == "flux" else 1.16)  # each pipeline's fallback
        options["mu"] = calculate_shift((rows // patch) * (columns // patch), config.get("base_image_seq_len", 256),
                                        config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5), max_shift)
    if flow_family(pipe) == "flux" and not config.get("use_flow_sigmas"):
        options["sigmas"] = np.linspace(1.0, 1 / steps, steps)
        scheduler.set_timesteps(device="cpu", **options)
    else:
        scheduler.set_timesteps(steps, device="cpu", **options)
    return [float(sigma) for sigma in scheduler.sigmas[:-1]]


@torch.no_grad()
def encode_flow_image(pipe: DiffusionPipeline, image: Image.Image | np.ndarray) -> torch.Tensor:
    """The unpacked VAE latent of an image, `(latent_dist.mean − shift_factor)·scaling_factor`, encoded in float32."""
    vae = pipe.vae
    dtype = vae.dtype
    if dtype != torch.float32:
        vae.to(torch.float32)  # as the UNet path: encode in float32
    try:
        mean = vae.encode(image_to_tensor(image).to(vae.device)).latent_dist.mean
    finally:
        if dtype != torch.float32:
            vae.to(dtype)
    return (mean - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor


@torch.no_grad()
def invert_flow_latent(pipe: DiffusionPipeline, latent: torch.Tensor, prompt: str, steps: int = 28,
                       guidance_scale: float = INVERSION_GUIDANCE, max_sequence_length: int | None = None) -> torch.Tensor:
    """Euler-invert an unpacked (1, C, h, w) latent along the pipeline's own schedule for `steps`.

    Returns `zts` of `steps + 1` latents: `zts[i]` the input of sampling step i (noisiest first) and
    `zts[-1]` the latent itself, the layout `pin_reference` takes. SD3 predicts with CFG `guidance_scale`
    on [uncond, cond]; Flux-dev embeds `guidance_scale` as its distilled guidance (no uncond row).
    """
    scale = pipe.vae_scale_factor
    # σ = 1 kept: unlike ComfyUI's sampler (dit.md §6), nothing here divides by 1 − σ.
    sigmas = flow_inversion_sigmas(flow_sigmas(pipe, steps, latent.shape[-2] * scale, latent.shape[-1] * scale),
                                   ceiling=1.0)
    trajectory = flow_invert(latent.float(), flow_velocity(pipe, latent, prompt, guidance_scale, max_sequence_length),
                             sigmas)
    return torch.cat([trajectory, latent[None].float()])  # after the last step: the clean latent


def flow_velocity(pipe: DiffusionPipeline, latent: torch.Tensor, prompt: str, guidance_scale: float,
                  max_sequence_length: int | None = None) -> Callable[[torch.Tensor, float], torch.Tensor]:
    """v(z, σ) on unpacked latents shaped like `latent`, as the pipeline predicts it for one image of `prompt`:
    SD3 with CFG on [uncond (the empty prompt), cond], Flux with `guidance_scale` embedded."""
    velocity = _velocity_sd3 if _family(pipe) == "sd3" else _velocity_flux
    return velocity(pipe, latent, prompt, guidance_scale, max_sequence_length)


def _text_length(pipe: DiffusionPipeline, max_sequence_length: int | None) -> dict[str, int]:
    return {} if max_sequence_length is None else {"max_sequence_length": max_sequence_length}


def _velocity_sd3(pipe: StableDiffusion3Pipeline, latent: torch.Tensor, prompt: str, guidance_scale: float,
                  max_sequence_length: int | None) -> Callable[[torch.Tensor, float], torch.Tensor]:
    transformer = pipe.transformer
    cond, uncond, pooled, uncond_pooled = pipe.encode_prompt(
        prompt, None, None, device=transformer.device, do_classifier_free_guidance=True,
        **_text_length(pipe, max_sequence_length))
    context, pooled_both = torch.cat([uncond, cond]), torch.cat([uncond_pooled, pooled])

    @torch.no_grad()
    def velocity(z: torch.Tensor, sigma: float) -> torch.Tensor:
        batch = torch.cat([z, z]).to(transformer.device, transformer.dtype)
        timestep = torch.full((2,), 1000.0 * sigma, device=transformer.device)  # the pipeline's t = 1000·σ
        out = transformer(hidden_states=batch, timestep=timestep, encoder_hidden_states=context,
                          pooled_projections=pooled_both, return_dict=False)[0].float()
        v_uncond, v_cond = out.chunk(2)
        return v_uncond + guidance_scale * (v_cond - v_uncond)

    return velocity


def _velocity_flux(pipe: FluxPipeline, latent: torch.Tensor, prompt: str, guidance_scale: float,
                   max_sequence_length: int | None) -> Callable[[torch.Tensor, float], torch.Tensor]:
    transformer = pipe.transformer
    context, pooled, text_ids = pipe.encode_prompt(prompt, None, device=transformer.device,
                                                   **_text_length(pipe, max_sequence_length))
    _, channels, rows, columns = latent.shape
    image_ids = pipe._prepare_latent_image_ids(1, rows // 2, columns // 2, transformer.device, transformer.dtype)
    guidance = torch.full((1,), guidance_scale, device=transformer.device) if transformer.config.guidance_embeds \
        else None

    @torch.no_grad()
    def velocity(z: torch.Tensor, sigma: float) -> torch.Tensor:
        tokens = pack(z).to(transformer.device, transformer.dtype)
        out = transformer(hidden_states=tokens, timestep=torch.full((1,), sigma, device=transformer.device),
                          guidance=guidance, pooled_projections=pooled, encoder_hidden_states=context,
                          txt_ids=text_ids, img_ids=image_ids, return_dict=False)[0].float()
        return unpack(out, channels, rows, columns)

    return velocity


def unpack(tokens: torch.Tensor, channels: int, rows: int, columns: int) -> torch.Tensor:
    """The inverse of `pack`: Flux's (B, h/2·w/2, 4C) tokens → (B, C, h, w)."""
    batch = tokens.shape[0]
    patches = tokens.view(batch, rows // 2, columns // 2, channels, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(batch, channels, rows, columns)


def invert_flow_image(pipe: DiffusionPipeline, image: Image.Image | np.ndarray, prompt: str, steps: int = 28,
                      guidance_scale: float = INVERSION_GUIDANCE, max_sequence_length: int | None = None) -> torch.Tensor:
    """Encode `image` with the VAE and Euler-invert it (`invert_flow_latent`); the trajectory `zts`."""
    return invert_flow_latent(pipe, encode_flow_image(pipe, image), prompt, steps, guidance_scale, max_sequence_length)


def pin_flow_reference(pipe: DiffusionPipeline, zts: torch.Tensor, offset: int = PIN_OFFSET,
                       row: int = 0) -> PinnedReference:
    """`pin_reference` on the latents the pipeline steps: Flux's packed tokens, SD3's latents as they are."""
    return pin_reference(pack(zts.flatten(0, 1)).unsqueeze(1) if _family(pipe) == "flux" else zts, offset, row)


def initial_flow_latents(pipe: DiffusionPipeline, rows: int, height: int, width: int, seed: int,
                         reference: PinnedReference | None = None) -> torch.Tensor:
    """Every row's starting noise (seed + row, as the UNet path), the reference row its pinned start latent;
    packed for Flux."""
    family = _family(pipe)
    channels = pipe.transformer.config.in_channels // (4 if family == "flux" else 1)
    latents = randn_tensor((rows, channels, *latent_size(pipe, height, width)), generator=row_generators(seed, rows),
                           dtype=torch.float32)
    if family == "flux":
        latents = pack(latents)
    if reference is not None:
        if reference.start.shape[1:] != latents.shape[1:]:
            raise ValueError(f"the reference latent is {tuple(reference.start.shape[1:])} but the images' are "
                             f"{tuple(latents.shape[1:])}; invert the reference image at the generation size")
        latents[reference.row] = reference.start[0].float()
    return latents.to(pipe.transformer.device, pipe.transformer.dtype)


def install_flow_style(pipe: DiffusionPipeline, style: Style, guidance_scale: float,
                       layers: LayerSelection | None = None) -> Any:
    """`install_style_aligned_dit` (chunks: [uncond, cond] under CFG) or `install_style_aligned_flux` (one chunk:
    Flux-dev samples without an uncond row); `FAMILY_DEFAULT` is the paper's settings on SD3, AlignedGen's on Flux."""
    if style is None:
        raise ValueError("install_flow_style needs a style; sample without one by calling the pipeline")
    if _family(pipe) == "flux":
        return install_style_aligned_flux(pipe, ALIGNEDGEN_STYLE if style == FAMILY_DEFAULT else style, layers=layers)
    chunks = CFG_CHUNKS if guidance_scale > 1 else 1  # StableDiffusion3Pipeline runs CFG only above 1
    return install_style_aligned_dit(pipe, StyleAlignedArgs() if style == FAMILY_DEFAULT else style, layers=layers,
                                     chunks=chunks)


def generate_flow(pipe: DiffusionPipeline, prompts: Sequence[str], style: Style = FAMILY_DEFAULT, *, steps: int = 28,
                  guidance_scale: float = 7.0, seed: int = 0, height: int | None = None, width: int | None = None,
                  reference: PinnedReference | None = None, layers: LayerSelection | None = None,
                  output_type: str = "pil", **pipeline_kwargs: Any) -> Any:
    """Sample `prompts` as one batch on an SD3/SD3.5 or Flux pipeline, the first image being the style reference.

    `style=None` samples plainly; `FAMILY_DEFAULT` is the paper's AdaIN q/k and sharing on SD3, AlignedGen's
    settings on Flux. `reference` pins row 0 (`pin_flow_reference(invert_flow_image(...))`).
    Each image's noise comes from `seed + index`. Returns the pipeline's `images`.
    """
    height = height or default_flow_size(pipe)
    width = width or default_flow_size(pipe)
    latents = initial_flow_latents(pipe, len(prompts), height, width, seed, reference)
    install = None if style is None else (lambda: install_flow_style(pipe, style, guidance_scale, layers))
    return sample_batch(pipe, dict(prompt=list(prompts), num_inference_steps=steps, guidance_scale=guidance_scale,
                                   height=height, width=width, latents=latents, output_type=output_type,
                                   **pipeline_kwargs), reference, install)
