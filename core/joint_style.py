"""StyleAligned on joint (image + text) attention: SD3/SD3.5 MMDiT and Flux.

The faithful translation of the UNet method (dit.md §4.1.2): everything is restricted to the image
tokens of the joint sequence. Each target's image q/k (and optionally v) get AdaIN toward its
reference's image-token statistics; every row's keys/values are extended by its reference's image
K/V (after AdaIN); text tokens are neither AdaIN'd nor shared, and text queries see the extra image
keys too (as CB35 and AlignedGen). Score scale/shift act on the appended keys only.

Tensors are the flat `(batch, tokens, heads * head_dim)` layout the rest of core uses, for the whole
joint sequence; `image = (start, stop)` says where the image tokens are, so one implementation
serves every host's token order (`DiTLayout.image_span`). For Flux the caller decides whether q/k
are pre- or post-RoPE; the math is the same.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .attention import sdpa_attention
from .chunks import ChunkLayout
from .style import AdaINSettings, ShareSettings, adain_targets, reference_bias

ImageSpan = tuple[int, int]


@dataclass(frozen=True)
class JointStyle:
    """One joint layer's StyleAligned settings; `isolate_reference` keeps the reference rows unpatched."""

    adain: AdaINSettings | None = AdaINSettings()
    share: ShareSettings | None = ShareSettings()
    isolate_reference: bool = True


def adain_image_tokens(x: torch.Tensor, image: ImageSpan, layout: ChunkLayout, strength: float = 1.0) -> torch.Tensor:
    """AdaIN of every target row's image tokens toward its reference's image-token statistics.

    Statistics are per channel over the image tokens only; text tokens and reference rows come back exact.
    `token_mean_std` is CB35's estimator too: unbiased variance plus eps 1e-5
    (CB35 `handlers/adain_handler_balanced.py:62-78`).
    """
    start, stop = image
    styled = adain_targets(x[:, start:stop], layout, strength)
    return torch.cat([x[:, :start], styled, x[:, stop:]], dim=1)


def joint_adain(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, image: ImageSpan, layout: ChunkLayout,
                settings: AdaINSettings | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`adain_image_tokens` on the projections `settings` names; the others are returned as given."""
    if settings is None or not layout.target_rows:
        return q, k, v
    styled = lambda x, on: adain_image_tokens(x, image, layout, settings.strength) if on else x  # noqa: E731
    return styled(q, settings.queries), styled(k, settings.keys), styled(v, settings.values)


def shared_joint_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, image: ImageSpan,
                           layout: ChunkLayout, share: ShareSettings, isolate_reference: bool = True,
                           reference_keys: torch.Tensor | None = None) -> torch.Tensor:
    """Joint attention where each row also attends to its reference's image keys/values.

    Each extended row gets its own `tokens + image_tokens` keys: memory grows by the appended reference
    K/V only, never by batch x batch. With `isolate_reference` the reference rows run plain attention
    (AlignedGen's `constrain_first`), so a reference renders exactly as it would alone; without it they
    also attend to their own image keys a second time (CB35, the UNet original), which in joint attention
    lowers the weight of their text keys (dit.md §4.1.2).

    `reference_keys` `(chunks, image_tokens, heads*head_dim)`, when given, are each chunk's reference image
    keys for the appended copies instead of `k`'s: Flux re-rotates them at shifted positions (AlignedGen,
    dit.md §4.1.4) while a row's own keys keep theirs; only the references' rows are ever needed.
    """
    if share.full_attention:
        raise ValueError("full_attention_share has no joint-attention form; share the reference's keys instead")
    start, stop = image
    tokens, image_tokens = q.shape[1], stop - start
    expected = (layout.chunks, image_tokens, k.shape[-1])
    if reference_keys is not None and tuple(reference_keys.shape) != expected:
        raise ValueError(f"reference_keys must be (chunks, image tokens, width) = {expected}, "
                         f"got {tuple(reference_keys.shape)}")
    extended = layout.target_rows if isolate_reference else list(range(layout.batch))
    if not extended:
        return sdpa_attention(q, k, v, heads)
    out = torch.empty_like(q)
    if isolate_reference:
        plain = layout.reference_rows
        out[plain] = sdpa_attention(q[plain], k[plain], v[plain], heads)
    rows = torch.tensor(extended, device=q.device)
    refs = layout.reference_of_row(q.device)[rows]
    ref_k = k[refs, start:stop] if reference_keys is None else reference_keys[refs // layout.rows_per_chunk]
    ref_v = v[refs, start:stop]
    if share.score_scale != 1.0:
        # The original scales every appended copy but a reference's own (`expand_first`; CB35 likewise).
        scale = torch.where(refs == rows, 1.0, share.score_scale).to(k.dtype).view(-1, 1, 1)
        ref_k = ref_k * scale
    keys = torch.cat([k[rows], ref_k], dim=1)
    values = torch.cat([v[rows], ref_v], dim=1)
    bias = reference_bias(tokens, image_tokens, share.score_shift, q.device) if share.score_shift else None
    out[rows] = sdpa_attention(q[rows], keys, values, heads, bias)
    return out


def joint_style_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, image: ImageSpan,
                          layout: ChunkLayout, adain: AdaINSettings | None, share: ShareSettings | None,
                          isolate_reference: bool = True) -> torch.Tensor:
    """One StyleAligned joint-attention layer on projected (post-qk-norm) q, k, v of the whole sequence.

    With neither AdaIN nor sharing this is plain attention, the very same call.
    """
    if adain is None and share is None:
        return sdpa_attention(q, k, v, heads)
    q, k, v = joint_adain(q, k, v, image, layout, adain)
    if share is None:
        return sdpa_attention(q, k, v, heads)
    return shared_joint_attention(q, k, v, heads, image, layout, share, isolate_reference)


def shares_on_joint_layer(allowed: frozenset[str]) -> bool:
    """CB35's rule on a graded DiT layer: share only where the layer is in both the q and the k set.

    CB35 overwrites `share_attention` with `adain_keys and adain_queries` in its processor
    (`handlers/adain_handler_balanced.py` `shared_call`); the UNet version shares on q or k
    (`core.balance.shared_at`).
    """
    return "share" in allowed and {"q", "k"} <= allowed


def joint_features(allowed: frozenset[str]) -> frozenset[str]:
    """A layer selection's features narrowed to the DiT sharing rule (`shares_on_joint_layer`)."""
    return allowed if shares_on_joint_layer(allowed) else allowed - {"share"}
