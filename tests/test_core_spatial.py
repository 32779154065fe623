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
