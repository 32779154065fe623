"""Localized control's pure parts: feature masking, box masks, cubic timesteps, Sobel, the loss, the metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from multicond.core.adapter import (canny_edges, cubic_timesteps, diffcc, edge_lambda, expand_condition, lf_mse,
                                    lf_mse_sobel, localized_loss, luma, mask_features, mask_sides, predicted_x0,
                                    random_box_mask, resize_mask, sobel_image, sobel_magnitude)

SD15 = [(320, 64), (640, 32), (1280, 16), (1280, 8)]           # full_adapter features at 512x512
SDXL = [(320, 128), (640, 128), (1280, 64), (1280, 64)]       # full_adapter_xl features at 1024x1024


# ---------------------------------------------------------------- mask_features

@pytest.mark.parametrize("layout,image", [(SD15, (512, 512)), (SDXL, (1024, 1024))])
def test_each_feature_gets_the_mask_at_its_own_size(layout, image) -> None:
    features = [torch.randn(2, c, s, s) for c, s in layout]
    mask = torch.zeros(1, 1, *image)
    mask[..., : image[0] // 2, :] = 1.0                           # top half
    out = mask_features(features, mask)
    for feature, masked in zip(features, out):
        size = feature.shape[-1]
        assert masked.shape == feature.shape
        torch.testing.assert_close(masked[..., : size // 2, :], feature[..., : size // 2, :], rtol=0, atol=0)
        assert masked[..., size // 2:, :].abs().max() == 0


def test_nearest_downsampling_is_the_originals_interpolate() -> None:
    mask = random_box_mask(512, 512, generator=torch.Generator().manual_seed(3))[None]
    features = [torch.ones(1, 1, s, s) for _, s in SD15]
    for scale, masked in zip((8, 16, 32, 64), mask_features(features, mask)):
        torch.testing.assert_close(masked, F.interpolate(mask, size=512 // scale), rtol=0, atol=0)


def test_non_square_latent_and_mask_layouts() -> None:
    features = [torch.randn(1, 4, 96 // s, 64 // s) for s in (1, 2, 4, 8)]   # a 768x512 image's 1/8.. 1/64
    mask = torch.zeros(768, 512)
    mask[:, :256] = 1.0                                                      # left half, (H, W)
    for layout in (mask, mask[None], mask[None, None]):
        for feature, masked in zip(features, mask_features(features, layout)):
            width = feature.shape[-1]
            assert masked.shape == feature.shape
            assert torch.equal(masked[..., : width // 2], feature[..., : width // 2])
            assert masked[..., width // 2:].abs().max() == 0


@pytest.mark.parametrize("mode,feather", [("nearest", 0.0), ("bilinear", 0.0), ("area", 3.0), ("bicubic", 7.5)])
def test_ones_and_zeros_masks_are_exact(mode: str, feather: float) -> None:
    features = [torch.randn(2, c, s, s, dtype=torch.float16 if s == 8 else torch.float32) for c, s in SD15]
    for value in (1.0, 0.0):
        mask = torch.full((1, 1, 512, 512), value)
        for feature, masked in zip(features, mask_features(features, mask, mode=mode, feather=feather)):
            assert torch.equal(masked, feature * value)


def test_mask_batch_is_repeated_over_cfg_batches_and_per_sample() -> None:
    features = [torch.ones(4, 2, 8, 8)]
    mask = torch.stack([torch.ones(64, 64), torch.zeros(64, 64)])           # (2, H, W): sample 0 on, sample 1 off
    out = mask_features(features, mask)[0]
    assert out[0].min() == 1 and out[2].min() == 1 and out[1].max() == 0 and out[3].max() == 0
    with pytest.raises(ValueError):
        mask_features([torch.ones(3, 2, 8, 8)], mask)


def test_feather_softens_the_edge_and_keeps_the_far_inside() -> None:
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 16:48, 16:48] = 1.0
    soft = resize_mask(mask, (64, 64), feather=2.0)
    assert 0.2 < soft[0, 0, 32, 16].item() < 0.8 and soft[0, 0, 32, 32].item() > 0.999
    assert soft[0, 0, 0, 0].item() < 1e-6


def test_a_canny_condition_has_the_adapters_channels() -> None:
    edges = torch.rand(2, 1, 16, 16)
    assert torch.equal(expand_condition(edges, 1), edges)
    three = expand_condition(edges, 3)
    assert three.shape == (2, 3, 16, 16) and all(torch.equal(three[:, c:c + 1], edges) for c in range(3))
    with pytest.raises(ValueError, match="1 or 3 input channels, got 4"):
        expand_condition(edges, 4)
    with pytest.raises(ValueError, match=r"edges must be \(B, 1, H, W\)"):
        expand_condition(three, 3)


# ---------------------------------------------------------------- training draws

def test_box_masks_have_the_minimum_area_and_stay_inside() -> None:
    generator = torch.Generator().manual_seed(0)
    areas = []
    for _ in range(100):
        mask = random_box_mask(512, 512, 10000, generator)
        assert mask.shape == (1, 512, 512)
        box = mask[0].numpy()
        rows, cols = np.flatnonzero(box.any(1)), np.flatnonzero(box.any(0))
        height, width = rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
        assert box[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].min() == 1 and box.sum() == height * width  # one box
        assert box[-1].sum() == 0 and box[:, -1].sum() == 0           # x2, y2 <= W-1, exclusive
        areas.append(int(height * width))
    assert min(areas) >= 10000 and len(set(areas)) > 90


def test_box_mask_rejects_an_impossible_area() -> None:
    with pytest.raises(ValueError, match="min_area"):
        random_box_mask(64, 64, 10000)


def test_cubic_timesteps_distribution() -> None:
    t = cubic_timesteps(200_000, torch.Generator().manual_seed(0))
    assert t.dtype == torch.int64 and t.min() >= 0 and t.max() <= 999
    # E[1 - u^3] = 3/4; truncation to integers lowers the mean by about 0.5.
    assert abs((t.double().mean().item() + 0.5) / 1000 - 0.75) < 3e-3
    # P(t < 500) = P(u^3 > 1/2) = 1 - 2^(-1/3) = 0.2063
    assert abs((t < 500).double().mean().item() - (1 - 2 ** (-1 / 3))) < 5e-3


# ---------------------------------------------------------------- Sobel and the loss

def test_sobel_on_a_hand_example() -> None:
    step = torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 4)            # a vertical edge between columns 1 and 2
    image = torch.stack([step, step.t()])[None]                 # channel 0: vertical edge, channel 1: horizontal
    # Interior: gx = (1·1 + 2·1 + 1·1) / 8 = 0.5 at columns 1, 2; replicate padding: 0 at columns 0, 3.
    edge, flat = math.sqrt(0.25 + 1e-6), math.sqrt(1e-6)
    expected = torch.tensor([[flat, edge, edge, flat]] * 4)
    out = sobel_magnitude(image)
    torch.testing.assert_close(out[0, 0], expected)
    torch.testing.assert_close(out[0, 1], expected.t())
    corner = torch.zeros(1, 1, 3, 3)
    corner[..., 1, 1] = 8.0                                     # an impulse: |gx| = |gy| = 2 at its 4-neighbours
    torch.testing.assert_close(sobel_magnitude(corner)[0, 0, 0, 1], torch.tensor(math.sqrt(4 + 1e-6)))
    torch.testing.assert_close(sobel_magnitude(corner)[0, 0, 0, 0], torch.tensor(math.sqrt(1 + 1 + 1e-6)))


def test_sobel_matches_kornia() -> None:
    kornia = pytest.importorskip("kornia")
    x = torch.randn(2, 4, 9, 13, dtype=torch.float64)
    torch.testing.assert_close(sobel_magnitude(x), kornia.filters.sobel(x), rtol=0, atol=1e-12)


def _loss_inputs(seed: int = 0, batch: int = 3):
    g = torch.Generator().manual_seed(seed)
    z0, eps = torch.randn(batch, 4, 8, 8, generator=g), torch.randn(batch, 4, 8, 8, generator=g)
    t = torch.tensor([999, 600, 120])[:batch]
    alpha_bar = torch.linspace(0.9991, 0.0047, 1000)[t]
    a = alpha_bar.view(-1, 1, 1, 1)
    z_t = a.sqrt() * z0 + (1 - a).sqrt() * eps
    mask = torch.zeros(batch, 1, 8, 8)
    mask[..., 2:6, 1:5] = 1.0
    return z0, eps, z_t, alpha_bar, t, mask, g


def test_edge_term_is_zero_when_the_prediction_is_exact() -> None:
    z0, eps, z_t, alpha_bar, t, mask, _ = _loss_inputs()
    torch.testing.assert_close(predicted_x0(z_t, eps, alpha_bar), z0, atol=1e-4, rtol=1e-4)
    total, parts = localized_loss(eps, eps, z_t, z0, alpha_bar, t, mask, weight=1.0)
    assert total.item() < 1e-6 and parts["simple"].item() == 0


@pytest.mark.parametrize("method", ["constant", "step_unit", "time_unit"])
def test_loss_equals_the_formula(method: str) -> None:
    z0, eps, z_t, alpha_bar, t, mask, g = _loss_inputs()
    eps_pred = eps + 0.3 * torch.randn(eps.shape, generator=g)
    total, parts = localized_loss(eps_pred, eps, z_t, z0, alpha_bar, t, mask, weight=0.5, method=method)
    expected = []
    for i in range(3):
        a = alpha_bar[i].item()
        x0 = (z_t[i] - math.sqrt(1 - a) * eps_pred[i]) / math.sqrt(a)
        s_pred, s_true = sobel_magnitude(x0[None])[0], sobel_magnitude(z0[i][None])[0]
        lam = {"constant": 0.5, "step_unit": 0.5 if 500 <= t[i] <= 999 else 0.0, "time_unit": (1 - a) * 0.5}[method]
        expected.append(((eps_pred[i] - eps[i]) ** 2).mean() + lam * ((s_pred * mask[i] - s_true * mask[i]) ** 2).mean())
    torch.testing.assert_close(total, torch.stack(expected).mean())
    torch.testing.assert_close(parts["simple"] + parts["edge"], total)
    # A mask at image size is resized (nearest) to the latent: the same loss.
    big = F.interpolate(mask, size=(64, 64), mode="nearest")
    torch.testing.assert_close(localized_loss(eps_pred, eps, z_t, z0, alpha_bar, t, big, 0.5, method)[0], total)


def test_edge_lambda_methods() -> None:
    t = torch.tensor([0, 499, 500, 999])
    alpha_bar = torch.tensor([0.99, 0.5, 0.4, 0.01])
    torch.testing.assert_close(edge_lambda("constant", t, alpha_bar, 2.0), torch.full((4,), 2.0))
    torch.testing.assert_close(edge_lambda("step_unit", t, alpha_bar, 2.0), torch.tensor([0.0, 0.0, 2.0, 2.0]))
    torch.testing.assert_close(edge_lambda("time_unit", t, alpha_bar, 2.0), (1 - alpha_bar) * 2.0)
    with pytest.raises(ValueError):
        edge_lambda("linear", t, alpha_bar, 1.0)


# ---------------------------------------------------------------- metrics

def _outline(size: int = 64, lo: int = 16, hi: int = 47) -> np.ndarray:
    edges = np.zeros((size, size), np.uint8)
    edges[lo, lo:hi + 1] = edges[hi, lo:hi + 1] = edges[lo:hi + 1, lo] = edges[lo:hi + 1, hi] = 255
    return edges


MASK = np.zeros((64, 64), np.uint8)
MASK[8:56, 8:56] = 255                     # at 1/8: cells 1..6 inside (36), the border ring outside (28)


def test_metrics_of_a_perfect_match() -> None:
    square = _outline()
    lf = lf_mse(square, square, MASK)
    assert lf["in"] == 0.0
    assert lf["out"] == 1.0            # the original's outside target 1.0; no generated edge reaches the ring
    assert lf_mse(square, square, MASK, outside_target=0.0)["out"] == 0.0
    assert diffcc(square, square, MASK) == {"coincidence": 1.0, "hallucination_in": 0.0, "hallucination_out": 0.0}


def test_metrics_of_a_blank_image() -> None:
    import cv2

    square, blank = _outline(), np.zeros((64, 64), np.uint8)
    low = cv2.resize(cv2.GaussianBlur(square, (11, 11), 5), (8, 8)) / 255.0
    inside = np.zeros((8, 8), bool)
    inside[1:7, 1:7] = True
    lf = lf_mse(blank, square, MASK)
    assert lf["in"] == pytest.approx((low[inside] ** 2).mean()) and lf["in"] > 0
    assert lf["out"] == 1.0 and lf["total"] == pytest.approx(lf["in"] + 1.0)
    cc = diffcc(blank, square, MASK)
    assert cc == {"coincidence": 0.0, "hallucination_in": 0.0, "hallucination_out": 0.0}


def test_edges_outside_the_mask_are_hallucinations_out() -> None:
    square = _outline()
    extra = square.copy()
    extra[60, :] = 255                 # a line through the bottom ring of cells (row 7: 8 of the 28 outside cells)
    cc = diffcc(extra, square, MASK)
    assert cc["coincidence"] == 1.0 and cc["hallucination_in"] == 0.0
    assert cc["hallucination_out"] == pytest.approx(8 / 28)
    assert lf_mse(extra, square, MASK)["in"] == 0.0
    assert lf_mse(extra, square, MASK, outside_target=0.0)["out"] > 0
    assert lf_mse(extra, square, MASK)["out"] < 1.0


def test_edges_moved_inside_the_mask_lower_coincidence_and_add_hallucination_in() -> None:
    square, smaller = _outline(), _outline(lo=24, hi=39)
    cc = diffcc(smaller, square, MASK)
    assert 0.0 <= cc["coincidence"] < 1.0 and cc["hallucination_in"] > 0.0 and cc["hallucination_out"] == 0.0
    assert lf_mse(smaller, square, MASK)["in"] > 0
    assert math.isnan(diffcc(square, np.zeros_like(square), MASK)["coincidence"])   # no condition edges inside


def test_canny_of_a_drawn_square_is_its_outline() -> None:
    image = np.zeros((64, 64, 3), np.uint8)
    image[16:48, 16:48] = 200
    edges = canny_edges(image)
    assert edges.dtype == np.uint8 and set(np.unique(edges)) == {0, 255}
    assert edges[30, 30] == 0 and edges[5, 5] == 0 and edges[16:48, 14:18].any()


# ---------------------------------------------------------------- the original's formulas, re-stated

def _original_masked_mse(pred: np.ndarray, target: np.ndarray, mask: np.ndarray) -> float:
    """metrics/lfmse.py:22-27."""
    return ((pred - target) ** 2).flatten()[mask.flatten() > 0].mean()


def _original_lfmse_canny(prediction: np.ndarray, target: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    """metrics/lfmse.py:29-42 on uint8 arrays (its PIL images); `target.size[0]` is the width."""
    import cv2

    size = (target.shape[1] // 8, target.shape[1] // 8)
    resized_mask = cv2.resize(mask, size, interpolation=cv2.INTER_NEAREST) / 255.0
    target_lf = cv2.resize(cv2.GaussianBlur(target, (11, 11), 5), size) / 255.0
    pred_lf = cv2.resize(cv2.GaussianBlur(prediction, (11, 11), 5), size) / 255.0
    in_mse = _original_masked_mse(pred_lf, target_lf, resized_mask)
    modified_target = np.where(resized_mask > 0, target_lf, 0) + np.where(1 - resized_mask > 0, 1.0, 0.0)
    return in_mse, _original_masked_mse(pred_lf, modified_target, 1 - resized_mask)


def _original_lfmse_sobel(prediction: np.ndarray, target: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    """metrics/lfmse.py:44-49, verbatim in its arithmetic."""
    in_target = np.where(np.array(mask) > 0, np.array(target), 0)
    modified_target = in_target / np.max(in_target) + np.where(1 - np.array(mask) > 0, 1.0, 0.0)
    in_mse = _original_masked_mse(prediction / np.max(prediction), in_target / np.max(in_target), np.array(mask))
    out_mse = _original_masked_mse(prediction / np.max(prediction), modified_target, 1 - np.array(mask))
    return in_mse, out_mse


def _original_diffcc(prediction: np.ndarray, target: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """metrics/diffcc.py:17-40 (torch, as there) on uint8 arrays."""
    import cv2

    size = (target.shape[1] // 8, target.shape[1] // 8)
    resized_mask = torch.from_numpy(cv2.resize(mask, size, interpolation=cv2.INTER_NEAREST)) / 255.0
    target_tensor = torch.from_numpy(cv2.resize(cv2.GaussianBlur(target, (11, 11), 5), size)) / 255.0
    pred_tensor = torch.from_numpy(cv2.resize(cv2.GaussianBlur(prediction, (11, 11), 5), size)) / 255.0
    total_ones_inside = torch.count_nonzero(target_tensor.view(-1)[resized_mask.view(-1) > 0])
    diff_in = (target_tensor - pred_tensor) * resized_mask
    pred_out = pred_tensor * (1 - resized_mask)
    # The counts as ints: the original's `int / tensor` rounds the fraction to float32; ours are float64.
    return {"coincidence": 1 - diff_in[diff_in > 0].shape[0] / int(total_ones_inside),
            "hallucination_in": diff_in[diff_in < 0].shape[0] / int(torch.count_nonzero(resized_mask)),
            "hallucination_out": pred_out[pred_out > 0].shape[0] / int(torch.count_nonzero(1 - resized_mask))}


def _original_sobel_image(rgb: np.ndarray) -> np.ndarray:
    """data/utils.py:34-37 without torchvision or kornia: PIL 'L'; ToTensor (/255, float32); Normalize(0.5, 0.5);
    kornia.filters.sobel (kernels / 8, replicate padding, sqrt(gx² + gy² + 1e-6)); ToPILImage (mul(255).byte())."""
    from PIL import Image

    grey = np.array(Image.fromarray(rgb).convert("L"))
    tensor = (torch.from_numpy(grey).to(torch.float32).div(255) - 0.5) / 0.5
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
    kernel = (torch.stack([kx, kx.t()]) / 8.0)[:, None]
    grads = F.conv2d(F.pad(tensor[None, None], (1, 1, 1, 1), mode="replicate"), kernel)[0]
    return torch.sqrt(grads[0] * grads[0] + grads[1] * grads[1] + 1e-6).mul(255)   # before .byte()


def _cells(values: np.ndarray, cell: int = 8) -> np.ndarray:
    """A uint8 map of constant cell×cell blocks (so a nearest resize to 1/cell picks each block's value)."""
    return np.kron(values, np.ones((cell, cell))).astype(np.uint8)


SOFT = _cells(np.array([[0, 0, 0, 0, 0, 0, 0, 0],
                        [0, 40, 40, 90, 90, 40, 40, 0],
                        [0, 90, 255, 255, 255, 255, 160, 0],
                        [0, 90, 255, 255, 255, 255, 160, 0],
                        [0, 160, 255, 255, 255, 255, 90, 0],
                        [0, 160, 255, 255, 255, 255, 90, 0],
                        [0, 40, 200, 200, 128, 128, 40, 0],
                        [0, 0, 0, 0, 0, 0, 0, 0]]))    # a white core, grey fringe of 40..200, black border


def _soft_pair() -> tuple[np.ndarray, np.ndarray]:
    generated, condition = _outline(lo=12, hi=51), _outline()
    generated[30, 4:60] = 255                            # a line across the fringe and the core
    condition[20:44, 40] = 255
    return generated, condition


def test_mask_sides_threshold_and_original() -> None:
    mask = np.array([[0, 1, 127, 128, 254, 255]], np.uint8)
    inside, outside = mask_sides(mask)
    assert inside.tolist() == [[False, False, False, True, True, True]] and np.array_equal(outside, ~inside)
    inside, outside = mask_sides(mask, "original")
    assert inside.tolist() == [[False, True, True, True, True, True]]
    assert outside.tolist() == [[True, True, True, True, True, False]]
    assert all(np.array_equal(a, b) for a, b in zip(mask_sides(MASK), mask_sides(MASK, "original")))
    with pytest.raises(ValueError, match="soft_mask must be one of .*'threshold'.*got 'half'"):
        mask_sides(mask, "half")
    with pytest.raises(ValueError, match="soft_mask"):
        lf_mse(_outline(), _outline(), MASK, soft_mask="any")


def test_canny_metrics_original_reading_is_the_originals_and_differs_from_the_threshold_on_a_soft_mask() -> None:
    generated, condition = _soft_pair()
    original = lf_mse(generated, condition, SOFT, soft_mask="original")
    assert (original["in"], original["out"]) == _original_lfmse_canny(generated, condition, SOFT)   # exact
    assert original["total"] == original["in"] + original["out"]
    assert diffcc(generated, condition, SOFT, soft_mask="original") == _original_diffcc(generated, condition, SOFT)
    # The default splits at 0.5: the original's formulas on the mask thresholded at 128 (exactly), and other numbers.
    threshold = lf_mse(generated, condition, SOFT)
    binary = np.where(SOFT >= 128, 255, 0).astype(np.uint8)
    assert (threshold["in"], threshold["out"]) == _original_lfmse_canny(generated, condition, binary)
    assert diffcc(generated, condition, SOFT) == _original_diffcc(generated, condition, binary)
    assert threshold["in"] != original["in"] and threshold["out"] != original["out"]
    assert diffcc(generated, condition, SOFT) != diffcc(generated, condition, SOFT, soft_mask="original")
    # On a binary mask the two readings are one.
    assert lf_mse(generated, condition, MASK) == lf_mse(generated, condition, MASK, soft_mask="original")


def test_sobel_image_is_the_originals_get_sobel_image() -> None:
    from PIL import Image

    rgb = np.random.default_rng(1).integers(100, 160, (16, 16, 3), dtype=np.uint8)   # gradients < 1: no overflow
    assert np.array_equal(luma(rgb), np.array(Image.fromarray(rgb).convert("L")))
    before_byte = _original_sobel_image(rgb)
    assert before_byte.max() < 255 and before_byte.min() >= 0
    assert np.array_equal(sobel_image(rgb), before_byte.to(torch.uint8).numpy())
    assert np.array_equal(sobel_image(luma(rgb)), sobel_image(rgb))
    # A full-contrast corner's magnitude is above 1: the original's `.byte()` wraps it; ours saturates at 255.
    square = np.zeros((16, 16, 3), np.uint8)
    square[4:12, 4:12] = 255
    before_byte = _original_sobel_image(square)
    assert before_byte.max() > 256
    assert np.array_equal(sobel_image(square), before_byte.clamp(max=255).to(torch.uint8).numpy())
    assert sobel_image(square)[4, 4] == 255 and before_byte[4, 4] > 255    # the corner: 270 before `.byte()`


def test_sobel_lf_mse_is_the_originals_update_sobel() -> None:
    rng = np.random.default_rng(2)
    generated = sobel_image(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    condition = sobel_image(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    box = np.zeros((16, 16), np.uint8)
    box[4:12, 3:10] = 255
    soft = box.copy()
    soft[2:4, 3:14] = 100                                                # a grey band above the box
    soft[12, 3:10] = 200
    for mask, reading in ((box, "threshold"), (box, "original"), (soft, "original")):
        ours = lf_mse_sobel(generated, condition, mask, soft_mask=reading)
        # The original on a 0..1 mask; with its uint8 PIL mask `1 - mask` wraps (255 -> 2) and all is "outside".
        assert (ours["in"], ours["out"]) == _original_lfmse_sobel(generated, condition, mask / 255.0)   # exact
        assert ours["total"] == ours["in"] + ours["out"]
    assert (1 - box > 0).all()
    assert lf_mse_sobel(generated, condition, box)["out"] != _original_lfmse_sobel(generated, condition, box)[1]
    threshold = lf_mse_sobel(generated, condition, soft)
    original = lf_mse_sobel(generated, condition, soft, soft_mask="original")
    assert threshold["in"] != original["in"] and threshold["out"] != original["out"]
    binary = np.where(soft >= 128, 1.0, 0.0)
    assert (threshold["in"], threshold["out"]) == _original_lfmse_sobel(generated, condition, binary)
    # The original's outside target 1.0; 0.0 is the "no edges" reading: outside, the generated map's own mean square.
    outside = (generated / generated.max())[box == 0]
    no_edges = lf_mse_sobel(generated, condition, box, outside_target=0.0)["out"]
    assert no_edges == pytest.approx((outside ** 2).mean(), rel=1e-15, abs=0)
    # A zero maximum (a flat generated image, or no condition edge inside) is NaN, as the original's 0/0.
    assert all(math.isnan(v) for v in lf_mse_sobel(np.zeros_like(generated), condition, box).values())
    assert all(math.isnan(v) for v in lf_mse_sobel(generated, np.where(box > 0, 0, condition), box).values())
    with pytest.raises(ValueError, match="one size.*resize the condition and the mask"):
        lf_mse_sobel(generated, condition[:8], box)


# ---------------------------------------------------------------- SD3/SD3.5 and Flux ControlNet tokens

from multicond.core.adapter import mask_tokens, token_grid, token_mask  # noqa: E402


def test_token_grid_is_the_ceiling_of_half_the_latent() -> None:
    assert token_grid((16, 12)) == (8, 6) and token_grid((9, 13)) == (5, 7) and token_grid((128, 128)) == (64, 64)


def test_token_mask_is_the_grid_mask_flattened_row_major() -> None:
    mask = torch.rand(1, 16 * 8, 12 * 8)                        # at pixel resolution, a 16x12 latent
    weights = token_mask(mask, (16, 12))
    assert weights.shape == (1, 48, 1) and weights.dtype == torch.float32
    # nearest from 128x96 to 8x6 takes every 16th pixel; row-major as Flux's `b c (h ph) (w pw) -> b (h w) ...`
    assert torch.equal(weights[0, :, 0], mask[0, ::16, ::16].reshape(-1))
    latent = torch.rand(2, 10, 16)                               # at latent resolution, wide, two masks
    assert torch.equal(token_mask(latent, (10, 16))[..., 0], latent[:, ::2, ::2].reshape(2, -1))


def test_token_mask_of_an_odd_latent_keeps_each_token_at_its_place() -> None:
    mask = torch.zeros(9, 13)
    mask[:, :6] = 1.0                                            # latent columns 0-5: tokens 0-2
    weights = token_mask(mask, (9, 13)).view(5, 7)
    # Stretched over the padded 7-token row, token 3 would read column 5 (inside); in place it reads column 6.
    assert weights[:, :3].eq(1).all() and weights[:, 3:].eq(0).all()
    bottom = torch.zeros(9, 13)
    bottom[8] = 1.0                                              # the last latent row: the padded token row repeats it
    assert token_mask(bottom, (9, 13)).view(5, 7)[4].eq(1).all()


@pytest.mark.parametrize("mode,feather", [("nearest", 0.0), ("bilinear", 0.0), ("area", 3.0)])
def test_token_masks_of_ones_and_zeros_are_exact(mode: str, feather: float) -> None:
    assert token_mask(torch.ones(64, 48), (16, 12), mode, feather).eq(1.0).all()
    assert token_mask(torch.zeros(64, 48), (16, 12), mode, feather).eq(0.0).all()


def test_a_repeated_residual_is_multiplied_once_out_of_place() -> None:
    shared, other = torch.randn(4, 48, 8), torch.randn(4, 48, 8)
    before = shared.clone()
    mask = torch.zeros(16, 12)
    mask[:, :6] = 1.0                                            # the left half: token columns 0..2
    out = mask_tokens([shared, shared, None, other, shared], mask, (16, 12))
    assert out[0] is out[1] is out[4] and out[2] is None and out[3] is not out[0]
    assert torch.equal(shared, before)                           # the host's tensor is never written to
    left = torch.zeros(8, 6, dtype=torch.bool)
    left[:, :3] = True
    left = left.reshape(-1)
    assert torch.equal(out[0][:, left], shared[:, left]) and out[0][:, ~left].eq(0).all()
    assert torch.equal(out[3], other * token_mask(mask, (16, 12)))


def test_mask_tokens_repeats_the_mask_batch_per_chunk() -> None:
    residual = torch.ones(4, 48, 3)                               # [uncond 0, uncond 1, cond 0, cond 1]
    masks = torch.stack([torch.ones(16, 12), torch.zeros(16, 12)])
    (out,) = mask_tokens([residual], masks, (16, 12))
    assert out[[0, 2]].eq(1).all() and out[[1, 3]].eq(0).all()


def test_mask_tokens_rejects_other_token_counts_and_batches() -> None:
    with pytest.raises(ValueError, match="not \\(batch, 48 image tokens, channels\\) for a 16x12 latent"):
        mask_tokens([torch.ones(2, 40, 3)], torch.ones(16, 12), (16, 12))
    with pytest.raises(ValueError, match="not \\(batch, 48 image tokens"):
        mask_tokens([torch.ones(2, 4, 8, 6)], torch.ones(16, 12), (16, 12))
    with pytest.raises(ValueError, match="mask batch \\(2\\) must divide the residual batch \\(3\\)"):
        mask_tokens([torch.ones(3, 48, 3)], torch.ones(2, 16, 12), (16, 12))
