"""StyleAligned on joint (image + text) attention in core: exact properties and an explicit formulation."""

from __future__ import annotations

import math

import pytest
import torch

from multicond.core.attention import sdpa_attention
from multicond.core.chunks import chunk_layout
from multicond.core.joint_style import (adain_image_tokens, joint_adain, joint_features, joint_style_attention,
                                        shared_joint_attention, shares_on_joint_layer)
from multicond.core.style import AdaINSettings, ShareSettings, token_mean_std

from .conftest import assert_close_scaled

HEADS = 2
TEXT, IMAGE = 5, 12
IMAGE_FIRST = (0, IMAGE)
TEXT_FIRST = (TEXT, TEXT + IMAGE)


def qkv(batch: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, TEXT + IMAGE, 8, generator=g, dtype=dtype) for _ in range(3))


def explicit_row(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention of one row `(tokens, h*d)` with explicit logits; `bias` per key."""
    split = lambda t: t.view(t.shape[0], HEADS, -1).transpose(0, 1)  # noqa: E731
    qh, kh, vh = split(q), split(keys), split(values)
    logits = qh @ kh.transpose(-1, -2) / math.sqrt(qh.shape[-1])
    if bias is not None:
        logits = logits + bias
    return (logits.softmax(-1) @ vh).transpose(0, 1).reshape(q.shape[0], -1)


# ---------------------------------------------------------------- plain when off, reference untouched

@pytest.mark.parametrize("image", [IMAGE_FIRST, TEXT_FIRST])
def test_nothing_enabled_is_plain_attention_exactly(image):
    q, k, v = qkv(6, dtype=torch.float32)
    out = joint_style_attention(q, k, v, HEADS, image, chunk_layout(2, 6), None, None)
    assert torch.equal(out, sdpa_attention(q, k, v, HEADS))


@pytest.mark.parametrize("image", [IMAGE_FIRST, TEXT_FIRST])
@pytest.mark.parametrize("adain", [AdaINSettings(), AdaINSettings(values=True), None])
def test_isolated_reference_rows_are_plain_attention_bit_for_bit_and_targets_change(image, adain):
    q, k, v = qkv(6, dtype=torch.float32)
    layout = chunk_layout(2, 6, reference_index=1)
    out = joint_style_attention(q, k, v, HEADS, image, layout, adain, ShareSettings(0.8, 0.3))
    plain = sdpa_attention(q, k, v, HEADS)
    assert torch.equal(out[layout.reference_rows], plain[layout.reference_rows])
    for row in layout.target_rows:
        assert (out[row] - plain[row]).abs().max() > 1e-3


def test_adain_alone_leaves_text_tokens_and_reference_rows_exact():
    q, k, v = qkv(4)
    layout = chunk_layout(2, 4)
    aq, ak, av = joint_adain(q, k, v, TEXT_FIRST, layout, AdaINSettings(values=False))
    assert torch.equal(av, v)
    for before, after in ((q, aq), (k, ak)):
        assert torch.equal(after[:, :TEXT], before[:, :TEXT])
        assert torch.equal(after[layout.reference_rows], before[layout.reference_rows])
        assert not torch.equal(after[layout.target_rows], before[layout.target_rows])


@pytest.mark.parametrize("image", [IMAGE_FIRST, TEXT_FIRST])
def test_adain_gives_targets_the_reference_image_statistics(image):
    q, _, _ = qkv(6, seed=2)
    layout = chunk_layout(2, 6, reference_index=2)
    start, stop = image
    styled = adain_image_tokens(q, image, layout)
    # Statistics without eps: AdaIN's eps moves the std by a relative eps / var (about 1e-5 here).
    mean, std = token_mean_std(styled[:, start:stop], eps=0.0)
    ref_mean, ref_std = token_mean_std(q[:, start:stop], eps=0.0)
    refs = layout.reference_of_row()
    torch.testing.assert_close(mean, ref_mean[refs])
    torch.testing.assert_close(std, ref_std[refs], rtol=1e-4, atol=0)


def test_adain_strength_zero_changes_nothing():
    q, _, _ = qkv(4, seed=4)
    torch.testing.assert_close(adain_image_tokens(q, TEXT_FIRST, chunk_layout(2, 4), 0.0), q, rtol=0, atol=1e-12)


# ---------------------------------------------------------------- the math, explicitly

@pytest.mark.parametrize("isolate", [True, False])
@pytest.mark.parametrize("scale,shift", [(1.0, 0.0), (0.7, 0.4)])
@pytest.mark.parametrize("image", [IMAGE_FIRST, TEXT_FIRST])
def test_each_row_attends_to_its_own_keys_plus_its_reference_image_keys(isolate, scale, shift, image):
    q, k, v = qkv(6, seed=1)
    layout = chunk_layout(2, 6, reference_index=1)
    out = joint_style_attention(q, k, v, HEADS, image, layout, AdaINSettings(), ShareSettings(scale, shift), isolate)
    aq, ak, av = joint_adain(q, k, v, image, layout, AdaINSettings())
    start, stop = image
    refs = layout.reference_of_row().tolist()
    for row, ref in enumerate(refs):
        if isolate and row == ref:
            expected = explicit_row(aq[row], ak[row], av[row])
        else:
            appended = ak[ref, start:stop] * (1.0 if row == ref else scale)
            bias = torch.cat([torch.zeros(TEXT + IMAGE), torch.full((IMAGE,), shift)]).double()
            expected = explicit_row(aq[row], torch.cat([ak[row], appended]), torch.cat([av[row], av[ref, start:stop]]),
                                    bias)
        torch.testing.assert_close(out[row], expected)


def test_score_shift_log_2_equals_duplicating_the_reference_keys_once():
    q, k, v = qkv(4, seed=6)
    layout = chunk_layout(2, 4)
    out = joint_style_attention(q, k, v, HEADS, TEXT_FIRST, layout, None, ShareSettings(score_shift=math.log(2)))
    start, stop = TEXT_FIRST
    refs = layout.reference_of_row().tolist()
    for row in layout.target_rows:
        ref = refs[row]
        doubled = explicit_row(q[row], torch.cat([k[row], k[ref, start:stop], k[ref, start:stop]]),
                               torch.cat([v[row], v[ref, start:stop], v[ref, start:stop]]))
        assert_close_scaled(out[row], doubled, rel=1e-6)  # the bias is float32 (`reference_bias`): log 2 to 6e-8


def test_score_scale_and_shift_act_on_appended_keys_only():
    """Scale 1 and shift 0 equal plain sharing; the own (text and image) keys are never rescaled."""
    q, k, v = qkv(4, seed=7)
    layout = chunk_layout(2, 4)
    plain_share = joint_style_attention(q, k, v, HEADS, IMAGE_FIRST, layout, None, ShareSettings())
    explicit = joint_style_attention(q, k, v, HEADS, IMAGE_FIRST, layout, None, ShareSettings(1.0, 0.0))
    assert torch.equal(plain_share, explicit)
    # A huge negative shift removes the appended keys: plain attention again.
    gone = joint_style_attention(q, k, v, HEADS, IMAGE_FIRST, layout, None, ShareSettings(score_shift=-1e4))
    assert_close_scaled(gone, sdpa_attention(q, k, v, HEADS), rel=1e-12)


def test_token_order_does_not_matter():
    """The same rows in image-first and text-first order give the same outputs, reordered."""
    q, k, v = qkv(6, seed=8)
    layout = chunk_layout(2, 6)
    order = torch.cat([torch.arange(IMAGE, IMAGE + TEXT), torch.arange(IMAGE)])  # image-first -> text-first
    first = joint_style_attention(q, k, v, HEADS, IMAGE_FIRST, layout, AdaINSettings(values=True),
                                  ShareSettings(0.9, 0.2))
    second = joint_style_attention(q[:, order], k[:, order], v[:, order], HEADS, TEXT_FIRST, layout,
                                   AdaINSettings(values=True), ShareSettings(0.9, 0.2))
    assert_close_scaled(second, first[:, order], rel=1e-12)


# ---------------------------------------------------------------- batching and leaks

@pytest.mark.parametrize("isolate", [True, False])
@pytest.mark.parametrize("kinds", [[1, 0], [0], [1, 0, 0]])
def test_chunks_together_equal_chunks_apart(kinds, isolate):
    rows = 3
    q, k, v = qkv(len(kinds) * rows, seed=3)
    layout = chunk_layout(len(kinds), q.shape[0], reference_index=2)
    args = (AdaINSettings(values=True), ShareSettings(0.8, 0.3), isolate)
    together = joint_style_attention(q, k, v, HEADS, TEXT_FIRST, layout, *args)
    for c in range(len(kinds)):
        part = layout.chunk_rows(c)
        apart = joint_style_attention(q[part], k[part], v[part], HEADS, TEXT_FIRST, chunk_layout(1, rows, 2), *args)
        assert_close_scaled(together[part], apart, rel=1e-12)


def test_a_row_does_not_depend_on_other_targets():
    q, k, v = qkv(6, seed=9, dtype=torch.float32)
    layout = chunk_layout(2, 6)
    args = (AdaINSettings(values=True), ShareSettings(0.8, 0.3))
    out = joint_style_attention(q, k, v, HEADS, TEXT_FIRST, layout, *args)
    for tensor in (q, k, v):
        tensor[2] += 5.0  # another target of chunk 0
        tensor[4:] -= 3.0  # targets of chunk 1
    changed = joint_style_attention(q, k, v, HEADS, TEXT_FIRST, layout, *args)
    assert_close_scaled(changed[[0, 1, 3]], out[[0, 1, 3]], rel=1e-6)
    assert not torch.allclose(changed[2], out[2])


def test_a_chunk_of_one_image_is_plain_attention():
    q, k, v = qkv(2, dtype=torch.float32)
    out = joint_style_attention(q, k, v, HEADS, TEXT_FIRST, chunk_layout(2, 2), AdaINSettings(), ShareSettings())
    assert torch.equal(out, sdpa_attention(q, k, v, HEADS))


def test_full_attention_share_is_refused():
    q, k, v = qkv(4)
    with pytest.raises(ValueError, match="full_attention_share"):
        joint_style_attention(q, k, v, HEADS, TEXT_FIRST, chunk_layout(2, 4), None, ShareSettings(full_attention=True))


# ---------------------------------------------------------------- CB35's sharing rule

@pytest.mark.parametrize("allowed,shares", [
    ({"q", "k", "share"}, True), ({"q", "k", "v", "share"}, True), ({"q", "share"}, False),
    ({"k", "v", "share"}, False), ({"q", "k"}, False), (set(), False),
])
def test_a_graded_dit_layer_shares_only_when_both_q_and_k_are_chosen(allowed, shares):
    assert shares_on_joint_layer(frozenset(allowed)) is shares
    assert ("share" in joint_features(frozenset(allowed))) is shares
    assert joint_features(frozenset(allowed)) - {"share"} == frozenset(allowed) - {"share"}


# ---------------------------------------------------------------- separately positioned reference keys (Flux)

@pytest.mark.parametrize("isolate", [True, False])
def test_reference_keys_replace_only_the_appended_copies(isolate):
    """Flux re-rotates the appended keys (AlignedGen's shifted positions); each row's own keys stay as given."""
    q, k, v = qkv(6, seed=8)
    layout = chunk_layout(2, 6, reference_index=1)
    start, stop = TEXT_FIRST
    moved = torch.randn(2, IMAGE, 8, generator=torch.Generator().manual_seed(9), dtype=torch.float64)  # per chunk
    out = shared_joint_attention(q, k, v, HEADS, TEXT_FIRST, layout, ShareSettings(1.1, 0.2), isolate, moved)
    refs = layout.reference_of_row().tolist()
    bias = torch.cat([torch.zeros(TEXT + IMAGE), torch.full((IMAGE,), 0.2)]).double()
    for row, ref in enumerate(refs):
        if isolate and row == ref:
            expected = explicit_row(q[row], k[row], v[row])
        else:
            appended = moved[ref // layout.rows_per_chunk] * (1.0 if row == ref else 1.1)
            expected = explicit_row(q[row], torch.cat([k[row], appended]), torch.cat([v[row], v[ref, start:stop]]),
                                    bias)
        torch.testing.assert_close(out[row], expected)


def test_reference_keys_equal_to_the_image_keys_change_nothing():
    q, k, v = qkv(4, seed=10, dtype=torch.float32)
    layout = chunk_layout(2, 4)
    share = ShareSettings(0.9, 0.1)
    same = shared_joint_attention(q, k, v, HEADS, TEXT_FIRST, layout, share, True, k[layout.reference_rows, TEXT:].clone())
    assert torch.equal(same, shared_joint_attention(q, k, v, HEADS, TEXT_FIRST, layout, share, True))


def test_reference_keys_of_the_wrong_shape_are_refused():
    q, k, v = qkv(4, seed=11)
    with pytest.raises(ValueError, match="reference_keys"):
        shared_joint_attention(q, k, v, HEADS, TEXT_FIRST, chunk_layout(2, 4), ShareSettings(), True, k)
