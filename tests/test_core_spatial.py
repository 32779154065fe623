"""InfSplign's loss pieces against their definitions (methods.md section 4)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from multicond.core.attention import sdpa_attention
from multicond.core.layers import SD1, SDXL, LayerId
from multicond.core.spatial import (BALANCE, MAP_SIZE, PRESENCE, LayerMaps, SpatialSettings, attention_with_maps,
                                    centroid_and_variance, find_subsequence, guidance_layers, guidance_loss,
                                    guided_denoised, layer_loss, object_map, parse_relation, relation_distance,
                                    spatial_term)


def blob(row: int, column: int, size: int = MAP_SIZE) -> torch.Tensor:
    maps = torch.zeros(1, size, size)
    maps[0, row, column] = 1.0
    return maps


def test_centroid_and_variance_of_known_maps():
    cx, cy, var = centroid_and_variance(blob(10, 50))
    assert math.isclose(float(cx), 50 / 63, abs_tol=1e-6) and math.isclose(float(cy), 10 / 63, abs_tol=1e-6)
    assert float(var) == pytest.approx(0.0, abs=1e-9)
    cx, cy, var = centroid_and_variance(torch.ones(1, 5, 5))
    coordinates = torch.linspace(0, 1, 5)
    assert float(cx) == pytest.approx(0.5) and float(cy) == pytest.approx(0.5)
    assert float(var) == pytest.approx(2 * float(((coordinates - 0.5) ** 2).mean()))


@pytest.mark.parametrize("relation,a,b", [("left of", (30, 5), (30, 60)), ("right of", (30, 60), (30, 5)),
                                          ("above", (5, 30), (60, 30)), ("below", (60, 30), (5, 30))])
def test_distance_is_positive_exactly_when_the_relation_holds(relation, a, b):
    holds = relation_distance(relation, centroid_and_variance(blob(*a))[:2], centroid_and_variance(blob(*b))[:2])
    fails = relation_distance(relation, centroid_and_variance(blob(*b))[:2], centroid_and_variance(blob(*a))[:2])
    assert float(holds) > 0.8 and float(fails) < -0.8


def test_next_to_is_the_horizontal_gap():
    a, b = centroid_and_variance(blob(10, 5))[:2], centroid_and_variance(blob(50, 59))[:2]
    assert float(relation_distance("next to", a, b)) == pytest.approx(54 / 63)
    assert float(relation_distance("next to", b, a)) == pytest.approx(54 / 63)


def test_gelu_hinge():
    settings = SpatialSettings()
    d = torch.tensor([-1.0, 0.0, settings.margin, 1.0])  # GELU dips to its minimum near alpha (m - d) = -0.75, then rises to 0
    values = spatial_term(d, settings)
    torch.testing.assert_close(values, F.gelu(0.75 * (0.25 - d)))
    assert float(values[2]) == 0.0
    assert (values[:-1] > values[1:]).all(), "the loss falls as the objects move apart the right way"


def test_other_phi_and_bad_settings():
    assert float(spatial_term(torch.tensor(0.0), SpatialSettings(phi="relu"))) == pytest.approx(0.1875)
    with pytest.raises(ValueError, match="relation"):
        SpatialSettings(relation="inside")
    with pytest.raises(ValueError, match="phi"):
        SpatialSettings(phi="tanh")


def test_layer_roles_as_the_original():
    sd1 = guidance_layers(SD1)
    assert sd1 == {**{LayerId("output", n, 0): PRESENCE for n in (3, 4, 5)},
                   **{LayerId("output", n, 0): BALANCE for n in (6, 7, 8)}}
    assert [SD1.diffusers_path(layer) for layer in sd1][:2] == ["up_blocks.1.attentions.0.transformer_blocks.0.attn1",
                                                              "up_blocks.1.attentions.1.transformer_blocks.0.attn1"]
    sdxl = guidance_layers(SDXL)
    # The original matches "blocks.1" (self_guide_batch.py:278): transformer_blocks.1 presence, .2 and .3 balance.
    assert sdxl == {LayerId("output", 1, 1): PRESENCE, LayerId("output", 1, 2): BALANCE, LayerId("output", 1, 3): BALANCE}
    assert SDXL.diffusers_path(LayerId("output", 1, 1)) == "up_blocks.0.attentions.1.transformer_blocks.1.attn1"


def test_layer_loss_terms():
    settings = SpatialSettings()
    left, right = blob(30, 5), torch.ones(1, MAP_SIZE, MAP_SIZE)
    _, _, var_right = centroid_and_variance(right)
    spatial = spatial_term(relation_distance("left of", centroid_and_variance(left)[:2], centroid_and_variance(right)[:2]),
                           settings)
    torch.testing.assert_close(layer_loss(left, right, PRESENCE, settings), spatial + var_right)
    torch.testing.assert_close(layer_loss(left, right, BALANCE, settings), spatial + var_right.abs())


def test_object_maps_average_tokens_at_the_layers_own_size():
    probs = torch.zeros(1, 4 * 6, 5)
    probs[0, :, 1] = 1.0  # token 1 everywhere
    probs[0, 6 * 2 + 5, 2] = 1.0  # token 2 at row 2, column 5
    maps = object_map(probs, 4, 6, [1, 2])
    assert maps.shape == (1, MAP_SIZE, MAP_SIZE)
    expected = F.interpolate((probs[..., 1] + probs[..., 2]).reshape(1, 1, 4, 6) / 2, size=(MAP_SIZE, MAP_SIZE),
                             mode="bilinear", antialias=True)[:, 0]
    torch.testing.assert_close(maps, expected)
    cx, cy, _ = centroid_and_variance(object_map(probs, 4, 6, [2]))
    assert float(cx) > 0.85 and 0.5 < float(cy) < 0.8


def test_attention_with_maps_is_attention_and_its_probabilities():
    q, k, v = torch.randn(2, 12, 8), torch.randn(2, 7, 8), torch.randn(2, 7, 8)
    out, probs = attention_with_maps(q, k, v, 2)
    torch.testing.assert_close(out, sdpa_attention(q, k, v, 2), atol=1e-5, rtol=1e-5)
    assert probs.shape == (2, 12, 7)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 12))


def test_guidance_loss_is_the_mean_over_layers_per_image():
    settings = SpatialSettings()
    probs = torch.rand(2, 16, 4).softmax(-1)
    layers = [LayerMaps(probs, 4, 4, PRESENCE), LayerMaps(probs[:, :, [1, 0, 2, 3]], 4, 4, BALANCE)]
    loss = guidance_loss(layers, [1], [2], settings)
    per_layer = [layer_loss(object_map(l.probs, 4, 4, [1]), object_map(l.probs, 4, 4, [2]), l.role, settings) for l in layers]
    assert loss.shape == (2,)
    torch.testing.assert_close(loss, (per_layer[0] + per_layer[1]) / 2)


def test_guided_denoised_is_the_originals_epsilon_update():
    """DDPM: x_t = sqrt(a) x0 + sqrt(1 - a) eps; the original sets eps' = eps + w dL/dx_t and predicts x0 from eps'."""
    generator = torch.Generator().manual_seed(0)
    alpha_bar, weight = 0.3, 1000.0
    sigma = math.sqrt((1 - alpha_bar) / alpha_bar)
    x0, eps, grad_vp = (torch.randn(1, 4, 8, 8, generator=generator) for _ in range(3))
    x_t = math.sqrt(alpha_bar) * x0 + math.sqrt(1 - alpha_bar) * eps
    original_x0 = (x_t - math.sqrt(1 - alpha_bar) * (eps + weight * grad_vp)) / math.sqrt(alpha_bar)
    x_k = x_t * math.sqrt(1 + sigma**2)  # the host's latent; its model input is x_k / sqrt(1 + sigma^2) = x_t
    grad_k = grad_vp / math.sqrt(1 + sigma**2)  # dL/dx_k by the chain rule
    denoised = x_k - sigma * eps
    ours = guided_denoised(denoised, torch.tensor([sigma]), grad_k, weight)
    torch.testing.assert_close(ours, original_x0, atol=1e-3, rtol=1e-5)


@pytest.mark.parametrize("prompt,expected", [
    ("a cat to the left of a dog", ("cat", "left of", "dog")),
    ("A photo of a red car on the right of a tree, sunny day", ("car", "right of", "tree")),
    ("a bird above a small boat in the sea", ("bird", "above", "boat")),
    ("a chair under a table", ("chair", "below", "table")),
    ("a cup next to a laptop", ("cup", "next to", "laptop")),
    ("a lamp near the sofa", ("lamp", "next to", "sofa")),
])
def test_parse_relation(prompt, expected):
    parsed = parse_relation(prompt)
    assert (parsed.object_a, parsed.relation, parsed.object_b) == expected


def test_parse_without_relation():
    assert parse_relation("a cat and a dog") is None


def test_find_subsequence():
    assert find_subsequence([49406, 320, 2368, 531, 518, 320, 1929, 49407], [2368]) == [2]
    assert find_subsequence([1, 5, 6, 2, 5, 6], [5, 6], exclude=[1, 2]) == [4, 5]
    assert find_subsequence([1, 2, 3], [4]) == []


# --- SD3/SD3.5: joint attention (dit.md section 4.4) ---------------------------------------------------------------

from multicond.core.spatial import (CLIP_TOKENS, SEED_STEP, compound_loss, flow_guided_denoised,  # noqa: E402
                                    image_text_probabilities, joint_guidance_blocks, joint_guidance_loss,
                                    joint_object_map, soft_threshold)


def explicit_block(q: torch.Tensor, k: torch.Tensor, image: tuple[int, int], text: tuple[int, int]) -> torch.Tensor:
    """The seed's way: the full softmax over all joint keys, then the image-rows x text-columns block, head-averaged."""
    probs = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(dim=-1)
    return probs[:, :, image[0]:image[1], text[0]:text[1]].mean(dim=1)


