"""Localized control with a masked T2I-Adapter (Domingo-Gregorio et al., `imatge-upc/localized-diffusion`).

The adapter's feature maps are multiplied by the mask resized to each map's size, in training and
at inference alike (`mask_features`). Training draws one random box mask per sample
(`random_box_mask`), cubic timesteps (`cubic_timesteps`) and minimises the paper's
`PredX0EdgeMSELoss` (`localized_loss`): the noise MSE plus λ(t) times the MSE between the Sobel
magnitudes of the predicted and the true clean latent inside the mask. `lf_mse` and `diffcc` are
the paper's local-control metrics on Canny edge maps.

Torch and numpy only at import (the ComfyUI nodes import `mask_features`); OpenCV is imported by
the metric functions that use it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

EdgeMethod = Literal["constant", "step_unit", "time_unit"]
EDGE_METHODS: tuple[str, ...] = ("constant", "step_unit", "time_unit")

TRAIN_STEPS = 1000
BOX_MIN_AREA = 10000          # px² at 512x512: the original's `bbox_min_area=10000`
STEP_UNIT_RANGE = (500, 999)  # t range in which `step_unit` applies λ
SOBEL_EPS = 1e-6              # kornia.filters.sobel's default eps
CANNY_THRESHOLDS = (100, 200)
METRIC_KERNEL = 11            # the original metrics' Gaussian kernel size,
METRIC_SIGMA = 5.0            # standard deviation
METRIC_DOWNSAMPLE = 8         # and downsampling factor


# ---------------------------------------------------------------- masking the features

def _mask_batch(mask: torch.Tensor) -> torch.Tensor:
    """(H, W), (B, H, W) or (B, 1, H, W) -> (B, 1, H, W)."""
    if mask.dim() == 2:
        return mask[None, None]
    if mask.dim() == 3:
        return mask[:, None]
    if mask.dim() == 4 and mask.shape[1] == 1:
        return mask
    raise ValueError(f"mask must be (H, W), (B, H, W) or (B, 1, H, W), got shape {tuple(mask.shape)}")


def gaussian_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of a (B, C, H, W) tensor, kernel 2·ceil(3σ)+1, replicate padding."""
    if sigma <= 0:
        return image
    radius = max(1, math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(image.dtype).to(image.device)
    channels = image.shape[1]
    out = F.pad(image, (radius, radius, 0, 0), mode="replicate")
    out = F.conv2d(out, kernel.view(1, 1, 1, -1).repeat(channels, 1, 1, 1), groups=channels)
    out = F.pad(out, (0, 0, radius, radius), mode="replicate")
    return F.conv2d(out, kernel.view(1, 1, -1, 1).repeat(channels, 1, 1, 1), groups=channels)


def resize_mask(mask: torch.Tensor, size: tuple[int, int], mode: str = "nearest", feather: float = 0.0) -> torch.Tensor:
    """The (B, 1, H, W) mask blurred by `feather` pixels (σ) and resized to `size`; constant masks stay exact."""
    mask = _mask_batch(mask)
    lo, hi = mask.amin(dim=(-2, -1), keepdim=True), mask.amax(dim=(-2, -1), keepdim=True)
    out = gaussian_blur(mask, feather)
    if tuple(out.shape[-2:]) != tuple(size):
        extra = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
        out = F.interpolate(out, size=tuple(size), mode=mode, **extra)
    # An all-ones (all-zeros) mask multiplies by exactly 1.0 (0.0), whatever blur and resampling round to.
    return torch.where(lo == hi, lo.expand_as(out), out)


def mask_features(features: Sequence[torch.Tensor], mask: torch.Tensor, mode: str = "nearest",
                  feather: float = 0.0) -> list[torch.Tensor]:
    """Each adapter feature map multiplied by the mask resized to its own H×W (the paper's f_k ← f_k ⊙ down(M)).

    `mask`: (H, W), (B, H, W) or (B|1, 1, H, W), at image resolution, values in 0..1. `mode` is the
    `F.interpolate` mode (nearest: as the original trains and samples); `feather` blurs the mask by a
    Gaussian of that σ in mask pixels before resizing (0: none, as the original). A feature batch
    that is a multiple of the mask batch (e.g. [uncond, cond] under CFG) gets the masks repeated.
    A mask of ones (zeros) returns the features multiplied by exactly 1.0 (0.0).
    """
    mask = _mask_batch(mask)
    out = []
    for feature in features:
        batch, (height, width) = feature.shape[0], feature.shape[-2:]
        if batch % mask.shape[0]:
            raise ValueError(f"the mask batch ({mask.shape[0]}) must divide the feature batch ({batch})")
        resized = resize_mask(mask.to(feature.device, torch.float32), (height, width), mode, feather)
        resized = resized.repeat(batch // mask.shape[0], 1, 1, 1).to(feature.dtype)
        out.append(feature * resized)
    return out


# ---------------------------------------------------------------- training draws

def _randint(low: torch.Tensor | int, high: torch.Tensor | int, count: int,
             generator: torch.Generator | None) -> torch.Tensor:
    """`count` uniform integers in [low, high], both included (Python's random.randint), bounds per draw."""
    u = torch.rand(count, generator=generator, dtype=torch.float64)
    return (torch.as_tensor(low) + (u * (torch.as_tensor(high) - low + 1)).floor().long()).long()


def random_box_mask(height: int, width: int, min_area: int = BOX_MIN_AREA,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """One random axis-aligned box of ones in a (1, H, W) float mask, area ≥ `min_area` px².

    The original's `MaskRandomizer(method='bbox')` (data/transforms.py), with torch's generator in
    place of Python's `random`: x1 ~ U{0..W-2}, y1 ~ U{0..H-2}, x2 ~ U{x1+1..W-1}, y2 ~ U{y1+1..H-1},
    redrawn until (x2-x1)(y2-y1) ≥ min_area; ones on rows y1..y2-1 and columns x1..x2-1 (so the
    last row and column are never inside).
    """
    if height < 2 or width < 2 or min_area > (height - 1) * (width - 1):
        raise ValueError(f"no box of area >= {min_area} fits the original's sampling in {height}x{width} "
                         f"(at most {(height - 1) * (width - 1)}); lower min_area")
    while True:  # rejection sampling, 256 candidates at a time: the first accepted one is the original's draw
        x1, y1 = _randint(0, width - 2, 256, generator), _randint(0, height - 2, 256, generator)
        x2, y2 = _randint(x1 + 1, width - 1, 256, generator), _randint(y1 + 1, height - 1, 256, generator)
        accepted = ((x2 - x1) * (y2 - y1) >= min_area).nonzero()
        if len(accepted):
            x1, y1, x2, y2 = (int(v[accepted[0, 0]]) for v in (x1, y1, x2, y2))
            break
    mask = torch.zeros(1, height, width)
    mask[0, y1:y2, x1:x2] = 1.0
    return mask


def cubic_timesteps(batch: int, generator: torch.Generator | None = None, train_steps: int = TRAIN_STEPS) -> torch.Tensor:
    """t = (1 − u³)·train_steps, u ~ U[0, 1), truncated and clamped to [0, train_steps − 1] (T2I-Adapter §3.4)."""
    u = torch.rand(batch, generator=generator)
    return ((1 - u ** 3) * train_steps).long().clamp(0, train_steps - 1)


# ---------------------------------------------------------------- the loss

def sobel_magnitude(latents: torch.Tensor, eps: float = SOBEL_EPS) -> torch.Tensor:
    """kornia.filters.sobel(latents, normalized=True, eps): per channel sqrt(gx² + gy² + eps).

    gx, gy: cross-correlation with the 3x3 Sobel kernels [[-1,0,1],[-2,0,2],[-1,0,1]] and its
    transpose, each divided by the sum of its absolute values (8), on a replicate-padded input.
    """
    if latents.dim() != 4:
        raise ValueError(f"latents must be (B, C, H, W), got shape {tuple(latents.shape)}")
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], dtype=latents.dtype,
                      device=latents.device) / 8.0
    channels = latents.shape[1]
    kernels = torch.stack([kx, kx.t()])[:, None].repeat(channels, 1, 1, 1)  # (2C, 1, 3, 3): gx, gy per channel
    grads = F.conv2d(F.pad(latents, (1, 1, 1, 1), mode="replicate"), kernels, groups=channels)
    gx, gy = grads[:, 0::2], grads[:, 1::2]
    return torch.sqrt(gx * gx + gy * gy + eps)


def _per_sample(value: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """A scalar or (B,) tensor as (B, 1, 1, 1) on `like`'s device."""
    value = torch.as_tensor(value, dtype=torch.float32, device=like.device)
    return value.reshape(-1, *([1] * (like.dim() - 1)))


def predicted_x0(z_t: torch.Tensor, eps: torch.Tensor, alpha_bar_t: torch.Tensor | float) -> torch.Tensor:
    """ẑ0 = (z_t − √(1−ᾱ_t)·ε) / √ᾱ_t (ε-prediction); `alpha_bar_t` scalar or per sample (B,)."""
    alpha_bar = _per_sample(alpha_bar_t, z_t)
    return (z_t - torch.sqrt(1 - alpha_bar) * eps) / torch.sqrt(alpha_bar)


def edge_lambda(method: EdgeMethod, t: torch.Tensor, alpha_bar_t: torch.Tensor, weight: float) -> torch.Tensor:
    """λ(t) per sample: constant λ; `step_unit` λ for t in [500, 999] else 0; `time_unit` (1 − ᾱ_t)·λ."""
    t = torch.as_tensor(t)
    alpha_bar_t = torch.as_tensor(alpha_bar_t, dtype=torch.float32, device=t.device).reshape(t.shape)
    if method == "constant":
        return torch.full(t.shape, float(weight), device=t.device)
    if method == "step_unit":
        low, high = STEP_UNIT_RANGE
        return torch.where((t >= low) & (t <= high), float(weight), 0.0).to(torch.float32)
    if method == "time_unit":
        return (1 - alpha_bar_t) * weight
    raise ValueError(f"method must be one of {EDGE_METHODS}, got {method!r}")


def localized_loss(eps_pred: torch.Tensor, eps: torch.Tensor, z_t: torch.Tensor, z0: torch.Tensor,
                   alpha_bar_t: torch.Tensor, t: torch.Tensor, mask_latent: torch.Tensor, weight: float = 1e-3,
                   method: EdgeMethod = "constant") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The paper's PredX0EdgeMSELoss, averaged over the batch.

    Per sample, with means over (C, H, W): ‖ε_θ − ε‖² + λ(t)·‖S(ẑ0)⊙M − S(z0)⊙M‖², where
    ẑ0 = `predicted_x0(z_t, ε_θ, ᾱ_t)`, S = `sobel_magnitude`, M = `mask_latent` (resized, nearest,
    to the latent size if it is not already). Returns (total, {"simple", "edge"}), the parts detached.
    """
    mask = _mask_batch(mask_latent).to(z0.device, torch.float32)
    if tuple(mask.shape[-2:]) != tuple(z0.shape[-2:]):
        mask = F.interpolate(mask, size=tuple(z0.shape[-2:]), mode="nearest")
    simple = F.mse_loss(eps_pred.float(), eps.float(), reduction="none").mean(dim=(1, 2, 3))
    x0 = predicted_x0(z_t.float(), eps_pred.float(), alpha_bar_t)
    edges = F.mse_loss(sobel_magnitude(x0) * mask, sobel_magnitude(z0.float()) * mask,
                       reduction="none").mean(dim=(1, 2, 3))
    edge = edge_lambda(method, t, alpha_bar_t, weight).to(edges.device) * edges
    total = (simple + edge).mean()
    return total, {"simple": simple.mean().detach(), "edge": edge.mean().detach()}


# ---------------------------------------------------------------- metrics

def canny_edges(image: np.ndarray, thresholds: tuple[int, int] = CANNY_THRESHOLDS) -> np.ndarray:
    """cv2.Canny(image, 100, 200) of an (H, W) or (H, W, 3) uint8 image: uint8, 255 on edges."""
    import cv2

    return cv2.Canny(np.ascontiguousarray(image, dtype=np.uint8), *thresholds)


def _as_uint8(array: np.ndarray | torch.Tensor) -> np.ndarray:
    """An (H, W) map as uint8 0..255: uint8 as is, bool and floats in 0..1 scaled by 255."""
    array = array.detach().cpu().numpy() if isinstance(array, torch.Tensor) else np.asarray(array)
    array = np.squeeze(array)
    if array.ndim != 2:
        raise ValueError(f"edge maps and masks must be (H, W), got shape {array.shape}")
    if array.dtype == np.uint8:
        return array
    return np.clip(np.rint(array.astype(np.float64) * 255), 0, 255).astype(np.uint8)


def _low_frequency(edges: np.ndarray, size: tuple[int, int], kernel_size: int, sigma: float) -> np.ndarray:
    """The original's low-pass: uint8 GaussianBlur(k, σ), bilinear resize to `size` (w, h), / 255."""
    import cv2

    return cv2.resize(cv2.GaussianBlur(edges, (kernel_size, kernel_size), sigma), size) / 255.0


def _metric_inputs(edges_generated, edges_condition, mask, kernel_size: int, sigma: float, downsample: int):
    import cv2

    pred, target, mask = _as_uint8(edges_generated), _as_uint8(edges_condition), _as_uint8(mask)
    if not pred.shape == target.shape == mask.shape:
        raise ValueError(f"the edge maps and the mask must have one size, got {pred.shape}, {target.shape}, {mask.shape}")
    # (w, h) // downsample; the original takes the width for both sides (its images are square).
    size = (pred.shape[1] // downsample, pred.shape[0] // downsample)
    inside = cv2.resize((mask >= 128).astype(np.uint8), size, interpolation=cv2.INTER_NEAREST) > 0
    return (_low_frequency(pred, size, kernel_size, sigma), _low_frequency(target, size, kernel_size, sigma), inside)


def _mean(values: np.ndarray) -> float:
    return float(values.mean()) if values.size else float("nan")


def lf_mse(edges_generated, edges_condition, mask, sigma: float = METRIC_SIGMA, kernel_size: int = METRIC_KERNEL,
           downsample: int = METRIC_DOWNSAMPLE, outside_target: float = 1.0) -> dict[str, float]:
    """Low-frequency MSE of Canny edge maps inside and outside the mask (the original's metrics/lfmse.py, canny).

    Edge maps (H, W) uint8 0/255 (or 0..1 floats), mask (H, W), inside where ≥ 0.5 of full scale.
    Both edge maps are Gaussian-blurred (kernel 11, σ 5, on uint8), resized bilinearly to 1/8 and
    scaled to 0..1; the mask is resized nearest to 1/8. `in`: mean squared difference over the
    pixels inside. `out`: mean squared difference, over the pixels outside, between the generated
    map and the constant `outside_target`. The original compares with 1.0 there (its
    `np.where(1 - mask > 0, 1.0, 0.0)`; edges are 1 in these maps); `outside_target=0.0` is the
    "against no edges" reading. `total` = in + out. An empty side gives NaN.
    """
    pred, target, inside = _metric_inputs(edges_generated, edges_condition, mask, kernel_size, sigma, downsample)
    in_mse = _mean((pred[inside] - target[inside]) ** 2)
    out_mse = _mean((pred[~inside] - outside_target) ** 2)
    return {"in": in_mse, "out": out_mse, "total": in_mse + out_mse}


def diffcc(edges_generated, edges_condition, mask, sigma: float = METRIC_SIGMA, kernel_size: int = METRIC_KERNEL,
           downsample: int = METRIC_DOWNSAMPLE) -> dict[str, float]:
    """DiffCC (the original's metrics/diffcc.py), as fractions in 0..1 (the original's "percent" values are too).

    On the same low-frequency maps as `lf_mse` (1/8 size, values k/255), with d = target − generated:
    - `coincidence` = 1 − #{inside, d > 0} / #{inside, target > 0}: the share of the condition's
      low-frequency edge pixels the generated edges reach (NaN if the condition has none inside);
    - `hallucination_in` = #{inside, d < 0} / #{inside}: generated edges beyond the condition's;
    - `hallucination_out` = #{outside, generated > 0} / #{outside}: any generated edge outside.
    """
    pred, target, inside = _metric_inputs(edges_generated, edges_condition, mask, kernel_size, sigma, downsample)
    diff_in = (target - pred)[inside]
    target_inside = np.count_nonzero(target[inside])
    return {
        "coincidence": 1 - np.count_nonzero(diff_in > 0) / target_inside if target_inside else float("nan"),
        "hallucination_in": np.count_nonzero(diff_in < 0) / inside.sum() if inside.any() else float("nan"),
        "hallucination_out": np.count_nonzero(pred[~inside] > 0) / (~inside).sum() if (~inside).any() else float("nan"),
    }
