"""Multi-head attention on the flat layout the hosts hand to an attention replacement.

Tensors are `(batch, tokens, heads * head_dim)`. `Attention` is the one small protocol the
methods take, so a host can pass its own kernel or a patch another pack installed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int, "torch.Tensor | None"], torch.Tensor]


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """`(B, N, h*d)` as a `(B, h, N, d)` view, whatever `x`'s strides (a row slice stays a view)."""
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)


def attend_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
    """Multi-head attention of `(B, N, h*d)` tensors, left as `(B, h, N, d)` so a caller can write it into place."""
    bias = None if bias is None else bias.to(q.dtype)
    return F.scaled_dot_product_attention(split_heads(q, heads), split_heads(k, heads), split_heads(v, heads),
                                          attn_mask=bias)


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    """Multi-head attention on `(B, N, h*d)` tensors; `bias` is added to the logits."""
    return attend_heads(q, k, v, heads, bias).transpose(1, 2).flatten(2)
