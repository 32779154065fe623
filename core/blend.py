"""Dual-style blending (Goldszal & Mercier): two prompts in one image, blended by a spatial profile.

The profile `w(y, x)` in [0, 1] is the first prompt's weight at each latent pixel (or token); the
second prompt gets `1 - w`. It is either an analytic ramp along a direction (the original's
sigmoid or linear ramp across the width, plus a cosine ramp and any angle) or a user mask. Two
places to blend:

- epsilon: the two prompts' conditional predictions (`blend`), one UNet row per prompt;
- cross-attention: the two contexts' attention outputs in every cross-attention layer
  (`dual_context_attention`), at that layer's own height and width; on a DiT, whose text and image
  share one joint attention, the two texts' outputs for the image tokens (`dual_text_joint_attention`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .attention import Attention, sdpa_attention

SHAPES = ("sigmoid", "linear", "cosine")
# Degrees, image y pointing down: the first prompt sits at the edge the direction starts from.
DIRECTIONS = {"left to right": 0.0, "top to bottom": 90.0, "right to left": 180.0, "bottom to top": 270.0}
EPSILON_SHARPNESS = 20.0  # the original's epsilon branch: sigmoid(20 (x - 1/2)) on a 64-wide latent
CROSS_ATTENTION_SHARPNESS = 30.0  # the original's cross-attention branch


@dataclass(frozen=True)
class Profile:
    """An analytic blend profile.

    `center` is where both prompts weigh 1/2, as a fraction along the direction. `sharpness` is the
    sigmoid's slope per frame (the original's 20 or 30); `ramp_width` is the fraction of the frame
    the linear and cosine ramps span (1: the original's full-width linear ramp).
    """

    shape: str = "sigmoid"
    sharpness: float = EPSILON_SHARPNESS
    angle: float = 0.0
    center: float = 0.5
    ramp_width: float = 1.0

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"profile shape must be one of {SHAPES}, got {self.shape!r}")
        if self.ramp_width <= 0:
            raise ValueError(f"ramp_width must be positive, got {self.ramp_width}")
        if self.sharpness < 0:
            raise ValueError(f"sharpness must be 0 or more, got {self.sharpness}")


Weights = Profile | torch.Tensor  # an analytic profile, or a MASK (H, W) / (M, H, W) with 1 = the first prompt


def axis_position(height: int, width: int, angle: float) -> torch.Tensor:
    """Each pixel's position along the direction, 0 at the first prompt's edge and 1 at the far edge.

    Pixel centres are projected on the direction in pixel units, so an angle is an angle on the
    image whatever its aspect; at 0 degrees this is the original's `linspace(0, 1, W)` per row.
    """
    radians = math.radians(angle)
    # Snap cos/sin of multiples of 90 degrees to exact 0/1 so the axis directions are exact.
    cos, sin = (round(value) if abs(value - round(value)) < 1e-12 else value for value in (math.cos(radians), math.sin(radians)))
    ys = torch.arange(height, dtype=torch.float64)[:, None]
    xs = torch.arange(width, dtype=torch.float64)[None, :]
    along = xs * cos + ys * sin
    span = along.max() - along.min()
    if span <= 0:  # one pixel along the direction: it sits at the centre line
        return torch.full((height, width), 0.5, dtype=torch.float64)
    return (along - along.min()) / span


def profile_weights(profile: Profile, height: int, width: int) -> torch.Tensor:
    """The first prompt's weight, an `(height, width)` float32 tensor."""
    position = axis_position(height, width, profile.angle)
    if profile.shape == "sigmoid":
        # The original: sigmoid(k (x_lin - 1/2)) with x_lin = linspace(1, 0, W) = 1 - position.
        weights = torch.sigmoid(profile.sharpness * (profile.center - position))
    elif profile.shape == "linear":
        weights = (0.5 + (profile.center - position) / profile.ramp_width).clamp(0, 1)
    else:
        phase = (0.5 + (position - profile.center) / profile.ramp_width).clamp(0, 1)
        weights = 0.5 + 0.5 * torch.cos(math.pi * phase)
    return weights.float()


def check_mask(mask: torch.Tensor) -> str | None:
    """Why a MASK cannot weigh a blend, or None: (H, W) or (batch, H, W), not empty, values in [0, 1]."""
    if mask.ndim not in (2, 3):
        return f"a mask of shape {tuple(mask.shape)} has {mask.ndim} dimensions, not (height, width) or (batch, height, width)"
    if mask.numel() == 0:
        return f"the mask of shape {tuple(mask.shape)} is empty"
    if not bool(((mask >= 0) & (mask <= 1)).all()):  # NaN fails both comparisons
        return f"the mask has values outside 0..1 (min {float(mask.min()):g}, max {float(mask.max()):g}) or NaN"
    return None


STRETCH_TOLERANCE = 0.02  # aspect ratios closer than 2 % are rounding of sizes to multiples of 8, not a different shape


def stretch_note(mask_size: tuple[int, int], latent_size: tuple[int, int]) -> str | None:
    """What resizing a `(height, width)` mask to a latent of another aspect ratio does, or None when it keeps the shape.

    The mask is stretched to the latent, as ComfyUI's own masked conditioning does (`get_area_and_mult`
    interpolates the mask to the latent's size): said, since a region drawn on another frame moves.
    """
    mask_aspect, latent_aspect = mask_size[1] / mask_size[0], latent_size[1] / latent_size[0]
    if abs(mask_aspect / latent_aspect - 1) <= STRETCH_TOLERANCE:
        return None
    return (f"the mask is {mask_size[1]}x{mask_size[0]} (aspect {mask_aspect:.2f}) but the latent is "
            f"{latent_size[1]}x{latent_size[0]} (aspect {latent_aspect:.2f}): it is stretched to the latent, as "
            "ComfyUI's masked conditioning does; draw it at the image's aspect ratio to place regions exactly")


def mask_weights(mask: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """A `(H, W)` or `(M, H, W)` mask as `(M, height, width)` weights, resized bilinearly as ComfyUI's masked conditioning."""
    problem = check_mask(mask)
    if problem is not None:
        raise ValueError(problem)
    batch = mask.float().reshape(-1, 1, *mask.shape[-2:])
    if batch.shape[-2:] != (height, width):
        batch = F.interpolate(batch, size=(height, width), mode="bilinear", align_corners=False)
    return batch[:, 0]


def pool_weights(weights: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Latent-size `(M, H, W)` weights averaged down to a layer's `(height, width)`."""
    if weights.shape[-2:] == (height, width):
        return weights
    return F.adaptive_avg_pool2d(weights[:, None], (height, width))[:, 0]


def latent_weights(weights: Weights, height: int, width: int) -> torch.Tensor:
    """The first prompt's weight at every latent pixel, `(M, height, width)` (M = 1 for a profile)."""
    if isinstance(weights, Profile):
        return profile_weights(weights, height, width)[None]
    return mask_weights(weights, height, width)


def layer_weights(weights: Weights, latent: tuple[int, int], layer: tuple[int, int]) -> torch.Tensor:
    """The first prompt's weight per token of a layer of `layer` (height, width) in a latent of `latent`, `(M, h, w)`.

    A profile is evaluated on the layer's own grid, as the original's `linspace(0, 1, width)` in
    every layer; a mask is resized to the latent first (as ComfyUI's masked conditioning), then
    averaged down to the layer.
    """
    if isinstance(weights, Profile):
        return profile_weights(weights, *layer)[None]
    return pool_weights(mask_weights(weights, *latent), *layer)


def rows_of(weights: torch.Tensor, images: int) -> torch.Tensor:
    """Weights `(M, ...)` for the `images` of one chunk: M is 1 (all alike) or one per image."""
    if weights.shape[0] not in (1, images):
        raise ValueError(f"the mask holds {weights.shape[0]} masks for a batch of {images} images")
    return weights.expand(images, *weights.shape[1:])


def blend(first: torch.Tensor, second: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`weight * first + (1 - weight) * second` (the original's `mask * e_L + (1 - mask) * e_R`).

    On predictions this may run before classifier-free guidance: with a shared uncond u and
    guidance g, w (u + g (c1 - u)) + (1 - w)(u + g (c2 - u)) = u + g (w c1 + (1 - w) c2 - u),
    so blending the two conditional predictions equals the original's blend of the two CFG'd
    ones. The same holds for ComfyUI's denoised outputs x - sigma eps, affine in eps.
    """
    return torch.lerp(second, first, weight.to(first.dtype))


def dual_context_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, second_tokens: int,
                           weight: torch.Tensor, blended_rows: slice | list[int] | torch.Tensor,
                           attention: Attention = sdpa_attention, second_attention: Attention | None = None) -> torch.Tensor:
    """Cross-attention to two contexts whose keys and values are concatenated along tokens.

    `k`, `v` hold the first context's tokens, then the last `second_tokens` of the second. Every row
    attends to the first context; the `blended_rows` also attend to the second and take
    `weight * first + (1 - weight) * second` per image token (`weight` broadcasts to
    `(len(blended_rows), N, 1)`). `second_attention` (default: `attention`) attends to the second context. The original blends the per-head outputs before `to_out`, which is
    the same: `to_out` is affine and the weights sum to one.
    """
    first_tokens = k.shape[1] - second_tokens
    if second_tokens <= 0 or first_tokens <= 0:
        raise ValueError(f"cannot split {k.shape[1]} context tokens into a first context and {second_tokens} second tokens")
    out = attention(q, k[:, :first_tokens], v[:, :first_tokens], heads, None)
    rows_q = q[blended_rows]
    if rows_q.shape[0] == 0:
        return out
    second = (second_attention or attention)(rows_q, k[blended_rows, first_tokens:], v[blended_rows, first_tokens:], heads, None)
    out[blended_rows] = blend(out[blended_rows], second, weight)
    return out


Span = tuple[int, int]  # [start, stop) of a run of tokens in a joint sequence


def dual_text_joint_attention(attend: Callable[[torch.Tensor, list[int] | None], torch.Tensor], tokens: int,
                              first_text: Span, second_text: Span, image: Span, weight: torch.Tensor,
                              device: torch.device | None = None, second_rows: list[int] | None = None) -> torch.Tensor:
    """The cross-attention blend inside one joint attention (dit.md §4.3, way (c): a split softmax).

    The two prompts' text tokens never see each other: every token but the second text attends in one pass
    (the first prompt's), every token but the first text in another (the second's). The image tokens take
    `weight * first + (1 - weight) * second`, the UNet blend of the two cross-attention outputs, each text
    its own pass, any other token (e.g. Kontext references) the first pass; with a weight of 1 everywhere
    the result is the first prompt's attention exactly. `attend(index, rows)` runs the joint attention on the
    tokens at `index` (ascending positions) of the batch rows `rows` (None: all) and returns
    `(rows, len(index), C)`; `weight` broadcasts to `(B, image tokens, 1)`. `second_rows` (None: all) limits the
    second pass to the rows that blend (not the uncond ones, whose weight is 1): the others' image tokens are the
    first pass's, and their second-text tokens, which no image token of theirs ever reads, are left zero.
    """
    positions = torch.arange(tokens, device=device)
    without_second = positions[(positions < second_text[0]) | (positions >= second_text[1])]
    without_first = positions[(positions < first_text[0]) | (positions >= first_text[1])]
    first = attend(without_second, None)
    out = first.new_zeros(first.shape[0], tokens, first.shape[-1])
    out[:, without_second] = first
    if second_rows is not None and not second_rows:  # no row blends (a call of uncond rows only)
        return out
    second = attend(without_first, second_rows)
    rows = slice(None) if second_rows is None else second_rows
    before = lambda span, gap: span[0] - (gap[1] - gap[0] if gap[0] < span[0] else 0)  # noqa: E731 - start in a pass
    second_start = before(second_text, first_text)
    out[rows, second_text[0]:second_text[1]] = second[:, second_start:second_start + second_text[1] - second_text[0]]
    length = image[1] - image[0]
    first_image, second_image = before(image, second_text), before(image, first_text)
    row_weight = weight if weight.shape[0] == 1 else weight[rows]
    out[rows, image[0]:image[1]] = blend(first[rows, first_image:first_image + length],
                                         second[:, second_image:second_image + length], row_weight)
    return out


def side_factor(weight: torch.Tensor, totals: tuple[torch.Tensor, torch.Tensor], sides: tuple[bool, bool]) -> torch.Tensor:
    """What to multiply one prompt entry's own weight by so a host's weighted average is the blend.

    A host that mixes entries as sum(m_e eps_e) / sum(m_e) (ComfyUI's masked conditioning) gives
    w * avg_1 + (1 - w) * avg_2, each side averaged over its own entries, when entry e's weight
    m_e is scaled by sum over its sides s of w_s / total_s (w_1 = w, w_2 = 1 - w; total_s the
    summed weight of side s): the scaled weights sum to one wherever a side has any weight.
    """
    factor = torch.zeros_like(weight)
    for side_weight, total, member in zip((weight, 1 - weight), totals, sides):
        if member:
            factor = factor + torch.where(total > 0, side_weight / total.clamp_min(torch.finfo(total.dtype).tiny), 0.0)
    return factor
