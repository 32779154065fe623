"""StyleAligned math in core: exact properties and the original's formulation."""

from __future__ import annotations

import math

import pytest
import torch

from multicond.core.chunks import chunk_layout
from multicond.core.style import (AdaINSettings, ShareSettings, adain, attach_shared_norm, joint_group_norm, release_control_geometry, sdpa_attention,
                                  shared_attention, shared_attention_full_batch, style_attention,
                                  token_mean_std, zero_reference_control)

HEADS = 2


def qkv(batch: int, tokens: int = 12, width: int = 8, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, tokens, width, generator=g, dtype=torch.float64) for _ in range(3))


def original_expand_first(feat: torch.Tensor, chunks: int, scale: float = 1.0) -> torch.Tensor:
    """The paper's `expand_first` generalised to `chunks` halves: reference = first row of each chunk."""
    rows = feat.shape[0] // chunks
    refs = torch.stack([feat[c * rows] for c in range(chunks)]).unsqueeze(1).repeat(1, rows, *[1] * (feat.ndim - 1))
    if scale != 1:
        refs = torch.cat([refs[:, :1], scale * refs[:, 1:]], dim=1)
    return refs.reshape(feat.shape)


def original_layer(q, k, v, chunks, adain_qkv=(True, True, False), scale=1.0, shift=0.0):
    """StyleAligned's `shared_call` on (B, h, N, d): AdaIN on every row, 2N keys, explicit logits."""
    split = lambda t: t.view(t.shape[0], t.shape[1], HEADS, -1).transpose(1, 2)  # noqa: E731
    q, k, v = split(q), split(k), split(v)

    def original_adain(feat):
        mean = feat.mean(dim=-2, keepdim=True)
        std = (feat.var(dim=-2, keepdim=True) + 1e-5).sqrt()
        return (feat - mean) / std * original_expand_first(std, chunks) + original_expand_first(mean, chunks)

    q = original_adain(q) if adain_qkv[0] else q
    k = original_adain(k) if adain_qkv[1] else k
    v = original_adain(v) if adain_qkv[2] else v
    keys = torch.cat([k, original_expand_first(k, chunks, scale)], dim=-2)
    values = torch.cat([v, original_expand_first(v, chunks)], dim=-2)
    logits = torch.einsum("bhqd,bhkd->bhqk", q, keys) / math.sqrt(q.shape[-1])
    logits[..., q.shape[2]:] += shift
    out = torch.einsum("bhqk,bhkd->bhqd", logits.softmax(-1), values)
    return out.transpose(1, 2).reshape(out.shape[0], out.shape[2], -1)


def shared_norm(x: torch.Tensor, reference_of_row: torch.Tensor, norm) -> torch.Tensor:
    """The paper's shared GroupNorm: normalise each image stacked with its reference along H, keep its half."""
    height = x.shape[-2]
    return norm(torch.cat([x, x[reference_of_row]], dim=-2))[..., :height, :]


@pytest.mark.parametrize("scale,shift", [(1.0, 0.0), (0.5, 0.0), (1.0, math.log(2)), (0.7, -0.4)])
@pytest.mark.parametrize("adain_qkv", [(True, True, False), (False, False, False), (True, True, True)])
def test_equals_original_formulation(scale, shift, adain_qkv):
    q, k, v = qkv(6)
    layout = chunk_layout(2, 6)
    settings = AdaINSettings(*adain_qkv) if any(adain_qkv) else None
    ours = style_attention(q, k, v, HEADS, layout, settings, ShareSettings(scale, shift))
    full = style_attention(q, k, v, HEADS, layout, settings, ShareSettings(scale, shift), full_batch=True)
    expected = original_layer(q, k, v, 2, adain_qkv, scale, shift)
    torch.testing.assert_close(ours, expected)
    torch.testing.assert_close(full, expected)


def test_reference_row_unchanged_by_sharing():
    q, k, v = qkv(4)
    layout = chunk_layout(1, 4)
    shared = shared_attention(q, k, v, HEADS, layout, ShareSettings(0.5, 1.3))
    alone = sdpa_attention(q[:1], k[:1], v[:1], HEADS)
    torch.testing.assert_close(shared[:1], alone)
    assert not torch.allclose(shared[1:], sdpa_attention(q[1:], k[1:], v[1:], HEADS))


