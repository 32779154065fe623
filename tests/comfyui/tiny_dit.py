"""Tiny SD3.5-shaped ComfyUI models with the very weights of the diffusers tiny transformers (dit.md §5).

`build(variant)` converts `multicond.core.diffusers_binding.tiny_dit.tiny_sd3_transformer(variant)` with
ComfyUI's own loader, so both ComfyUI hosts and diffusers hold the same model: "sd35m" is SD3.5-M-like
(qk-norm, an MMDiT-X image-only attn2 in block 0), "sd35l" SD3.5-L-like (qk-norm only). Two joint
blocks of two heads, a 16x16 position table; latents have 16 channels, contexts 64, pooled 32.
"""

from __future__ import annotations

import functools

import comfy.model_patcher
import comfy.sample
import comfy.sd
import comfy.supported_models
import torch

from multicond.core.diffusers_binding.tiny_dit import (CONTEXT_WIDTH, LATENT_CHANNELS, POOLED_WIDTH,
                                                       tiny_sd3_transformer)

from . import tiny


@functools.lru_cache(maxsize=None)
def transformer(variant: str = "sd35m", seed: int = 0):
    """The diffusers model (cached: tests never change its weights)."""
    return tiny_sd3_transformer(variant, seed)


def build(variant: str = "sd35m", seed: int = 0) -> comfy.model_patcher.ModelPatcher:
    """A ComfyUI SD3 ModelPatcher with `transformer(variant, seed)`'s weights, detected by ComfyUI."""
    # convert_diffusers_mmdit pops the keys it maps and swaps tensors in place: it gets clones (dit.md §5.4).
    state = {key: value.clone() for key, value in transformer(variant, seed).state_dict().items()}
    patcher = comfy.sd.load_diffusion_model_state_dict(state, model_options={"dtype": torch.float32})
    assert patcher is not None, "ComfyUI did not detect the tiny SD3 model"
    return patcher


def build_flux() -> comfy.model_patcher.ModelPatcher:
    """A tiny Flux-dev-shaped ComfyUI model (dit.md §5.2); its weights stay uninitialised: it is never run."""
    import comfy.ldm.flux.model

    unet_config = {"image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": 16, "context_in_dim": 32,
                   "hidden_size": 64, "mlp_ratio": 4.0, "num_heads": 2, "depth": 1, "depth_single_blocks": 1,
                   "axes_dim": [8, 12, 12], "theta": 10000, "patch_size": 2, "qkv_bias": True, "guidance_embed": True}
    if "txt_ids_dims" in comfy.ldm.flux.model.FluxParams.__dataclass_fields__:  # newer hosts require it
        unet_config["txt_ids_dims"] = []
    config = comfy.supported_models.Flux(unet_config)
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({}, "", device=torch.device("cpu"))
    return comfy.model_patcher.ModelPatcher(model, torch.device("cpu"), torch.device("cpu"))


def inputs(batch: int, seed: int = 0, height: int = 16, width: int = 12,
           text_tokens: int = 10) -> dict[str, torch.Tensor]:
    """One model call's latent `[batch, 16, height, width]`, context and pooled embedding."""
    generator = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(batch, LATENT_CHANNELS, height, width, generator=generator),
            "context": torch.randn(batch, text_tokens, CONTEXT_WIDTH, generator=generator),
            "pooled": torch.randn(batch, POOLED_WIDTH, generator=generator)}


def apply_model(model: comfy.model_patcher.ModelPatcher, x: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor,
                sigma: float, cond_or_uncond: list[int]) -> torch.Tensor:
    """ComfyUI's denoised prediction of one model call with `model`'s patches, as the sampler makes it."""
    sigmas = torch.full((x.shape[0],), sigma)
    # The model's wrappers ride in transformer_options, as the sampler puts them there.
    options = {**model.model_options.get("transformer_options", {}), "wrappers": model.wrappers,
               "cond_or_uncond": list(cond_or_uncond),
               "sigmas": sigmas}
    with torch.inference_mode():
        return model.model.apply_model(x, sigmas, c_crossattn=context, y=pooled, transformer_options=options).clone()


def conditioning(seed: int, tokens: int = 10) -> list:
    generator = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, tokens, CONTEXT_WIDTH, generator=generator),
             {"pooled_output": torch.randn(1, POOLED_WIDTH, generator=generator)}]]


def sample(model, batch: int = 3, height: int = 16, width: int = 12, steps: int = 2, cfg: float = 4.0, seed: int = 42,
           positive: list | None = None, negative: list | None = None) -> torch.Tensor:
    """Sample inside inference_mode, as ComfyUI's executor does (euler, simple: a flow model's usual pair)."""
    with torch.inference_mode():
        latent = torch.zeros(batch, LATENT_CHANNELS, height, width)
        noise = comfy.sample.prepare_noise(latent, seed)
        positive = positive if positive is not None else conditioning(1)
        negative = negative if negative is not None else conditioning(2)
        return comfy.sample.sample(model, noise, steps, cfg, "euler", "simple", positive, negative, latent, seed=seed,
                                   disable_pbar=True).clone()


