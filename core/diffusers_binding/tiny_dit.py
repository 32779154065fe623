"""Tiny random SD3/SD3.5- and Flux-shaped transformers for CPU tests (dit.md §5.1).

The real `SD3Transformer2DModel` class with two joint blocks, two heads of 64 and a 16x16 position
table (about 1.2 M parameters); the real `FluxTransformer2DModel` with two double and two single
blocks, two heads of 32 and rotary axes (8, 12, 12) (about 0.5 M parameters; "dev" embeds guidance,
"schnell" does not). Weights are deterministic random numbers that make every path active: every
parameter `0.05 * randn`, the qk-norm weights `1 + 0.1 * randn`. Their outputs are noise.
"""

from __future__ import annotations

from typing import Literal

import torch
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

Variant = Literal["sd35m", "sd35l", "sd3m"]
VARIANTS: tuple[str, ...] = ("sd35m", "sd35l", "sd3m")

LATENT_CHANNELS = 16
CONTEXT_WIDTH = 64
POOLED_WIDTH = 32

FluxVariant = Literal["dev", "schnell"]
FLUX_VARIANTS: tuple[str, ...] = ("dev", "schnell")
FLUX_PACKED_CHANNELS = 64  # 16 latent channels packed 2x2 (dit.md §1.3)
FLUX_CONTEXT_WIDTH = 32
FLUX_POOLED_WIDTH = 16
QK_NORMS = ("norm_q", "norm_k", "norm_added_q", "norm_added_k")


def tiny_sd3_config(variant: Variant = "sd35m") -> dict:
    """SD3.5-M-like (qk-norm, MMDiT-X image-only attn2 in block 0), SD3.5-L-like (qk-norm), SD3-M-like (neither)."""
    if variant not in VARIANTS:
        raise ValueError(f"tiny SD3 variant must be one of {VARIANTS}, got {variant!r}")
    config = dict(sample_size=16, patch_size=2, in_channels=LATENT_CHANNELS, num_layers=2, attention_head_dim=64,
                  num_attention_heads=2, joint_attention_dim=CONTEXT_WIDTH, caption_projection_dim=128,
                  pooled_projection_dim=POOLED_WIDTH, out_channels=LATENT_CHANNELS, pos_embed_max_size=16)
    if variant != "sd3m":
        config["qk_norm"] = "rms_norm"
    if variant == "sd35m":
        config["dual_attention_layers"] = (0,)
    return config


def tiny_sd3_transformer(variant: Variant = "sd35m", seed: int = 0) -> SD3Transformer2DModel:
    """A tiny `SD3Transformer2DModel` with deterministic random weights, in eval mode."""
    return _randomized(SD3Transformer2DModel(**tiny_sd3_config(variant)), seed)


def _randomized(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter `0.05 * randn`, the qk-norm weights `1 + 0.1 * randn`; eval mode."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            is_qk_norm = any(f".{norm}." in name for norm in QK_NORMS)
            parameter.copy_(1.0 + 0.1 * noise if is_qk_norm else 0.05 * noise)
    return model.eval()


def tiny_sd3_inputs(batch: int, seed: int = 0, height: int = 16, width: int = 12, text_tokens: int = 10,
                    sigma: float = 0.7) -> dict[str, torch.Tensor]:
    """Keyword inputs of one transformer call: latent `[batch, 16, height, width]`, context, pooled, t = 1000 sigma."""
    generator = torch.Generator().manual_seed(seed)
    return {"hidden_states": torch.randn(batch, LATENT_CHANNELS, height, width, generator=generator),
            "encoder_hidden_states": torch.randn(batch, text_tokens, CONTEXT_WIDTH, generator=generator),
            "pooled_projections": torch.randn(batch, POOLED_WIDTH, generator=generator),
            "timestep": torch.full((batch,), 1000.0 * sigma)}


def tiny_flux_config(variant: FluxVariant = "dev") -> dict:
    """Flux-dev-like (guidance embedding) or Flux-schnell-like (none); `mlp_ratio` stays 4 as ComfyUI needs."""
    if variant not in FLUX_VARIANTS:
        raise ValueError(f"tiny Flux variant must be one of {FLUX_VARIANTS}, got {variant!r}")
    return dict(patch_size=1, in_channels=FLUX_PACKED_CHANNELS, out_channels=FLUX_PACKED_CHANNELS, num_layers=2,
                num_single_layers=2, attention_head_dim=32, num_attention_heads=2,
                joint_attention_dim=FLUX_CONTEXT_WIDTH, pooled_projection_dim=FLUX_POOLED_WIDTH,
                guidance_embeds=variant == "dev", axes_dims_rope=(8, 12, 12))


def tiny_flux_transformer(variant: FluxVariant = "dev", seed: int = 0, double: int = 2,
                          single: int = 2) -> FluxTransformer2DModel:
    """A tiny `FluxTransformer2DModel` with `double` and `single` blocks and deterministic random weights, in eval
    mode."""
    config = {**tiny_flux_config(variant), "num_layers": double, "num_single_layers": single}
    return _randomized(FluxTransformer2DModel(**config), seed)


def flux_image_ids(rows: int, columns: int) -> torch.Tensor:
    """Position ids `(0, row, column)` of a `rows` x `columns` token grid, row-major, as the pipeline makes them."""
    grid = torch.cartesian_prod(torch.arange(rows), torch.arange(columns)).float()
    return torch.cat([torch.zeros(rows * columns, 1), grid], dim=1)


def tiny_flux_inputs(batch: int, seed: int = 0, height: int = 16, width: int = 12, text_tokens: int = 7,
                     sigma: float = 0.7, variant: FluxVariant = "dev",
                     guidance: float = 3.5) -> dict[str, torch.Tensor]:
    """Keyword inputs of one Flux transformer call: a latent `[batch, 16, height, width]` packed 2x2 into
    tokens, context, pooled, timestep sigma, the ids, and guidance for "dev"."""
    generator = torch.Generator().manual_seed(seed)
    latent = torch.randn(batch, FLUX_PACKED_CHANNELS // 4, height, width, generator=generator)
    rows, columns = height // 2, width // 2
    packed = latent.view(batch, -1, rows, 2, columns, 2).permute(0, 2, 4, 1, 3, 5).reshape(batch, rows * columns, -1)
    inputs = {"hidden_states": packed,
              "encoder_hidden_states": torch.randn(batch, text_tokens, FLUX_CONTEXT_WIDTH, generator=generator),
              "pooled_projections": torch.randn(batch, FLUX_POOLED_WIDTH, generator=generator),
              "timestep": torch.full((batch,), sigma),
              "img_ids": flux_image_ids(rows, columns), "txt_ids": torch.zeros(text_tokens, 3)}
    if variant == "dev":
        inputs["guidance"] = torch.full((batch,), guidance)
    return inputs