@pytest.mark.parametrize("chunk", [1, 7, 1024])
def test_image_text_probabilities_equal_the_explicit_softmax_block_and_its_gradient(chunk):
    generator = torch.Generator().manual_seed(0)
    text, image = 90, 35  # CLIP 77 + a T5 part, then a 5 x 7 token grid (text first, as ComfyUI's SD3)
    q = torch.randn(2, 3, text + image, 16, generator=generator, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 3, text + image, 16, generator=generator, dtype=torch.float64, requires_grad=True)
    spans = (text, text + image), (0, CLIP_TOKENS)
    maps = image_text_probabilities(q, k, *spans, chunk=chunk)
    expected = explicit_block(q, k, *spans)
    torch.testing.assert_close(maps, expected, atol=1e-12, rtol=1e-10)
    weights = torch.randn(maps.shape, generator=generator, dtype=torch.float64)
    got = torch.autograd.grad((maps * weights).sum(), (q, k))
    want = torch.autograd.grad((expected * weights).sum(), (q, k))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


def test_image_text_probabilities_keep_float32_for_half_inputs():
    q = torch.randn(1, 2, 12, 8).to(torch.bfloat16)
    maps = image_text_probabilities(q, q, (4, 12), (0, 4))
    assert maps.dtype == torch.float32
    torch.testing.assert_close(maps, explicit_block(q.float(), q.float(), (4, 12), (0, 4)))


