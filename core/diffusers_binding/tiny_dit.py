"""Tiny random SD3/SD3.5-shaped transformers for CPU tests (dit.md §5.1).

The real `SD3Transformer2DModel` class with two joint blocks, two heads of 64 and a 16x16 position
table (about 1.2 M parameters). Weights are deterministic random numbers that make every path active:
every parameter `0.05 * randn`, the qk-norm weights `1 + 0.1 * randn`. Their outputs are noise.
"""

from __future__ import annotations

from typing import Literal

import torch
from diffusers import SD3Transformer2DModel

Variant = Literal["sd35m", "sd35l", "sd3m"]
VARIANTS: tuple[str, ...] = ("sd35m", "sd35l", "sd3m")

LATENT_CHANNELS = 16
CONTEXT_WIDTH = 64
POOLED_WIDTH = 32


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
    model = SD3Transformer2DModel(**tiny_sd3_config(variant))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            is_qk_norm = any(f".{norm}." in name for norm in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"))
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
