"""StyleAligned (Hertz et al. 2023): shared self-attention, AdaIN on q/k/v, shared GroupNorm.

Tensors are laid out as the hosts hand them to an attention replacement: `(batch, tokens,
heads * head_dim)`. AdaIN statistics are per channel over tokens, so this flat layout gives the
same numbers as the original's `(batch, heads, tokens, head_dim)`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch.utils.hooks import RemovableHandle

from .attention import Attention, sdpa_attention
from .chunks import ChunkLayout

ADAIN_EPS = 1e-5


@dataclass(frozen=True)
class StyleAlignedArgs:
    """Every field of the original `StyleAlignedArgs`, with its defaults.

    The original writes `share_layer_norm: bool = True,` whose trailing comma makes the default the
    tuple `(True,)`; either way sharing a LayerNorm is a no-op (it normalises over channels and the
    original concatenates along tokens), so the field is accepted and has no effect here.
    """

    share_group_norm: bool = True
    share_layer_norm: bool = True
    share_attention: bool = True
    adain_queries: bool = True
    adain_keys: bool = True
    adain_values: bool = False
    full_attention_share: bool = False
    shared_score_scale: float = 1.0
    shared_score_shift: float = 0.0
    only_self_level: float = 0.0

    @property
    def adain(self) -> AdaINSettings | None:
        # The original's full-share path runs the default processor, without AdaIN.
        settings = AdaINSettings(self.adain_queries, self.adain_keys, self.adain_values)
        return None if self.full_attention_share or not settings.any else settings

    @property
    def share(self) -> ShareSettings | None:
        if self.full_attention_share:
            return ShareSettings(full_attention=True)
        if not self.share_attention:
            return None
        return ShareSettings(self.shared_score_scale, self.shared_score_shift)


@dataclass(frozen=True)
class AdaINSettings:
    queries: bool = True
    keys: bool = True
    values: bool = False
    strength: float = 1.0  # 1 is the paper's AdaIN; lower values move only part of the way

    @property
    def any(self) -> bool:
        return self.queries or self.keys or self.values


@dataclass(frozen=True)
class ShareSettings:
    score_scale: float = 1.0
    score_shift: float = 0.0
    full_attention: bool = False


def allowed_adain(settings: AdaINSettings | None, allowed: frozenset[str], graded_values: bool = False) -> AdaINSettings | None:
    """AdaIN narrowed to the projections a layer selection allows here (Conditional Balance's q/k/v choice).

    With a grading that holds v, AdaIN on v follows it whatever `settings.values` says: the original
    turns it on wherever the v grading picks a layer (`adain_handler_balanced.py:318-335`).
    """
    if settings is None:
        return None
    narrowed = replace(settings, queries=settings.queries and "q" in allowed, keys=settings.keys and "k" in allowed,
                       values=(settings.values or graded_values) and "v" in allowed)
    return narrowed if narrowed.any else None


def allowed_share(settings: ShareSettings | None, allowed: frozenset[str]) -> ShareSettings | None:
    """Sharing where the selection allows it (the original shares where q or k is chosen)."""
    return settings if settings is not None and "share" in allowed else None


def token_mean_std(x: torch.Tensor, eps: float = ADAIN_EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std over tokens (dim -2) per channel; unbiased variance plus eps, as the original."""
    # Two plain passes: torch's var/var_mean over a non-last dim runs several times slower on CPU.
    # A mean, not a sum, of squares: a half-precision sum over 4096 tokens can overflow.
    tokens = x.shape[-2]
    mean = x.mean(dim=-2, keepdim=True)
    var = (x - mean).square().mean(dim=-2, keepdim=True) * (tokens / (tokens - 1))
    return mean, (var + eps).sqrt()


def adain(x: torch.Tensor, reference_of_row: torch.Tensor) -> torch.Tensor:
    """Give every row the token statistics of its reference row (a reference maps onto itself)."""
    mean, std = token_mean_std(x)
    return (x - mean) / std * std[reference_of_row] + mean[reference_of_row]


def adain_targets(x: torch.Tensor, layout: ChunkLayout, strength: float = 1.0) -> torch.Tensor:
    """`adain` on the target rows, in one fused pass `x * scale + shift`; reference rows come back exact.

    `strength` interpolates between a row (0) and its AdaIN toward the reference (1).
    """
    mean, std = token_mean_std(x)
    refs = layout.reference_of_row(x.device)
    scale = std[refs] / std
    shift = mean[refs] - mean * scale
    scale[layout.reference_rows] = 1.0  # x * 1 + 0 is x bit for bit
    shift[layout.reference_rows] = 0.0
    if strength != 1.0:
        scale = torch.lerp(torch.ones_like(scale), scale, strength)
        shift = shift * strength
    return torch.addcmul(shift, x, scale)


def reference_bias(tokens: int, reference_tokens: int, score_shift: float, device: torch.device) -> torch.Tensor:
    """Additive logits bias: 0 on a row's own keys, `score_shift` on the appended reference keys."""
    bias = torch.zeros(1, 1, 1, tokens + reference_tokens, device=device)
    bias[..., tokens:] = score_shift
    return bias


def shared_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, layout: ChunkLayout,
                     share: ShareSettings) -> torch.Tensor:
    """Self-attention where each target row also attends to its reference's keys and values.

    A reference attending to its own keys twice equals attending once (and neither the scale nor
    the shift changes it), so only target rows pay for the extra keys: the FLOP floor. Rows stay
    views of `(chunks, rows, tokens, heads, head_dim)`; only the extended keys/values are copied.
    """
    if share.full_attention:
        return full_shared_attention(q, k, v, heads, layout)
    if not layout.target_rows:
        return sdpa_attention(q, k, v, heads)
    chunks, rows, ref = layout.chunks, layout.rows_per_chunk, layout.reference_index
    tokens, width = q.shape[1], q.shape[2]
    # (chunks, rows, heads, tokens, head_dim) views: a chunk's targets are a slice, no gather needed.
    split = lambda t: t.reshape(chunks, rows, tokens, heads, width // heads).transpose(2, 3)  # noqa: E731
    q5, k5, v5 = split(q), split(k), split(v)
    others = lambda t: t[:, 1:] if ref == 0 else torch.cat([t[:, :ref], t[:, ref + 1:]], dim=1)  # noqa: E731
    ref_k, ref_v = k5[:, ref:ref + 1].expand(-1, rows - 1, -1, -1, -1), v5[:, ref:ref + 1].expand(-1, rows - 1, -1, -1, -1)
    if share.score_scale != 1.0:
        ref_k = ref_k * share.score_scale
    keys = torch.cat([others(k5), ref_k], dim=-2)
    values = torch.cat([others(v5), ref_v], dim=-2)
    bias = reference_bias(tokens, tokens, share.score_shift, q.device).to(q.dtype) if share.score_shift else None
    # CPU's fused SDPA kernel wants 4-D (batch, heads, tokens, head_dim) inputs.
    flat = lambda t: t.reshape(-1, heads, t.shape[-2], width // heads)  # noqa: E731
    out = torch.empty(chunks, rows, tokens, heads, width // heads, dtype=q.dtype, device=q.device)
    out.transpose(2, 3)[:, ref] = F.scaled_dot_product_attention(q5[:, ref], k5[:, ref], v5[:, ref])
    targets = F.scaled_dot_product_attention(flat(others(q5)), flat(keys), flat(values), attn_mask=bias)
    targets = targets.view(chunks, rows - 1, heads, tokens, width // heads)
    if ref == 0:
        out.transpose(2, 3)[:, 1:] = targets
    else:
        out.transpose(2, 3)[:, :ref] = targets[:, :ref]
        out.transpose(2, 3)[:, ref + 1:] = targets[:, ref:]
    return out.view(q.shape)


def shared_attention_full_batch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, layout: ChunkLayout,
                                share: ShareSettings, attention: Attention = sdpa_attention) -> torch.Tensor:
    """The original's formulation: every row, reference included, gets `2N` keys.

    Used when attention is delegated to another pack's replacement, which expects the whole batch.
    """
    if share.full_attention:
        return full_shared_attention(q, k, v, heads, layout, attention)
    reference_of_row = layout.reference_of_row(q.device)
    ref_k = k[reference_of_row]
    if share.score_scale != 1.0:
        # The original leaves the reference's own appended copy unscaled.
        scale = torch.full((q.shape[0], 1, 1), share.score_scale, device=q.device, dtype=k.dtype)
        scale[layout.reference_rows] = 1.0
        ref_k = ref_k * scale
    keys = torch.cat([k, ref_k], dim=1)
    values = torch.cat([v, v[reference_of_row]], dim=1)
    bias = reference_bias(k.shape[1], k.shape[1], share.score_shift, q.device) if share.score_shift else None
    return attention(q, keys, values, heads, bias)


def full_shared_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, layout: ChunkLayout,
                          attention: Attention = sdpa_attention) -> torch.Tensor:
    """`full_attention_share`: all images of a chunk attend jointly, as one long sequence."""
    tokens = q.shape[1]
    joined = lambda t: t.reshape(layout.chunks, layout.rows_per_chunk * tokens, t.shape[-1])  # noqa: E731
    out = attention(joined(q), joined(k), joined(v), heads, None)
    return out.reshape(q.shape[0], tokens, -1)


def style_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, layout: ChunkLayout,
                    adain_settings: AdaINSettings | None, share: ShareSettings | None,
                    attention: Attention = sdpa_attention, full_batch: bool = False) -> torch.Tensor:
    """One StyleAligned self-attention layer on projected q, k, v (`SharedAttentionProcessor`)."""
    if adain_settings is not None and layout.target_rows:
        strength = adain_settings.strength
        if adain_settings.queries:
            q = adain_targets(q, layout, strength)
        if adain_settings.keys:
            k = adain_targets(k, layout, strength)
        if adain_settings.values:
            v = adain_targets(v, layout, strength)
    if share is None:
        return attention(q, k, v, heads, None)
    if full_batch:
        return shared_attention_full_batch(q, k, v, heads, layout, share, attention)
    return shared_attention(q, k, v, heads, layout, share)


def joint_group_norm(x: torch.Tensor, reference_of_row: torch.Tensor, norm: torch.nn.GroupNorm) -> torch.Tensor:
    """StyleAligned's shared GroupNorm (`register_shared_norm`: each image normalised stacked with its
    reference along H), from statistics alone: no stacked copy of the features.

    Stacking two equal-sized maps gives the group mean (m_i + m_r)/2 and the (biased, as GroupNorm)
    variance (v_i + v_r)/2 + ((m_i - m_r)/2)^2, so the joint normalisation needs only each row's stats.
    """
    batch, channels = x.shape[:2]
    groups, per_channel = norm.num_groups, channels // norm.num_groups
    # Statistics in at least float32, as torch's GroupNorm keeps them for half-precision inputs.
    features = x.to(torch.promote_types(x.dtype, torch.float32))
    # The GroupNorm kernel: each row's own normalisation and statistics in one pass, several times faster than var_mean.
    normalized, mean, rstd = torch.native_group_norm(features, None, None, batch, channels, math.prod(x.shape[2:]),
                                                     groups, norm.eps)
    own_var_eps = rstd.pow(-2)  # var + eps
    half_mean_gap = (mean - mean[reference_of_row]) / 2  # also mean - joint mean
    joint_var_eps = torch.addcmul((own_var_eps + own_var_eps[reference_of_row]) / 2, half_mean_gap, half_mean_gap)
    joint_rstd = joint_var_eps.rsqrt()
    per_row_channel = (batch, channels) + (1,) * (x.ndim - 2)
    if not (torch.is_grad_enabled() and x.requires_grad):
        # The row's own normalisation moved to the joint statistics, affine included, in place on the tensor
        # GroupNorm allocated anyway: (x - m_joint)·r_joint = x̂·(r_joint / r) + (m - m_joint)·r_joint.
        scale, shift = (own_var_eps / joint_var_eps).sqrt(), half_mean_gap * joint_rstd
        scale, shift = _per_channel_affine(scale, shift, norm, per_channel)
        return normalized.mul_(scale.view(per_row_channel)).add_(shift.view(per_row_channel)).to(x.dtype)
    # With a gradient (Spatial Guidance's backward pass) the features themselves are scaled, so the statistics'
    # gradients flow through mean and rstd (the normalised output is not on this graph).
    scale, shift = _per_channel_affine(joint_rstd, (half_mean_gap - mean) * joint_rstd, norm, per_channel)
    return torch.addcmul(shift.view(per_row_channel), features, scale.view(per_row_channel)).to(x.dtype)


def _per_channel_affine(scale: torch.Tensor, shift: torch.Tensor, norm: torch.nn.GroupNorm,
                        per_channel: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-(row, group) `x * scale + shift` composed with the norm's affine: per-(row, channel) scale and shift."""
    batch, groups = scale.shape
    if norm.weight is None:
        return (t.unsqueeze(-1).expand(batch, groups, per_channel).reshape(batch, -1) for t in (scale, shift))
    weight = norm.weight.to(scale).view(groups, per_channel)
    bias = norm.bias.to(scale).view(groups, per_channel)
    return ((scale.unsqueeze(-1) * weight).view(batch, -1),
            torch.addcmul(bias, shift.unsqueeze(-1), weight).view(batch, -1))


def attach_shared_norm(norms: Iterable[torch.nn.GroupNorm],
                       reference_of_row: Callable[[int, torch.device], torch.Tensor | None]) -> list[RemovableHandle]:
    """Make each GroupNorm in `norms` share statistics with the reference (`joint_group_norm`) through hooks.

    `reference_of_row(batch, device)` gives the reference row of every row for the batch at hand, on its
    device, or None to leave that call plain. The pre-hook hands the module an empty batch, so its own normalisation
    costs nothing, and the forward hook returns the joint one: shared GroupNorm costs what GroupNorm
    costs. Hooks replace no module and no `forward`; removing the returned handles restores the
    modules exactly.
    """
    held: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # module id -> (input, reference rows) of the call in flight

    def skip_own(module: torch.nn.GroupNorm, args: tuple) -> tuple | None:
        refs = reference_of_row(args[0].shape[0], args[0].device)
        if refs is None:
            return None
        held[id(module)] = (args[0], refs)
        return (args[0][:0], *args[1:])

    def share_statistics(module: torch.nn.GroupNorm, args: tuple, out: torch.Tensor) -> torch.Tensor | None:
        call = held.pop(id(module), None)
        if call is None:
            return None
        x, refs = call
        return joint_group_norm(x, refs, module)

    return [handle for norm in norms
            for handle in (norm.register_forward_pre_hook(skip_own), norm.register_forward_hook(share_statistics))]


def zero_reference_control(control: dict[str, list[torch.Tensor | None]], layout: ChunkLayout) -> dict[str, list[torch.Tensor | None]]:
    """Control residuals with the reference rows zeroed (StyleAligned's `concat_zero_control`).

    Returns new lists and tensors: the host's own residuals are never written to.
    """
    keep = torch.ones(layout.batch)
    keep[layout.reference_rows] = 0.0
    zeroed: dict[str, list[torch.Tensor | None]] = {}
    for name, residuals in control.items():
        if not isinstance(residuals, list):
            zeroed[name] = residuals
            continue
        zeroed[name] = [r if r is None or r.shape[0] != layout.batch
                        else r * keep.to(r.device, r.dtype).view(-1, *([1] * (r.ndim - 1)))
                        for r in residuals]
    return zeroed


def release_control_geometry(control: dict[str, list[torch.Tensor | None]], timestep: float,
                             lambda_t: float) -> dict[str, list[torch.Tensor | None]]:
    """Conditional Balance's lambda_t: below t = lambda_t * 1000 a ControlNet's down-block residuals
    (ComfyUI's `output` list) are dropped and its mid-block residual kept, freeing the geometry late."""
    if lambda_t <= 0 or timestep >= lambda_t * 1000 or not control.get("output"):
        return control
    return {**control, "output": [None] * len(control["output"])}
