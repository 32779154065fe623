"""Multi-head attention on the flat layout the hosts hand to an attention replacement.

Tensors are `(batch, tokens, heads * head_dim)`. `Attention` is the one small protocol the
methods take, so a host can pass its own kernel or a patch another pack installed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int, "torch.Tensor | None"], torch.Tensor]


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    """Multi-head attention on `(B, N, h*d)` tensors; `bias` is added to the logits."""
    batch, _, width = q.shape
    head_dim = width // heads
    split = lambda t: t.view(batch, -1, heads, head_dim).transpose(1, 2)  # noqa: E731
    if bias is not None:
        bias = bias.to(q.dtype)
    out = F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=bias)
    return out.transpose(1, 2).reshape(batch, -1, width)
