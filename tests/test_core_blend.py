"""Dual-style blending: profiles, masks and the two blends, against the original's formulas."""

from __future__ import annotations

import math

import pytest
import torch

from multicond.core.attention import sdpa_attention
from multicond.core.blend import (stretch_note, CROSS_ATTENTION_SHARPNESS, DIRECTIONS, EPSILON_SHARPNESS, Profile, axis_position, blend,
                                  dual_context_attention, latent_weights, layer_weights, mask_weights, pool_weights,
                                  profile_weights, rows_of, side_factor)

from .conftest import assert_close_scaled

HEADS = 2


def original_epsilon_mask(width: int) -> torch.Tensor:
    """`p_sample_ddim_with_eps`, fusion_mode 'gaussian' (a logistic sigmoid), one row."""
    x_lin = torch.linspace(1, 0, width)
    return torch.exp(20 * (x_lin - 0.5)) / (torch.exp(20 * (x_lin - 0.5)) + 1)


def original_cross_attention_out(q, k1, v1, k2, v2, heads, width):
    """The crossattention-interpolation branch: two softmax attentions, out1 (1 - w) + out2 w per column."""
    def attend(k, v):
        b, n, c = q.shape
        split = lambda t: t.reshape(b, -1, heads, c // heads).permute(0, 2, 1, 3)  # noqa: E731
        sim = split(q) @ split(k).transpose(-1, -2) * (c // heads) ** -0.5
        return (sim.softmax(-1) @ split(v)).permute(0, 2, 1, 3).reshape(b, n, c)

    x = torch.linspace(0, 1, width).repeat(q.shape[1] // width)
    w = torch.sigmoid(30 * (x - 0.5))[None, :, None]
    return attend(k1, v1) * (1 - w) + attend(k2, v2) * w


def test_default_sigmoid_is_the_original_epsilon_mask_on_every_row():
    weights = profile_weights(Profile(), 5, 64)
    assert weights.shape == (5, 64)
    for row in weights:
        assert_close_scaled(row, original_epsilon_mask(64))  # the same sigmoid, written with exp


def test_linear_ramp_is_the_original_linear_mode():
    torch.testing.assert_close(profile_weights(Profile("linear"), 2, 9)[0], torch.linspace(1, 0, 9))


def test_cross_attention_default_is_the_original_column_weight():
    weights = profile_weights(Profile(sharpness=CROSS_ATTENTION_SHARPNESS), 3, 16)
    expected = 1 - torch.sigmoid(30 * (torch.linspace(0, 1, 16) - 0.5))
    assert_close_scaled(weights[1], expected)


@pytest.mark.parametrize("shape", ["sigmoid", "linear", "cosine"])
def test_edges_and_centre(shape):
    weights = profile_weights(Profile(shape, sharpness=EPSILON_SHARPNESS), 4, 65)
    assert weights[:, 32].eq(0.5).all(), "the centre column weighs both prompts alike"
    assert (weights[:, 0] > 0.99).all() and (weights[:, -1] < 0.01).all()
    assert (weights[:, :-1] >= weights[:, 1:]).all(), "the first prompt's weight falls along the direction"


@pytest.mark.parametrize("direction", list(DIRECTIONS))
def test_each_direction_starts_at_its_edge(direction):
    weights = profile_weights(Profile(angle=DIRECTIONS[direction]), 9, 13)
    left_to_right = profile_weights(Profile(), 9, 13)
    expected = {
        "left to right": left_to_right,
        "right to left": left_to_right.flip(1),
        "top to bottom": profile_weights(Profile(), 13, 9).T.contiguous(),
        "bottom to top": profile_weights(Profile(), 13, 9).T.flip(0),
    }[direction]
    assert_close_scaled(weights, expected)


def test_non_square_latents_use_their_own_height_and_width():
    weights = profile_weights(Profile(angle=90.0), 6, 11)
    assert weights.shape == (6, 11)
    assert (weights == weights[:, :1]).all(), "top to bottom: constant along each row"
    position = axis_position(6, 11, 0.0)
    torch.testing.assert_close(position[0], torch.linspace(0, 1, 11, dtype=torch.float64))


def test_an_angle_is_measured_on_the_image_and_spans_corner_to_corner():
    position = axis_position(4, 8, 45.0)
    assert position[0, 0] == 0 and position[-1, -1] == 1
    along = torch.arange(8)[None, :] + torch.arange(4)[:, None]  # pixels on one 45-degree line share a position
    for value in along.unique():
        line = position[along == value]
        assert line.max() - line.min() < 1e-12


def test_center_moves_the_half_point():
    weights = profile_weights(Profile("linear", center=0.25), 1, 5)
    assert weights[0, 1] == 0.5 and weights[0, 0] == 0.75


def test_cosine_ramp_is_flat_outside_its_width():
    weights = profile_weights(Profile("cosine", ramp_width=0.5), 1, 9)[0]  # positions 0, 1/8, ..., 1
    assert weights[:3].eq(1).all() and weights[-3:].eq(0).all()
    assert weights[4] == 0.5
    assert math.isclose(float(weights[3]), 0.5 + 0.5 * math.cos(math.pi * 0.25), abs_tol=1e-6)


def test_bad_profiles_are_refused():
    with pytest.raises(ValueError, match="shape"):
        Profile("gaussian")
    with pytest.raises(ValueError, match="ramp_width"):
        Profile("linear", ramp_width=0)


def test_mask_is_resized_bilinearly_to_the_latent():
    mask = torch.zeros(64, 96)
    mask[:, :48] = 1
    weights = mask_weights(mask, 8, 12)
    assert weights.shape == (1, 8, 12)
    assert weights[:, :, :6].eq(1).all() and weights[:, :, 6:].eq(0).all()
    batch = mask_weights(torch.rand(3, 16, 16), 16, 16)
    assert batch.shape == (3, 16, 16)


@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (8,), (0, 8)])
def test_masks_that_cannot_be_resized_are_refused(shape):
    with pytest.raises(ValueError, match="dimensions|empty"):
        mask_weights(torch.ones(shape), 4, 4)


def test_weights_per_image_and_pooling():
    assert rows_of(torch.ones(1, 4, 4), 3).shape == (3, 4, 4)
    with pytest.raises(ValueError, match="2 masks for a batch of 3"):
        rows_of(torch.ones(2, 4, 4), 3)
    weights = torch.arange(16.0).reshape(1, 4, 4)
    torch.testing.assert_close(pool_weights(weights, 2, 2)[0], torch.tensor([[2.5, 4.5], [10.5, 12.5]]))


def test_constant_weights_give_exactly_one_prompt():
    first, second = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    assert torch.equal(blend(first, second, torch.ones(1, 1, 8, 8)), first)
    assert torch.equal(blend(first, second, torch.zeros(1, 1, 8, 8)), second)


def test_blending_conditional_predictions_equals_blending_after_cfg():
    generator = torch.Generator().manual_seed(0)
    uncond, left, right = (torch.randn(1, 4, 8, 12, generator=generator) for _ in range(3))
    mask = profile_weights(Profile(), 8, 12)[None, None]
    guidance = 20.0  # the epsilon branch's decoder guidance
    cfg = lambda cond: uncond + guidance * (cond - uncond)  # noqa: E731
    original = mask * cfg(left) + (1 - mask) * cfg(right)
    # Elementwise, but an output near 0 carries the rounding of its x20 terms: scaled to the reference's magnitude.
    assert_close_scaled(cfg(blend(left, right, mask)), original)


def _attention_inputs(rows=4, tokens=24, first=7, second=5, channels=16):
    generator = torch.Generator().manual_seed(1)
    q = torch.randn(rows, tokens, channels, generator=generator)
    k = torch.randn(rows, first + second, channels, generator=generator)
    v = torch.randn(rows, first + second, channels, generator=generator)
    return q, k, v


def test_dual_context_attention_is_the_original_cross_attention_blend():
    q, k, v = _attention_inputs(rows=2, tokens=4 * 6)
    weight = profile_weights(Profile(sharpness=CROSS_ATTENTION_SHARPNESS), 4, 6).reshape(1, -1, 1)
    out = dual_context_attention(q, k, v, HEADS, 5, weight, slice(None))
    expected = original_cross_attention_out(q, k[:, :7], v[:, :7], k[:, 7:], v[:, 7:], HEADS, 6)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_identical_contexts_equal_plain_attention():
    q, k, v = _attention_inputs(first=6, second=6)
    k[:, 6:], v[:, 6:] = k[:, :6], v[:, :6]
    weight = torch.rand(1, q.shape[1], 1)
    assert_close_scaled(dual_context_attention(q, k, v, HEADS, 6, weight, [2, 3]),
                        sdpa_attention(q, k[:, :6], v[:, :6], HEADS))


def test_rows_outside_the_blend_attend_to_the_first_context_only():
    q, k, v = _attention_inputs()
    out = dual_context_attention(q, k, v, HEADS, 5, torch.zeros(1, q.shape[1], 1), [2, 3])
    assert torch.equal(out[:2], sdpa_attention(q[:2], k[:2, :7], v[:2, :7], HEADS))
    torch.testing.assert_close(out[2:], sdpa_attention(q[2:], k[2:, 7:], v[2:, 7:], HEADS))


def test_context_split_must_leave_both_contexts():
    q, k, v = _attention_inputs()
    with pytest.raises(ValueError, match="cannot split"):
        dual_context_attention(q, k, v, HEADS, 12, torch.ones(1, 1, 1), [0])


def test_side_factors_turn_a_weighted_average_into_the_blend():
    generator = torch.Generator().manual_seed(2)
    weight = profile_weights(Profile(), 6, 6)
    # Side 1: two entries (one masked), side 2: one entry with strength 3, and one entry on both sides.
    sides = [(True, False), (True, False), (False, True), (True, True)]
    own = [torch.ones(6, 6), torch.rand(6, 6, generator=generator), torch.full((6, 6), 3.0), torch.rand(6, 6, generator=generator)]
    eps = [torch.randn(6, 6, generator=generator) for _ in sides]
    totals = tuple(sum(m for m, s in zip(own, sides) if s[side]) for side in (0, 1))
    factors = [side_factor(weight, totals, s) for s in sides]
    mixed = sum(f * m * e for f, m, e in zip(factors, own, eps)) / sum(f * m for f, m in zip(factors, own))
    average = [sum(m * e for m, e, s in zip(own, eps, sides) if s[side]) / totals[side] for side in (0, 1)]
    torch.testing.assert_close(mixed, blend(average[0], average[1], weight), atol=1e-5, rtol=1e-5)


def test_a_side_without_weight_contributes_nothing():
    weight = torch.full((2, 2), 0.25)
    factor = side_factor(weight, (torch.ones(2, 2), torch.zeros(2, 2)), (False, True))
    assert factor.eq(0).all()


@pytest.mark.parametrize("value", [1.5, -0.1, float("nan")])
def test_masks_outside_zero_one_are_refused(value):
    mask = torch.zeros(4, 4)
    mask[0, 0] = value
    with pytest.raises(ValueError, match="outside 0..1"):
        mask_weights(mask, 4, 4)


def test_latent_and_layer_weights_of_a_profile_and_a_mask():
    profile = Profile(sharpness=CROSS_ATTENTION_SHARPNESS)
    torch.testing.assert_close(layer_weights(profile, (16, 24), (4, 6))[0], profile_weights(profile, 4, 6))
    mask = torch.zeros(32, 48)
    mask[:, :24] = 1
    assert latent_weights(mask, 16, 24).shape == (1, 16, 24)
    coarse = layer_weights(mask, (16, 24), (4, 6))[0]
    assert coarse[:, :3].eq(1).all() and coarse[:, 3:].eq(0).all()


def test_a_mask_of_another_aspect_ratio_is_named_as_stretched():
    note = stretch_note((512, 512), (64, 96))
    assert note is not None and "512x512" in note and "96x64" in note and "stretched" in note
    assert stretch_note((768, 512), (96, 64)) is None  # same shape at another scale
    assert stretch_note((1000, 1512), (125, 188)) is None  # within the rounding of sizes to multiples of 8


# ---------------------------------------------------------------- the cross-attention blend in joint attention

def _joint(tokens: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(2, tokens, 8, generator=g) for _ in range(3))


@pytest.mark.parametrize("order", ["text first", "image first"])
def test_dual_text_joint_attention_is_two_split_softmaxes_blended_on_the_image(order: str) -> None:
    """Text A (3 tokens), text B (2), image (6), in ComfyUI's/Flux's order or diffusers SD3's: each text attends
    without the other, the image tokens blend the two passes by the weight."""
    from multicond.core.attention import sdpa_attention
    from multicond.core.blend import dual_text_joint_attention

    q, k, v = _joint(11)
    spans = ((0, 3), (3, 5), (5, 11)) if order == "text first" else ((6, 9), (9, 11), (0, 6))
    first_text, second_text, image = spans
    weight = torch.rand(2, 6, 1, generator=torch.Generator().manual_seed(1))
    attend = lambda index, rows=None: sdpa_attention(q[:, index], k[:, index], v[:, index], 2)  # noqa: E731
    out = dual_text_joint_attention(attend, 11, first_text, second_text, image, weight)
    keep = lambda drop: [i for i in range(11) if not drop[0] <= i < drop[1]]  # noqa: E731
    without_second, without_first = keep(second_text), keep(first_text)
    alone_first, alone_second = attend(torch.tensor(without_second)), attend(torch.tensor(without_first))
    for (start, stop), alone, kept in ((first_text, alone_first, without_second),
                                       (second_text, alone_second, without_first)):  # each text saw only its own
        assert torch.equal(out[:, start:stop], alone[:, [kept.index(i) for i in range(start, stop)]])
    image_first = alone_first[:, [without_second.index(i) for i in range(*image)]]
    image_second = alone_second[:, [without_first.index(i) for i in range(*image)]]
    torch.testing.assert_close(out[:, image[0]:image[1]], weight * image_first + (1 - weight) * image_second,
                               rtol=0, atol=1e-6)
    ones = dual_text_joint_attention(attend, 11, first_text, second_text, image, torch.ones(1, 6, 1))
    assert torch.equal(ones[:, keep(second_text)], alone_first)  # weight 1: the first prompt's attention exactly


def test_the_second_pass_can_skip_rows_that_do_not_blend():
    """Rows left out of the second pass (uncond, weight 1) keep the first pass's image tokens exactly; the rows in it
    equal the full computation; the skipped rows' second-text tokens are zero (no image token reads them)."""
    from multicond.core.attention import sdpa_attention
    from multicond.core.blend import dual_text_joint_attention

    q, k, v = _joint(11)
    spans = ((0, 3), (3, 5), (5, 11))
    weight = torch.cat([torch.ones(1, 6, 1), torch.rand(1, 6, 1, generator=torch.Generator().manual_seed(4))])
    calls = []

    def attend(index, rows=None):
        calls.append(rows)
        rows = slice(None) if rows is None else rows
        return sdpa_attention(q[rows][:, index], k[rows][:, index], v[rows][:, index], 2)

    full = dual_text_joint_attention(attend, 11, *spans, weight)
    narrow = dual_text_joint_attention(attend, 11, *spans, weight, second_rows=[1])
    assert calls == [None, None, None, [1]]
    torch.testing.assert_close(narrow[1], full[1], rtol=0, atol=1e-6)
    assert torch.equal(narrow[0, 5:], full[0, 5:]) and torch.equal(narrow[0, :3], full[0, :3])
    assert torch.equal(narrow[0, 3:5], torch.zeros(2, 8))
    calls.clear()
    none = dual_text_joint_attention(attend, 11, *spans, torch.ones(1, 6, 1), second_rows=[])
    assert calls == [None]
    assert torch.equal(none[0], narrow[0])  # a call of uncond rows only: the first pass, no second
