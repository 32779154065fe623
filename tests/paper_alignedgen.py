"""AlignedGen's shared-attention processor for Flux re-stated as a diffusers processor, for tests.

From the description in reference/dit.md §4.1.4 (not the original code): installed on every Flux
attention, active on the processors whose index (double blocks first, then single) is in `active`;
image q/k after qk-norm get AdaIN toward row 0 of the whole batch **before** RoPE (statistics per
head and channel over the image tokens; StyleAligned's estimator, unbiased variance plus eps 1e-5);
RoPE on the joint q/k; row 0's (AdaIN'd) image keys re-rotated with the image ids shifted right by
the grid's width, scaled by lambda for rows >= 1, and row 0's image values, appended to every row;
an additive -inf mask keeps row 0 off the appended keys (`constrain_first`). Single blocks split text
and image with `txt_length`, which the test sets, as AlignedGen's pipeline does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor


def statistics_adain(x: torch.Tensor, image: slice) -> torch.Tensor:
    """(B, H, L, D): the image tokens of every row take row 0's per-channel token statistics."""
    part = x[:, :, image]
    mean = part.mean(dim=-2, keepdim=True)
    std = (part.var(dim=-2, keepdim=True) + 1e-5).sqrt()
    styled = (part - mean) / std * std[:1] + mean[:1]
    return torch.cat([x[:, :, :image.start], styled, x[:, :, image.stop:]], dim=2)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """(B, H, L, D) rotated pairwise: channels (2i, 2i+1) by the angle whose cos/sin are repeated per pair."""
    pairs = x.unflatten(-1, (-1, 2))
    turned = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
    return x * cos + turned * sin


@dataclass
class PaperAlignedGenProcessor:
    index: int
    active: range
    shifted_rotary: tuple[torch.Tensor, torch.Tensor]  # pos_embed of the image ids moved right by the grid width
    txt_length: int
    style_lambda: float = 1.1
    constrain_first: bool = True

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        if self.index not in self.active:
            return FluxAttnProcessor()(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        heads = attn.heads
        split = lambda t: t.view(t.shape[0], -1, heads, t.shape[-1] // heads).transpose(1, 2)  # noqa: E731
        query, key, value = (split(f(hidden_states)) for f in (attn.to_q, attn.to_k, attn.to_v))
        query, key = attn.norm_q(query), attn.norm_k(key)
        if encoder_hidden_states is not None:
            text = [split(f(encoder_hidden_states)) for f in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)]
            query = torch.cat([attn.norm_added_q(text[0]), query], dim=2)
            key = torch.cat([attn.norm_added_k(text[1]), key], dim=2)
            value = torch.cat([text[2], value], dim=2)
        txt = encoder_hidden_states.shape[1] if encoder_hidden_states is not None else self.txt_length
        image = slice(txt, query.shape[2])
        query, key = statistics_adain(query, image), statistics_adain(key, image)
        cos, sin = image_rotary_emb
        shared_key = rope(key[:1, :, image], *self.shifted_rotary)
        query, key = rope(query, cos, sin), rope(key, cos, sin)
        batch = query.shape[0]
        factor = torch.tensor([1.0] + [self.style_lambda] * (batch - 1)).view(-1, 1, 1, 1)
        key = torch.cat([key, shared_key.expand(batch, -1, -1, -1) * factor], dim=2)
        value = torch.cat([value, value[:1, :, image].expand(batch, -1, -1, -1)], dim=2)
        mask = torch.zeros(batch, 1, 1, key.shape[2])
        if self.constrain_first:
            mask[0, :, :, query.shape[2]:] = float("-inf")
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask)
        out = out.transpose(1, 2).flatten(2)
        if encoder_hidden_states is None:
            return out
        return attn.to_out[1](attn.to_out[0](out[:, txt:])), attn.to_add_out(out[:, :txt])
