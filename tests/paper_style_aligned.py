"""StyleAligned as the paper formulates it, re-stated on diffusers for tests and benchmarks.

From the description in reference/methods.md §1 (not the original code): AdaIN over all rows,
keys/values concatenated with each CFG half's first row, explicit logits when a shift is set,
the layer choice by `_get_switch_vec`, and GroupNorm forwards replaced on a deep copy of the UNet.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from multicond.core.style import StyleAlignedArgs

def paper_reference_copy(feat: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Each CFG half's first row broadcast over that half; with `scale`, every copy but the one in
    the reference's own row is scaled (the paper's `expand_first`)."""
    batch = feat.shape[0]
    half = batch // 2
    copies = feat[torch.arange(batch) // half * half]
    if scale != 1:
        factor = torch.where(torch.arange(batch) % half == 0, 1.0, scale).to(feat.dtype)
        copies = copies * factor.view(-1, *[1] * (feat.ndim - 1))
    return copies


def paper_adain(feat: torch.Tensor) -> torch.Tensor:
    """(b, heads, tokens, d): every row, the reference included, takes its half's first-row statistics."""
    mean = feat.mean(dim=-2, keepdim=True)
    std = (feat.var(dim=-2, keepdim=True) + 1e-5).sqrt()
    return (feat - mean) / std * paper_reference_copy(std) + paper_reference_copy(mean)


class PaperSharedProcessor:
    def __init__(self, args: StyleAlignedArgs) -> None:
        self.args = args
        self.plain = AttnProcessor2_0()

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, **kwargs: object) -> torch.Tensor:
        if self.args.full_attention_share:
            batch, tokens, width = hidden_states.shape  # both halves' images joined into one sequence each
            return self.plain(attn, hidden_states.reshape(2, batch // 2 * tokens, width)).reshape(batch, tokens, width)
        a = self.args
        residual = hidden_states
        batch = hidden_states.shape[0]
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        head_dim = query.shape[-1] // attn.heads
        query, key, value = (t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
        query = paper_adain(query) if a.adain_queries else query
        key = paper_adain(key) if a.adain_keys else key
        value = paper_adain(value) if a.adain_values else value
        if a.share_attention:
            key = torch.cat([key, paper_reference_copy(key, a.shared_score_scale)], dim=-2)
            value = torch.cat([value, paper_reference_copy(value)], dim=-2)
        if a.share_attention and a.shared_score_shift != 0:
            logits = query @ key.transpose(-1, -2) * attn.scale
            logits[..., query.shape[-2]:] += a.shared_score_shift
            out = logits.softmax(dim=-1) @ value
        else:
            out = F.scaled_dot_product_attention(query, key, value)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def paper_switch_vector(total: int, level: float) -> torch.Tensor:
    """True: the layer keeps the default processor. Evenly spaced, with an integer stride."""
    if level in (0, 1):
        return torch.full((total,), bool(level))
    flip = level > 0.5
    count = int((1 - level if flip else level) * total)
    vector = torch.arange(total) % (total // count) == 0
    return ~vector if flip else vector


def paper_shared_names(unet: UNet2DConditionModel, level: float) -> list[str]:
    """attn1 processors alternate with attn2 in `attn_processors`, so processor i is self layer i // 2."""
    names = list(unet.attn_processors)
    unshared = paper_switch_vector(sum("attn1" in n for n in names), level)
    return [n.removesuffix(".processor") for i, n in enumerate(names) if "attn1" in n and not unshared[i // 2]]


def paper_unet(unet: UNet2DConditionModel, args: StyleAlignedArgs) -> UNet2DConditionModel:
    paper = copy.deepcopy(unet)
    shared = set(paper_shared_names(paper, args.only_self_level))
    paper.set_attn_processor({name: PaperSharedProcessor(args) if name.removesuffix(".processor") in shared
                              else AttnProcessor2_0() for name in paper.attn_processors})
    if args.share_group_norm:
        for module in paper.modules():
            if isinstance(module, torch.nn.GroupNorm):
                module.forward = _paper_shared_group_norm(module.forward)
    return paper


def _paper_shared_group_norm(plain):  # noqa: ANN001, ANN202
    def forward(hidden: torch.Tensor) -> torch.Tensor:
        height = hidden.shape[-2]
        return plain(torch.cat([hidden, paper_reference_copy(hidden)], dim=-2))[..., :height, :]

    return forward