@functools.lru_cache(maxsize=None)
def flux_transformer(variant: str = "dev", seed: int = 0):
    """The diffusers tiny Flux model (cached: tests never change its weights)."""
    from multicond.core.diffusers_binding.tiny_dit import tiny_flux_transformer

    return tiny_flux_transformer(variant, seed)


def build_flux_weighted(variant: str = "dev", seed: int = 0) -> comfy.model_patcher.ModelPatcher:
    """A ComfyUI Flux-dev or -schnell model with `flux_transformer(variant, seed)`'s weights."""
    return tiny.flux_from_diffusers(flux_transformer(variant, seed), variant)


def flux_inputs(batch: int, seed: int = 0, height: int = 16, width: int = 12, text_tokens: int = 7) -> dict:
    """One Flux model call's latent `[batch, 16, height, width]`, context `[batch, text_tokens, 32]` and pooled."""
    from multicond.core.diffusers_binding.tiny_dit import FLUX_CONTEXT_WIDTH, FLUX_POOLED_WIDTH

    generator = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(batch, LATENT_CHANNELS, height, width, generator=generator),
            "context": torch.randn(batch, text_tokens, FLUX_CONTEXT_WIDTH, generator=generator),
            "pooled": torch.randn(batch, FLUX_POOLED_WIDTH, generator=generator)}


def apply_flux(model: comfy.model_patcher.ModelPatcher, x: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor,
               sigma: float, cond_or_uncond: list[int], guidance: float = 3.5) -> torch.Tensor:
    """ComfyUI's denoised prediction of one Flux model call with `model`'s patches (guidance is ignored by schnell)."""
    sigmas = torch.full((x.shape[0],), sigma)
    # The sampler hands the patcher's wrappers to the model this way (Flux runs its DIFFUSION_MODEL wrappers).
    # The model's wrappers ride in transformer_options, as the sampler puts them there.
    options = {**model.model_options.get("transformer_options", {}), "wrappers": model.wrappers,
               "cond_or_uncond": list(cond_or_uncond),
               "sigmas": sigmas, "wrappers": model.wrappers}
    guidances = torch.full((x.shape[0],), guidance)
    with torch.inference_mode():
        return model.model.apply_model(x, sigmas, c_crossattn=context, y=pooled, guidance=guidances,
                                       transformer_options=options).clone()


def flux_conditioning(seed: int, tokens: int = 7, guidance: float = 3.5) -> list:
    from multicond.core.diffusers_binding.tiny_dit import FLUX_CONTEXT_WIDTH, FLUX_POOLED_WIDTH

    generator = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, tokens, FLUX_CONTEXT_WIDTH, generator=generator),
             {"pooled_output": torch.randn(1, FLUX_POOLED_WIDTH, generator=generator), "guidance": guidance}]]


def diffusers_denoised(transformer, data: dict, sigma: float) -> torch.Tensor:
    """A diffusers SD3 transformer's prediction as ComfyUI returns it: denoised = x - sigma * v (dit.md §5.3)."""
    rows = data["x"].shape[0]
    with torch.no_grad():
        velocity = transformer(hidden_states=data["x"], encoder_hidden_states=data["context"],
                               pooled_projections=data["pooled"], timestep=torch.full((rows,), 1000.0 * sigma)).sample
    return data["x"] - sigma * velocity


def diffusers_flux_denoised(transformer, data: dict, sigma: float, guidance: float | None = 3.5) -> torch.Tensor:
    """A diffusers Flux transformer's prediction as ComfyUI returns it: the latent packed 2x2 into tokens, the velocity
    unpacked, denoised = x - sigma * v; both hosts embed 1000·sigma and 1000·guidance (dit.md §1.3)."""
    from multicond.core.diffusers_binding.flow_pipeline import pack, unpack
    from multicond.core.diffusers_binding.tiny_dit import flux_image_ids

    x = data["x"]
    batch, channels, height, width = x.shape
    inputs = {"hidden_states": pack(x), "encoder_hidden_states": data["context"], "pooled_projections": data["pooled"],
              "timestep": torch.full((batch,), sigma), "img_ids": flux_image_ids(height // 2, width // 2),
              "txt_ids": torch.zeros(data["context"].shape[1], 3)}
    if guidance is not None:
        inputs["guidance"] = torch.full((batch,), guidance)
    with torch.no_grad():
        velocity = transformer(**inputs).sample
    return x - sigma * unpack(velocity, channels, height, width)