def test_soft_threshold_is_the_seeds():
    maps = torch.rand(2, 5, 7, generator=torch.Generator().manual_seed(1))
    median = maps.flatten(1).quantile(0.5, dim=1)[:, None, None]
    torch.testing.assert_close(soft_threshold(maps), maps * torch.sigmoid(50.0 * (maps - median)))


def test_joint_loss_is_one_compound_loss_on_the_block_mean_on_a_non_square_grid():
    generator = torch.Generator().manual_seed(2)
    blocks = [torch.rand(2, 5 * 7, 10, generator=generator) for _ in range(3)]
    settings = SpatialSettings(alpha=1.5, lambda_spatial=0.5)  # the seed's values
    loss = joint_guidance_loss(blocks, (5, 7), [2], [6, 7], settings)
    mean = torch.stack(blocks).mean(dim=0)
    a, b = joint_object_map(mean, (5, 7), [2]), joint_object_map(mean, (5, 7), [6, 7])
    assert a.shape == (2, 5, 7)
    torch.testing.assert_close(loss, compound_loss(a, b, settings, presence=True, balance=True))
    ax, ay, var_a = centroid_and_variance(a)
    bx, by, var_b = centroid_and_variance(b)
    by_hand = 0.5 * F.gelu(1.5 * (0.25 - (bx - ax))) + (var_a + var_b) + (var_a - var_b).abs()
    torch.testing.assert_close(loss, by_hand)
    with pytest.raises(ValueError, match="no joint-attention maps"):
        joint_guidance_loss([], (5, 7), [2], [6], settings)


def test_the_unet_layer_loss_is_the_compound_loss_with_one_energy_term():
    generator = torch.Generator().manual_seed(3)
    a, b = torch.rand(2, 8, 8, generator=generator), torch.rand(2, 8, 8, generator=generator)
    settings = SpatialSettings()
    torch.testing.assert_close(layer_loss(a, b, PRESENCE, settings), compound_loss(a, b, settings, True, False))
    torch.testing.assert_close(layer_loss(a, b, BALANCE, settings), compound_loss(a, b, settings, False, True))


@pytest.mark.parametrize("depth,early,late", [(24, (4, 5, 6, 7), (8, 9)), (38, tuple(range(6, 12)), (12, 13, 14)),
                                              (2, (0,), (0,)), (1, (0,), (0,)), (12, (2, 3), (4,))])
def test_joint_blocks_are_the_seeds_fractions_of_depth(depth, early, late):
    assert joint_guidance_blocks(depth) == (early, late)


@pytest.mark.parametrize("sigma_next", [0.0, 0.6])
def test_flow_update_moves_the_next_euler_latent_by_the_seeds_step(sigma_next):
    """Euler from sigma to sigma_next with the changed denoised = the seed's x - 30 dL/dx, then its step with the
    velocity of the unmoved latent (sd3_guidance_modular.py:1028-1029, 1063-1093)."""
    generator = torch.Generator().manual_seed(4)
    x, denoised, gradient = (torch.randn(2, 16, 5, 7, generator=generator, dtype=torch.float64) for _ in range(3))
    sigma = torch.full((2,), 0.8, dtype=torch.float64)
    changed = flow_guided_denoised(denoised, sigma, sigma_next, gradient, 1000.0)
    velocity = (x - denoised) / 0.8
    euler = x + (sigma_next - 0.8) * (x - changed) / 0.8
    torch.testing.assert_close(euler, x - SEED_STEP * gradient + (sigma_next - 0.8) * velocity)
    torch.testing.assert_close(flow_guided_denoised(denoised, sigma, sigma_next, gradient, 0.0), denoised)
