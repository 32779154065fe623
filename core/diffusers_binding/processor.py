"""The diffusers `Attention` bookkeeping every processor of the pack shares, around its own attention.

A processor flattens the image tokens and normalises as `AttnProcessor2_0` does (`attention_inputs`),
projects q, k, v with the layer's own weights (`projections`), runs its method's attention on the
flat `(batch, tokens, heads * head_dim)` tensors, and hands the result back through `to_out`,
the residual and the rescale (`attention_output`). `TokenGrid` and `cross_attention_layers` give a
cross-attention layer its own height and width.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from diffusers import Transformer2DModel, UNet2DConditionModel
from diffusers.models.attention_processor import Attention

Size = tuple[int, int]


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    batch, tokens, width = x.shape
    return x.view(batch, tokens, heads, width // heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    batch, heads, tokens, head_dim = x.shape
    return x.transpose(1, 2).reshape(batch, tokens, heads * head_dim)


def attention_inputs(attn: Any, hidden_states: torch.Tensor, context: torch.Tensor | None = None,
                     temb: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Size | None]:
    """Image tokens `(B, N, C)`, the keys' source (the context, or the tokens themselves) and the 4-D shape to restore."""
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    shape = None
    if hidden_states.ndim == 4:
        shape = hidden_states.shape
        hidden_states = hidden_states.view(*shape[:2], -1).transpose(1, 2)
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    if context is None:
        context = hidden_states
    elif attn.norm_cross:
        context = attn.norm_encoder_hidden_states(context)
    return hidden_states, context, shape


def projections(attn: Any, hidden_states: torch.Tensor, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    query, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
    if attn.norm_q is not None:
        query = merge_heads(attn.norm_q(split_heads(query, attn.heads)))
    if attn.norm_k is not None:
        key = merge_heads(attn.norm_k(split_heads(key, attn.heads)))
    return query, key, value


def attention_output(attn: Any, out: torch.Tensor, residual: torch.Tensor, shape: torch.Size | None,
                     dtype: torch.dtype) -> torch.Tensor:
    """`to_out`, back to the input's layout, the residual and the rescale, as `AttnProcessor2_0`."""
    out = attn.to_out[1](attn.to_out[0](out.to(dtype)))
    if shape is not None:
        out = out.transpose(-1, -2).reshape(shape)
    if attn.residual_connection:
        out = out + residual
    return out / attn.rescale_output_factor


def call_argument(args: tuple, kwargs: dict, index: int, name: str) -> Any:
    """A hooked call's argument, given by keyword or at `index`, else None."""
    if name in kwargs:
        return kwargs[name]
    return args[index] if len(args) > index else None


@dataclass
class TokenGrid:
    """The `(height, width)` of one Transformer2DModel's input, written by its forward pre-hook."""

    size: Size | None = None

    def hook(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = call_argument(args, kwargs, 0, "hidden_states")
        if hidden.ndim != 4:
            raise ValueError("a UNet transformer's input should be (batch, channels, height, width), "
                             f"got {tuple(hidden.shape)}")
        self.size = tuple(hidden.shape[-2:])


def cross_attention_layers(unet: UNet2DConditionModel) -> dict[str, Transformer2DModel]:
    """Every cross-attention (attn2) module path, with the Transformer2DModel it sits in."""
    found: dict[str, Transformer2DModel] = {}
    for name, module in unet.named_modules():
        if isinstance(module, Transformer2DModel):
            for path, sub in module.named_modules(prefix=name):
                if path.endswith(".attn2") and isinstance(sub, Attention):
                    found[path] = module
    return found