def test_adain_maps_reference_onto_itself_and_gives_its_statistics():
    x = qkv(6)[0] * 3 + 1
    layout = chunk_layout(2, 6, reference_index=1)
    out = adain(x, layout.reference_of_row())
    torch.testing.assert_close(out[[1, 4]], x[[1, 4]])
    mean, std = token_mean_std(x)
    out_mean, out_var = out.mean(dim=-2, keepdim=True), out.var(dim=-2, keepdim=True)
    for row in range(6):
        ref = 1 if row < 3 else 4
        torch.testing.assert_close(out_mean[row], mean[ref])
        # eps sits in the std: the variance is the reference's times var / (var + eps), as the original.
        own_var = x[row].var(dim=-2, keepdim=True)
        torch.testing.assert_close(out_var[row], std[ref] ** 2 * own_var / (own_var + 1e-5))


def test_adain_statistics_are_unbiased_with_eps():
    x = torch.tensor([[[1.0], [2.0], [4.0]]], dtype=torch.float64)
    mean, std = token_mean_std(x)
    assert mean.item() == pytest.approx(7 / 3)
    assert std.item() == pytest.approx(math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2 + 1e-5))


def test_adain_strength_interpolates():
    q, k, v = qkv(3)
    layout = chunk_layout(1, 3)
    half = style_attention(q, k, v, HEADS, layout, AdaINSettings(True, False, False, strength=0.5), None,
                           attention=lambda q, k, v, h, b: q)
    full = style_attention(q, k, v, HEADS, layout, AdaINSettings(True, False, False), None, attention=lambda q, k, v, h, b: q)
    torch.testing.assert_close(half, (q + full) / 2)


def test_score_shift_of_log_w_weights_reference_keys_by_w():
    q, k, v = qkv(2, tokens=5)
    w = 2.5
    out = shared_attention(q, k, v, HEADS, chunk_layout(1, 2), ShareSettings(score_shift=math.log(w)))
    split = lambda t: t.view(t.shape[0], t.shape[1], HEADS, -1).transpose(1, 2)  # noqa: E731
    qh, kh, vh = split(q[1:]), split(k), split(v)
    own = torch.exp(qh @ kh[1:].transpose(-1, -2) / math.sqrt(qh.shape[-1]))
    ref = w * torch.exp(qh @ kh[:1].transpose(-1, -2) / math.sqrt(qh.shape[-1]))
    expected = (own @ vh[1:] + ref @ vh[:1]) / (own.sum(-1, keepdim=True) + ref.sum(-1, keepdim=True))
    torch.testing.assert_close(out[1:], expected.transpose(1, 2).reshape(1, 5, -1))


def test_full_attention_share_joins_each_chunk():
    q, k, v = qkv(4)
    out = style_attention(q, k, v, HEADS, chunk_layout(2, 4), None, ShareSettings(full_attention=True))
    joined = sdpa_attention(q[2:].reshape(1, -1, 8), k[2:].reshape(1, -1, 8), v[2:].reshape(1, -1, 8), HEADS)
    torch.testing.assert_close(out[2:], joined.reshape(2, 12, 8))


@pytest.mark.parametrize("kinds", [[1, 0], [0], [1, 0, 0]])
def test_chunks_together_equal_chunks_apart(kinds):
    rows = 3
    q, k, v = qkv(len(kinds) * rows, seed=3)
    layout = chunk_layout(len(kinds), q.shape[0], reference_index=2)
    together = style_attention(q, k, v, HEADS, layout, AdaINSettings(), ShareSettings(0.8, 0.3))
    for c in range(len(kinds)):
        part = slice(c * rows, (c + 1) * rows)
        apart = style_attention(q[part], k[part], v[part], HEADS, chunk_layout(1, rows, 2), AdaINSettings(), ShareSettings(0.8, 0.3))
        torch.testing.assert_close(together[part], apart)


def test_split_and_full_batch_forms_agree_and_full_batch_matches_original():
    q, k, v = qkv(6, seed=5)
    layout = chunk_layout(3, 6)
    share = ShareSettings(0.6, 0.2)
    torch.testing.assert_close(shared_attention(q, k, v, HEADS, layout, share),
                               shared_attention_full_batch(q, k, v, HEADS, layout, share))


