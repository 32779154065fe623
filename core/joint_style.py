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

from .attention import attend_heads, sdpa_attention, split_heads
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
    plain = _row_index(layout.reference_rows) if isolate_reference else None
    # The reference rows first, while k/v are whole; their outputs are small beside the extended keys/values.
    reference_out = attend_heads(q[plain], k[plain], v[plain], heads) if plain is not None else None
    rows = torch.tensor(extended, device=q.device)
    refs = layout.reference_of_row(q.device)[rows]
    chunk_of_row = refs // layout.rows_per_chunk
    references = _row_index(layout.reference_rows)
    ref_k = _per_row(k[references, start:stop] if reference_keys is None else reference_keys, chunk_of_row)
    ref_v = _per_row(v[references, start:stop], chunk_of_row)
    scale = None
    if share.score_scale != 1.0:
        # The original scales every appended copy but a reference's own (`expand_first`; CB35 likewise).
        scale = torch.where(refs == rows, 1.0, share.score_scale).to(k.dtype).view(-1, 1, 1)
    bias = reference_bias(tokens, image_tokens, share.score_shift, q.device) if share.score_shift else None
    index = _row_index(extended)
    keys = torch.cat([k[index], ref_k], dim=1)
    # a caller's temporary keys may hold their last reference: freed before the values are built
    del k, ref_k, reference_keys
    if scale is not None:
        keys[:, tokens:] *= scale  # in place: no scaled copy of the appended keys beside them
    values = torch.cat([v[index], ref_v], dim=1)
    del v, ref_v  # likewise, freed before attending
    attended = attend_heads(q[index], keys, values, heads, bias)
    del keys, values  # freed before the output is allocated and written
    out = torch.empty_like(q)
    _put_rows(out, index, attended)
    if plain is not None:
        _put_rows(out, plain, reference_out)
    return out


RowIndex = slice | list[int]


def _row_index(rows: list[int]) -> RowIndex:
    """Consecutive rows as a slice (a view of the batch, no copy); any others as a list (a gather)."""
    if rows == list(range(rows[0], rows[0] + len(rows))):
        return slice(rows[0], rows[0] + len(rows))
    return rows


def _per_row(per_chunk: torch.Tensor, chunk_of_row: torch.Tensor) -> torch.Tensor:
    """Each row's entry of a `(chunks, ...)` tensor: a broadcast view with one chunk, else a gather."""
    if per_chunk.shape[0] == 1:
        return per_chunk.expand(len(chunk_of_row), *per_chunk.shape[1:])
    return per_chunk[chunk_of_row]


def _put_rows(out: torch.Tensor, rows: RowIndex, attended: torch.Tensor) -> None:
    """Write `(n, h, N, d)` attention outputs into `out`'s `rows` of `(B, N, h*d)`."""
    if isinstance(rows, slice):
        split_heads(out[rows], attended.shape[1]).copy_(attended)  # through the view: no flattened copy
    else:
        out[rows] = attended.transpose(1, 2).flatten(2)


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
