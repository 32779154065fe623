"""Conditional Balance on SD3.5 (CB35) re-stated as a diffusers processor, for tests.

From the description in reference/dit.md §4.1.3 (not the original code): on a batch of exactly four rows
[uncond reference, uncond target, cond reference, cond target], image q/k/v after qk-norm; AdaIN of rows
1 and 3 toward rows 0 and 2 over the image tokens (unbiased variance plus eps 1e-5, CB35
`handlers/adain_handler_balanced.py:62-78`); sharing only when both q and k get AdaIN; keys
[own image, reference image (scaled for the targets), own text], queries [own image, own text]; plain
attention; the text stream's output projection unless `context_pre_only`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention

REFERENCE_OF_ROW = (0, 0, 2, 2)  # CB35 hard-codes this four-row layout


def cb35_adain(feat: torch.Tensor) -> torch.Tensor:
    """(4, heads, tokens, d): rows 1 and 3 take the statistics of rows 0 and 2; rows 0 and 2 are kept."""
    mean = feat.mean(dim=-2, keepdim=True)
    std = (feat.var(dim=-2, keepdim=True) + 1e-5).sqrt()  # torch.var is unbiased by default
    out = feat.clone()
    for target, reference in ((1, 0), (3, 2)):
        out[target] = (feat[target] - mean[target]) / std[target] * std[reference] + mean[reference]
    return out


def cb35_reference_copy(feat: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Each row's reference row; the targets' copies multiplied by `scale`, the references' own not."""
    copies = feat[list(REFERENCE_OF_ROW)]
    factor = torch.tensor([1.0, scale, 1.0, scale], dtype=feat.dtype).view(-1, *[1] * (feat.ndim - 1))
    return copies * factor


@dataclass
class PaperCB35Processor:
    adain_queries: bool = True
    adain_keys: bool = True
    adain_values: bool = False
    score_scale: float = 1.0

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
        batch, image_tokens, _ = hidden_states.shape
        assert batch == 4, "CB35's AdaIN assumes [uncond ref, uncond target, cond ref, cond target]"
        split = lambda t: t.view(batch, -1, attn.heads, t.shape[-1] // attn.heads).transpose(1, 2)  # noqa: E731
        query, key, value = (split(project(hidden_states)) for project in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            query, key = attn.norm_q(query), attn.norm_k(key)
        share = self.adain_queries and self.adain_keys  # CB35: sharing needs both
        query = cb35_adain(query) if self.adain_queries else query
        key = cb35_adain(key) if self.adain_keys else key
        value = cb35_adain(value) if self.adain_values else value
        if share:
            key = torch.cat([key, cb35_reference_copy(key, self.score_scale)], dim=-2)
            value = torch.cat([value, cb35_reference_copy(value)], dim=-2)
        text_q = split(attn.add_q_proj(encoder_hidden_states))
        text_k = split(attn.add_k_proj(encoder_hidden_states))
        text_v = split(attn.add_v_proj(encoder_hidden_states))
        if attn.norm_added_q is not None:
            text_q, text_k = attn.norm_added_q(text_q), attn.norm_added_k(text_k)
        out = F.scaled_dot_product_attention(torch.cat([query, text_q], dim=2), torch.cat([key, text_k], dim=2),
                                             torch.cat([value, text_v], dim=2))
        out = out.transpose(1, 2).reshape(batch, -1, out.shape[1] * out.shape[-1])
        image, text = out[:, :image_tokens], out[:, image_tokens:]
        if not attn.context_pre_only:
            text = attn.to_add_out(text)
        return attn.to_out[1](attn.to_out[0](image)), text
