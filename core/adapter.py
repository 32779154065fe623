"""Localized control with a masked T2I-Adapter (Domingo-Gregorio et al., `imatge-upc/localized-diffusion`).

The adapter's feature maps are multiplied by the mask resized to each map's size, in training and
at inference alike (`mask_features`); an SD3/SD3.5 or Flux ControlNet's image-token residuals by the mask
resized to the token grid (`token_mask`, `mask_tokens`). Training draws one random box mask per sample
(`random_box_mask`), cubic timesteps (`cubic_timesteps`) and minimises the paper's
`PredX0EdgeMSELoss` (`localized_loss`): the noise MSE plus λ(t) times the MSE between the Sobel
magnitudes of the predicted and the true clean latent inside the mask. A canny adapter takes the
1-channel edge map (`expand_condition` repeats it for a 3-channel one). The paper's local-control
metrics: `lf_mse` and `diffcc` on Canny edge maps, `lf_mse_sobel` on Sobel maps (`sobel_image`).
A soft mask is read by `mask_sides`: thresholded at 0.5 by default, or the original's way.

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
SoftMask = Literal["threshold", "original"]
SOFT_MASKS: tuple[str, ...] = ("threshold", "original")
ConditionName = Literal["sobel", "canny"]
CONDITION_NAMES: tuple[str, ...] = ("sobel", "canny")  # the first: the original's evaluation (evaluate_metrics.py:20)
CONDITION_CHANNELS: tuple[int, ...] = (1, 3)  # a canny adapter's input: the map (adapter_canny.yaml:9), or it repeated
Map = np.ndarray | torch.Tensor                # an (H, W) edge map, Sobel map or mask: uint8 0..255, or bool/float 0..1

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


DIT_PATCH = 2  # SD3/SD3.5 and Flux.1 embed 2x2 latent patches as one image token (dit.md §2.6)


def token_grid(latent_size: tuple[int, int], patch: int = DIT_PATCH) -> tuple[int, int]:
    """The image-token grid (rows, columns) of a latent of `latent_size` (H, W): ceil(H/patch), ceil(W/patch)."""
    height, width = latent_size
    return math.ceil(height / patch), math.ceil(width / patch)


def token_mask(mask: torch.Tensor, latent_size: tuple[int, int], mode: str = "nearest", feather: float = 0.0,
               patch: int = DIT_PATCH) -> torch.Tensor:
    """The mask as image-token weights (B|1, L, 1), float32: resized to the token grid, flattened row-major.

    Row-major is the order of ComfyUI's `process_img`/`PatchEmbed` and diffusers' packing (dit.md §4.5).
    `mode` and `feather` act as in `mask_features`; a mask of ones (zeros) gives exactly 1.0 (0.0).
    A latent of odd height or width is padded to whole patches by the model: the mask is resized to the
    latent, its last row/column repeated over the padding, then halved, so each token keeps its place.
    """
    grid = token_grid(latent_size, patch)
    mask = _mask_batch(mask).float()
    padding = (grid[0] * patch - latent_size[0], grid[1] * patch - latent_size[1])
    if any(padding):
        mask = F.pad(resize_mask(mask, latent_size, mode, feather), (0, padding[1], 0, padding[0]), mode="replicate")
        feather = 0.0  # blurred once, on the latent-sized mask
    return resize_mask(mask, grid, mode, feather).flatten(1)[..., None]


def mask_tokens(residuals: Sequence[torch.Tensor | None], mask: torch.Tensor, latent_size: tuple[int, int],
                mode: str = "nearest", feather: float = 0.0, patch: int = DIT_PATCH) -> list[torch.Tensor | None]:
    """Each DiT ControlNet residual (B, L, C) times `token_mask`, out of place; None stays None.

    A tensor repeated in `residuals` (the loaders repeat one block's output over several blocks) is
    multiplied once and its repeats map to that one product, so ComfyUI's strength, applied once per
    distinct tensor, still is. A residual batch that is a multiple of the mask batch (the chunks of
    `cond_or_uncond`) gets the masks repeated. Residuals whose L is not the latent's token count raise.
    """
    weights = token_mask(mask, latent_size, mode, feather, patch)
    products: dict[int, torch.Tensor] = {}  # id -> product; the residuals hold their tensors alive, so ids are stable
    out: list[torch.Tensor | None] = []
    for residual in residuals:
        if residual is not None and id(residual) not in products:
            if residual.dim() != 3 or residual.shape[1] != weights.shape[1]:
                raise ValueError(f"a residual of shape {tuple(residual.shape)} is not (batch, {weights.shape[1]} image "
                                 f"tokens, channels) for a {latent_size[0]}x{latent_size[1]} latent in "
                                 f"{patch}x{patch} patches")
            batch = residual.shape[0]
            if batch % weights.shape[0]:
                raise ValueError(f"the mask batch ({weights.shape[0]}) must divide the residual batch ({batch})")
            scale = weights.to(residual.device, residual.dtype).repeat(batch // weights.shape[0], 1, 1)
            products[id(residual)] = residual * scale
        out.append(None if residual is None else products[id(residual)])
    return out


def expand_condition(edges: torch.Tensor, in_channels: int) -> torch.Tensor:
    """The (B, 1, H, W) edge map as an adapter with `in_channels` inputs takes it: as is for 1 (the original's
    canny adapter, config/model/adapter_canny.yaml:9), repeated for 3 (an adapter trained on RGB edge images)."""
    if edges.dim() != 4 or edges.shape[1] != 1:
        raise ValueError(f"edges must be (B, 1, H, W), got shape {tuple(edges.shape)}")
    if in_channels not in CONDITION_CHANNELS:
        raise ValueError(f"a canny adapter takes {CONDITION_CHANNELS[0]} or {CONDITION_CHANNELS[1]} input channels, "
                         f"got {in_channels}; give a canny T2I-Adapter")
    return edges.repeat(1, in_channels, 1, 1)


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


def luma(image: np.ndarray) -> np.ndarray:
    """PIL's `convert('L')` of an (H, W, 3) uint8 RGB image, exactly: (19595 R + 38470 G + 7471 B + 2¹⁵) >> 16."""
    rgb = np.asarray(image, dtype=np.uint32)
    if rgb.ndim != 3 or rgb.shape[-1] != 3:
        raise ValueError(f"image must be (H, W, 3) RGB, got shape {rgb.shape}")
    return ((rgb[..., 0] * 19595 + rgb[..., 1] * 38470 + rgb[..., 2] * 7471 + 0x8000) >> 16).astype(np.uint8)


def sobel_image(image: np.ndarray) -> np.ndarray:
    """The original's Sobel condition (data/utils.py:34-37) of an (H, W) grey or (H, W, 3) RGB uint8 image.

    Grey (PIL's 'L', `luma`) scaled to -1..1 in float32, `sobel_magnitude` (kornia.filters.sobel),
    ×255 and truncated to uint8 (ToPILImage's `mul(255).byte()`). Returns (H, W) uint8.
    """
    grey = np.asarray(image)
    grey = luma(grey) if grey.ndim == 3 else grey
    if grey.ndim != 2 or grey.dtype != np.uint8:
        raise ValueError(f"image must be (H, W) or (H, W, 3) uint8, got shape {grey.shape} {grey.dtype}")
    x = torch.from_numpy(grey.copy()).float().div(255).sub(0.5).div(0.5)[None, None]
    # Magnitudes reach √2 at strong corners: the original's `.byte()` wraps those (300 -> 44); we saturate at 255.
    return sobel_magnitude(x)[0, 0].mul(255).clamp(max=255).to(torch.uint8).numpy()


def _as_uint8(array: Map) -> np.ndarray:
    """An (H, W) map as uint8 0..255: uint8 as is, bool and floats in 0..1 scaled by 255."""
    array = array.detach().cpu().numpy() if isinstance(array, torch.Tensor) else np.asarray(array)
    array = np.squeeze(array)
    if array.ndim != 2:
        raise ValueError(f"edge maps and masks must be (H, W), got shape {array.shape}")
    if array.dtype == np.uint8:
        return array
    return np.clip(np.rint(array.astype(np.float64) * 255), 0, 255).astype(np.uint8)


def mask_sides(mask: np.ndarray, soft_mask: SoftMask = "threshold") -> tuple[np.ndarray, np.ndarray]:
    """(inside, outside) boolean maps of a uint8 0..255 mask.

    "threshold" (default): inside where ≥ 128 (0.5 of full scale), outside the rest, so every pixel
    is on one side. "original": inside where > 0 and outside where < 255 (the original's
    `mask > 0` and `1 - mask > 0` on a 0..1 mask, lfmse.py:39-41, diffcc.py:31-35), so a soft
    pixel counts on both sides. The two agree on a binary mask.
    """
    if soft_mask == "threshold":
        inside = mask >= 128
        return inside, ~inside
    if soft_mask == "original":
        return mask > 0, mask < 255
    raise ValueError(f"soft_mask must be one of {SOFT_MASKS}, got {soft_mask!r}; "
                     "'threshold' splits at 0.5, 'original' counts a soft pixel inside and outside")


def _low_frequency(edges: np.ndarray, size: tuple[int, int], kernel_size: int, sigma: float) -> np.ndarray:
    """The original's low-pass: uint8 GaussianBlur(k, σ), bilinear resize to `size` (w, h), / 255."""
    import cv2

    return cv2.resize(cv2.GaussianBlur(edges, (kernel_size, kernel_size), sigma), size) / 255.0


def _same_size(*maps: np.ndarray) -> None:
    if len({m.shape for m in maps}) != 1:
        raise ValueError(f"the maps and the mask must have one size, got {', '.join(str(m.shape) for m in maps)}; "
                         "resize the condition and the mask to the generated image")


def _metric_inputs(edges_generated: Map, edges_condition: Map, mask: Map, kernel_size: int, sigma: float,
                   downsample: int, soft_mask: SoftMask) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(generated, condition) low-passed at 1/downsample, and the (inside, outside) maps of the mask resized there."""
    import cv2

    pred, target, mask = _as_uint8(edges_generated), _as_uint8(edges_condition), _as_uint8(mask)
    _same_size(pred, target, mask)
    # (w, h) // downsample; the original takes the width for both sides (its images are square).
    size = (pred.shape[1] // downsample, pred.shape[0] // downsample)
    inside, outside = mask_sides(cv2.resize(mask, size, interpolation=cv2.INTER_NEAREST), soft_mask)
    low = (_low_frequency(edges, size, kernel_size, sigma) for edges in (pred, target))
    return (*low, inside, outside)


def _mean(values: np.ndarray) -> float:
    return float(values.mean()) if values.size else float("nan")


def _in_out_mse(pred: np.ndarray, target: np.ndarray, inside: np.ndarray, outside: np.ndarray,
                outside_target: float) -> dict[str, float]:
    """MSE to `target` inside; outside, MSE to the original's `modified_target` (lfmse.py:40, 46):
    the target where inside plus `outside_target` where outside (the constant alone on a binary mask)."""
    out_target = np.where(inside, target, 0) + np.where(outside, outside_target, 0.0)
    in_mse, out_mse = _mean(((pred - target) ** 2)[inside]), _mean(((pred - out_target) ** 2)[outside])
    return {"in": in_mse, "out": out_mse, "total": in_mse + out_mse}


def lf_mse(edges_generated: Map, edges_condition: Map, mask: Map, sigma: float = METRIC_SIGMA,
           kernel_size: int = METRIC_KERNEL, downsample: int = METRIC_DOWNSAMPLE, outside_target: float = 1.0,
           soft_mask: SoftMask = "threshold") -> dict[str, float]:
    """Low-frequency MSE of Canny edge maps inside and outside the mask (the original's metrics/lfmse.py, canny).

    Edge maps (H, W) uint8 0/255 (or 0..1 floats), mask (H, W) 0..255 (or 0..1), read by `mask_sides`:
    `soft_mask="threshold"` (default) puts a pixel inside where ≥ 0.5, outside otherwise;
    `"original"` puts it inside where > 0 and outside where < 1, so a soft pixel counts in both.
    Both edge maps are Gaussian-blurred (kernel 11, σ 5, on uint8), resized bilinearly to 1/8 and
    scaled to 0..1; the mask is resized nearest to 1/8. `in`: mean squared difference over the
    pixels inside. `out`: mean squared difference, over the pixels outside, between the generated
    map and the constant `outside_target` (plus the condition's map at soft pixels, under the
    original reading). The original compares with 1.0 there (its
    `np.where(1 - mask > 0, 1.0, 0.0)`; edges are 1 in these maps); `outside_target=0.0` is the
    "against no edges" reading. `total` = in + out. An empty side gives NaN.
    """
    pred, target, inside, outside = _metric_inputs(edges_generated, edges_condition, mask, kernel_size, sigma,
                                                   downsample, soft_mask)
    return _in_out_mse(pred, target, inside, outside, outside_target)


def lf_mse_sobel(sobel_generated: Map, sobel_condition: Map, mask: Map, outside_target: float = 1.0,
                 soft_mask: SoftMask = "threshold") -> dict[str, float]:
    """LF-MSE of Sobel maps (the original's metrics/lfmse.py:44-49, `condition_name='sobel'`).

    Maps (H, W) uint8 (`sobel_image`, or 0..1 floats), mask (H, W) read by `mask_sides` as in
    `lf_mse`. No blur and no downsampling, as the original: the generated map is divided by its
    maximum, the condition's map, zeroed outside the mask, by its maximum inside. `in`: mean squared
    difference over the pixels inside; `out`: over the pixels outside, against `outside_target`
    (plus the normalised condition at soft pixels, under the original reading); `total` = in + out.
    A map whose maximum is 0 gives NaN (the original divides by it), as does an empty side.
    """
    pred, target, mask = _as_uint8(sobel_generated), _as_uint8(sobel_condition), _as_uint8(mask)
    _same_size(pred, target, mask)
    # The original passes its uint8 0/255 PIL mask, whose `1 - mask` wraps (255 -> 2), so every pixel is "outside"
    # there (lfmse.py:46, 48); we read the mask on 0..1, as its canny variant does (lfmse.py:33, 40).
    inside, outside = mask_sides(mask, soft_mask)
    in_target = np.where(inside, target, 0)
    if not pred.max() or not in_target.max():  # the original divides by a zero maximum: NaN (lfmse.py:46-48)
        return {"in": float("nan"), "out": float("nan"), "total": float("nan")}
    return _in_out_mse(pred / np.max(pred), in_target / np.max(in_target), inside, outside, outside_target)


def diffcc(edges_generated: Map, edges_condition: Map, mask: Map, sigma: float = METRIC_SIGMA,
           kernel_size: int = METRIC_KERNEL, downsample: int = METRIC_DOWNSAMPLE,
           soft_mask: SoftMask = "threshold") -> dict[str, float]:
    """DiffCC (the original's metrics/diffcc.py), as fractions in 0..1 (the original's "percent" values are too).

    On the same low-frequency maps as `lf_mse` (1/8 size, values k/255), with d = target − generated
    and inside/outside from `mask_sides(soft_mask)` (default: split at 0.5; "original": > 0 and < 1):
    - `coincidence` = 1 − #{inside, d > 0} / #{inside, target > 0}: the share of the condition's
      low-frequency edge pixels the generated edges reach (NaN if the condition has none inside);
    - `hallucination_in` = #{inside, d < 0} / #{inside}: generated edges beyond the condition's;
    - `hallucination_out` = #{outside, generated > 0} / #{outside}: any generated edge outside.
    """
    pred, target, inside, outside = _metric_inputs(edges_generated, edges_condition, mask, kernel_size, sigma,
                                                   downsample, soft_mask)
    diff_in = (target - pred)[inside]
    target_inside = np.count_nonzero(target[inside])
    return {
        "coincidence": 1 - np.count_nonzero(diff_in > 0) / target_inside if target_inside else float("nan"),
        "hallucination_in": np.count_nonzero(diff_in < 0) / inside.sum() if inside.any() else float("nan"),
        "hallucination_out": np.count_nonzero(pred[outside] > 0) / outside.sum() if outside.any() else float("nan"),
    }