def test_shared_group_norm_equals_group_norm_over_concatenation():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 8, 6, 5, generator=g, dtype=torch.float64)
    norm = torch.nn.GroupNorm(4, 8).double()
    torch.nn.init.normal_(norm.weight)
    layout = chunk_layout(2, 4)
    refs = layout.reference_of_row()
    expected = torch.stack([norm(torch.cat([x[i:i + 1], x[refs[i]:refs[i] + 1]], dim=-2))[0, :, :6] for i in range(4)])
    torch.testing.assert_close(shared_norm(x, refs, norm), expected)
    handles = attach_shared_norm([norm], lambda batch, device: refs if batch == 4 else None)
    torch.testing.assert_close(norm(x), expected)
    torch.testing.assert_close(norm(x[:1]), torch.nn.GroupNorm.forward(norm, x[:1]))  # another batch: plain
    for handle in handles:
        handle.remove()
    assert torch.equal(norm(x), torch.nn.GroupNorm.forward(norm, x))
    torch.testing.assert_close(expected[[0, 2]], norm(x)[[0, 2]])  # references are unchanged


def test_zero_reference_control_zeroes_only_reference_rows():
    residual = torch.ones(6, 2, 3, 3)
    control = {"output": [residual, None], "middle": [residual * 2]}
    out = zero_reference_control(control, chunk_layout(2, 6, reference_index=1))
    assert out["output"][1] is None
    zero_rows = [1, 4]
    assert torch.all(out["output"][0][zero_rows] == 0) and torch.all(out["middle"][0][[0, 2, 3, 5]] == 2)
    assert torch.all(residual == 1)  # the host's tensors are not written to


def test_a_chunk_of_one_image_is_plain_attention():
    q, k, v = qkv(2)
    out = style_attention(q, k, v, HEADS, chunk_layout(2, 2), AdaINSettings(), ShareSettings(0.5, 1.0))
    torch.testing.assert_close(out, sdpa_attention(q, k, v, HEADS))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_joint_group_norm_equals_stacked_group_norm(dtype):
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(6, 8, 5, 7, generator=g) * 3 + 2).to(dtype)
    norm = torch.nn.GroupNorm(2, 8).to(dtype)
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    refs = chunk_layout(2, 6, reference_index=2).reference_of_row()
    tolerance = {} if dtype == torch.float64 else {"atol": 1e-5, "rtol": 1e-5}
    torch.testing.assert_close(joint_group_norm(x, refs, norm), shared_norm(x, refs, norm), **tolerance)


def test_half_precision_statistics_do_not_overflow():
    x = torch.randn(2, 4096, 8, generator=torch.Generator().manual_seed(0)) * 20
    mean, std = token_mean_std(x.half())
    assert torch.isfinite(std).all()
    torch.testing.assert_close(std.float(), token_mean_std(x)[1], rtol=1e-2, atol=1e-2)


def test_lambda_t_drops_down_residuals_late_and_keeps_the_middle():
    control = {"output": [torch.ones(2, 1, 2, 2), None], "middle": [torch.ones(2, 1, 1, 1)], "input": [torch.ones(1)]}
    late = release_control_geometry(control, 849.0, 0.85)
    assert late["output"] == [None, None] and late["middle"] is control["middle"] and late["input"] is control["input"]
    assert release_control_geometry(control, 850.0, 0.85) is control
    assert release_control_geometry(control, 10.0, 0.0) is control


def test_joint_group_norm_with_a_gradient_is_the_stacked_group_norms_gradient():
    """The autograd path (Spatial Guidance through shared GroupNorm) keeps the statistics on the graph."""
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(4, 8, 5, 7, generator=g, dtype=torch.float64) * 3 + 2)
    norm = torch.nn.GroupNorm(2, 8).double()
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    refs = chunk_layout(2, 4).reference_of_row()
    upstream = torch.randn(4, 8, 5, 7, generator=g, dtype=torch.float64)
    gradients = []
    for function in (joint_group_norm, shared_norm):
        leaf = x.clone().requires_grad_(True)
        (gradient,) = torch.autograd.grad((function(leaf, refs, norm) * upstream).sum(), leaf)
        gradients.append(gradient)
    torch.testing.assert_close(*gradients)
    with torch.no_grad():  # the fused path gives the same values
        torch.testing.assert_close(joint_group_norm(x, refs, norm), shared_norm(x, refs, norm))


def test_joint_group_norm_keeps_channels_last_inputs_right():
    """The in-place rescaling of GroupNorm's own output works in whatever memory format the kernel returns."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(4, 8, 6, 5, generator=g) * 2 + 1
    norm = torch.nn.GroupNorm(2, 8)
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    refs = chunk_layout(2, 4).reference_of_row()
    with torch.no_grad():
        torch.testing.assert_close(joint_group_norm(x.to(memory_format=torch.channels_last), refs, norm),
                                   shared_norm(x, refs, norm), atol=1e-5, rtol=1e-5)
