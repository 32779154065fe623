"""InfSplign (Rastegar et al.): objects where the prompt puts them, by guiding with attention maps.

At each guided step the conditional rows' cross-attention probabilities of two object words,
taken from a few decoder layers, are resized to 64x64; each map's centroid and spatial variance
give a loss (`guidance_loss`) whose gradient with respect to the latent is added to the
noise prediction (`guided_denoised` states that update in a k-diffusion host's terms).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from .layers import LayerId, UNetLayout

MAP_SIZE = 64  # the original resizes every map to 64x64 (TF.resize, antialias)
RELATIONS = ("left of", "right of", "above", "below", "next to")
# Phrases of the original's benchmark vocabularies (VISOR, T2I-CompBench, GenEval), longest first when matched.
RELATION_PHRASES = {
    "to the left of": "left of", "on the left of": "left of", "on the left side of": "left of", "left of": "left of",
    "to the right of": "right of", "on the right of": "right of", "on the right side of": "right of",
    "right of": "right of", "above": "above", "on top of": "above", "over": "above", "below": "below",
    "under": "below", "underneath": "below", "beneath": "below", "next to": "next to", "near": "next to",
    "beside": "next to", "on side of": "next to", "on the side of": "next to",
}
ARTICLES = frozenset({"a", "an", "the", "one", "two", "some", "this", "that", "its", "his", "her", "their", "my"})
PHRASE_BREAKS = re.compile(r"[,.;:!?]|\b(?:and|with|in|on|at|of|while|which|that|under|near)\b")

PRESENCE, BALANCE = "presence", "balance"


def _logrelu(x: torch.Tensor) -> torch.Tensor:
    return torch.log1p(F.relu(x))


# The original's choices of phi (`spatial_loss`); gelu is its default.
PHI: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu, "sigmoid": torch.sigmoid, "relu": F.relu, "leaky_relu": lambda x: F.leaky_relu(x, 0.05),
    "squared_relu": lambda x: F.relu(x) ** 2, "selu": F.selu, "softplus": F.softplus, "silu": F.silu,
    "hardtanh": lambda x: F.hardtanh(x, 0.0, 1.0), "linear": lambda x: x, "rrelu": lambda x: F.rrelu(x, training=False),
    "celu": F.celu, "logrelu": _logrelu, "elu": F.elu, "softsign": F.softsign,
}


@dataclass(frozen=True)
class SpatialSettings:
    """The loss and update of InfSplign with the original's defaults (`pipeline_batch.py`)."""

    relation: str = "left of"
    phi: str = "gelu"
    alpha: float = 0.75
    margin: float = 0.25
    lambda_spatial: float = 1.0
    lambda_presence: float = 1.0
    lambda_balance: float = 1.0
    weight: float = 1000.0  # sg_grad_wt, on the original's epsilon scale

    def __post_init__(self) -> None:
        if self.relation not in RELATIONS:
            raise ValueError(f"relation must be one of {RELATIONS}, got {self.relation!r}")
        if self.phi not in PHI:
            raise ValueError(f"phi must be one of {tuple(PHI)}, got {self.phi!r}")


# --- words and tokens ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SpatialPrompt:
    object_a: str
    relation: str
    object_b: str


def _head_word(phrase: str, last: bool) -> str:
    words = [w for w in re.findall(r"[\w'-]+", phrase.lower()) if w not in ARTICLES]
    if not words:
        return ""
    return words[-1] if last else words[0]


def parse_relation(prompt: str) -> SpatialPrompt | None:
    """"a red cat to the left of a dog in a park" -> (cat, left of, dog); None without a relation phrase.

    Object A is the last word before the relation (after the last break); object B the last word
    of the phrase after it, up to the next break: the head nouns of simple English noun phrases.
    """
    text = prompt.lower()
    for phrase in sorted(RELATION_PHRASES, key=len, reverse=True):
        match = re.search(rf"\b{re.escape(phrase)}\b", text)
        if match is None:
            continue
        before = PHRASE_BREAKS.split(text[:match.start()])[-1]
        after = PHRASE_BREAKS.split(text[match.end():])
        after = next((part for part in after if part and part.strip()), "")
        object_a, object_b = _head_word(before, last=True), _head_word(after, last=True)
        if object_a and object_b:
            return SpatialPrompt(object_a, RELATION_PHRASES[phrase], object_b)
    return None


def find_subsequence(sequence: Sequence[int], part: Sequence[int], exclude: Sequence[int] = ()) -> list[int]:
    """Positions of the first occurrence of `part` in `sequence` that avoids `exclude` (the original's sub-sequence search)."""
    blocked = set(exclude)
    for start in range(len(sequence) - len(part) + 1):
        positions = list(range(start, start + len(part)))
        if list(sequence[start:start + len(part)]) == list(part) and not blocked.intersection(positions):
            return positions
    return []


# --- maps, centroids, loss ----------------------------------------------------------------------


def attention_with_maps(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention output and its head-averaged probabilities `(B, N, T)`, from one softmax (as `get_attention_scores`)."""
    batch, tokens, width = q.shape
    split = lambda t: t.reshape(batch, -1, heads, width // heads).transpose(1, 2)  # noqa: E731
    precision = torch.promote_types(q.dtype, torch.float32)  # softmax in at least float32, as upcast attention
    scores = split(q).to(precision) @ split(k).to(precision).transpose(-1, -2) * (width // heads) ** -0.5
    probs = scores.softmax(dim=-1)
    out = (probs.to(v.dtype) @ split(v)).transpose(1, 2).reshape(batch, tokens, width)
    return out, probs.mean(dim=1)


def object_map(probs: torch.Tensor, height: int, width: int, tokens: Sequence[int]) -> torch.Tensor:
    """`(B, 64, 64)`: the mean of a word's token maps at the layer's own (height, width), resized as the original."""
    maps = probs[..., list(tokens)].mean(dim=-1).reshape(probs.shape[0], 1, height, width)
    return F.interpolate(maps, size=(MAP_SIZE, MAP_SIZE), mode="bilinear", align_corners=False, antialias=True)[:, 0]


def centroid_and_variance(maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Centroid (x, y) and spatial variance of `(..., H, W)` maps on linspace(0, 1) coordinates (y grows downward)."""
    height, width = maps.shape[-2:]
    ys = torch.linspace(0, 1, height, device=maps.device, dtype=maps.dtype)[:, None]
    xs = torch.linspace(0, 1, width, device=maps.device, dtype=maps.dtype)[None, :]
    mass = maps.sum(dim=(-2, -1))
    cx = (maps * xs).sum(dim=(-2, -1)) / mass
    cy = (maps * ys).sum(dim=(-2, -1)) / mass
    spread = (xs - cx[..., None, None]) ** 2 + (ys - cy[..., None, None]) ** 2
    return cx, cy, (maps * spread).sum(dim=(-2, -1)) / mass


def relation_distance(relation: str, a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """d, positive when the relation holds: "A left of B" is x_B - x_A; above is y_B - y_A (y grows downward)."""
    (ax, ay), (bx, by) = a, b
    if relation == "left of":
        return bx - ax
    if relation == "right of":
        return ax - bx
    if relation == "above":
        return by - ay
    if relation == "below":
        return ay - by
    return (ax - bx).abs()  # next to: the original's |x_A - x_B|


def spatial_term(distance: torch.Tensor, settings: SpatialSettings) -> torch.Tensor:
    """phi(alpha (margin - d)): the hinge that is low once d exceeds the margin."""
    return PHI[settings.phi](settings.alpha * (settings.margin - distance))


def compound_loss(map_a: torch.Tensor, map_b: torch.Tensor, settings: SpatialSettings, presence: bool,
                  balance: bool) -> torch.Tensor:
    """Per image: lambda_spatial L_sp, plus lambda_presence (var_A + var_B) and lambda_balance |var_A - var_B| when asked."""
    ax, ay, var_a = centroid_and_variance(map_a)
    bx, by, var_b = centroid_and_variance(map_b)
    loss = settings.lambda_spatial * spatial_term(relation_distance(settings.relation, (ax, ay), (bx, by)), settings)
    if presence:
        loss = loss + settings.lambda_presence * (var_a + var_b)
    if balance:
        loss = loss + settings.lambda_balance * (var_a - var_b).abs()
    return loss


def layer_loss(map_a: torch.Tensor, map_b: torch.Tensor, role: str, settings: SpatialSettings) -> torch.Tensor:
    """Per image: lambda_spatial L_sp + lambda_E L_E, L_E = var_A + var_B (presence) or |var_A - var_B| (balance)."""
    return compound_loss(map_a, map_b, settings, presence=role == PRESENCE, balance=role != PRESENCE)


@dataclass(frozen=True)
class LayerMaps:
    """One layer's head-averaged cross-attention probabilities of the guided rows."""

    probs: torch.Tensor  # (B, N, T)
    height: int
    width: int
    role: str


def guidance_loss(layers: Sequence[LayerMaps], tokens_a: Sequence[int], tokens_b: Sequence[int],
                  settings: SpatialSettings) -> torch.Tensor:
    """The per-image loss `(B,)`: the mean over the layers of `layer_loss` (the original's `stack(...).mean()`)."""
    if not layers:
        raise ValueError("no cross-attention maps were recorded for the guidance")
    losses = [layer_loss(object_map(layer.probs, layer.height, layer.width, tokens_a),
                         object_map(layer.probs, layer.height, layer.width, tokens_b), layer.role, settings)
              for layer in layers]
    return torch.stack(losses).mean(dim=0)


def guided_denoised(denoised: torch.Tensor, sigma: torch.Tensor, gradient: torch.Tensor, weight: float) -> torch.Tensor:
    """The original's eps <- eps + w dL/dx_t, for a host that predicts denoised = x - sigma eps from x = x_t sqrt(1 + sigma^2).

    The original differentiates with respect to the VP latent x_t = x / sqrt(1 + sigma^2), the
    UNet's input; `gradient` is dL/dx, so dL/dx_t = sqrt(1 + sigma^2) dL/dx. The eps update then
    moves denoised by -sigma w dL/dx_t.
    """
    sigma = sigma.reshape(-1, *[1] * (denoised.ndim - 1)).to(denoised)
    return denoised - sigma * weight * torch.sqrt(1 + sigma**2) * gradient.to(denoised)


# --- layers ---------------------------------------------------------------------------------------


def guidance_layers(layout: UNetLayout) -> dict[LayerId, str]:
    """The original's greenlisted decoder layers, each with its loss role, assigned by resolution.

    SD1.x/2.x: the first transformer block of every attention in the two coarsest decoder levels with
    attention (up_blocks.1 and .2, 16x16 and 32x32 at 512 px). SDXL: transformer blocks 1-3 of the
    second attention of the coarsest decoder level (up_blocks.0.attentions.1, 32x32 at 1024 px).
    Roles as the original, which gives the presence term to layers whose name holds "blocks.1"
    (InfSplign `self_guide_batch.py:278`): on SD1.x/2.x the coarser level (up_blocks.1), on SDXL
    transformer_blocks.1 alone; every other guided layer gets the balance term.
    """
    levels = [level for level in reversed(range(len(layout.depths))) if layout.depths[level]]
    if layout.family == "sdxl":
        level = levels[0]
        layers = [layer for layer in layout.level_layers(level, "output")
                  if layer.number == layout.level_layers(level, "output")[0].number + 1 and 1 <= layer.depth <= 3]
        return {layer: PRESENCE if layer.depth == 1 else BALANCE for layer in layers}
    chosen: dict[LayerId, str] = {}
    for rank, level in enumerate(levels[:2]):
        for layer in layout.level_layers(level, "output"):
            if layer.depth == 0:
                chosen[layer] = PRESENCE if rank == 0 else BALANCE
    return chosen


# --- SD3/SD3.5: joint attention (InfSplign's sd3_guidance_modular.py, dit.md section 4.4) ---------------------

CLIP_TOKENS = 77  # SD3's text is [CLIP-L+G (77 tokens), T5]: the seed reads the CLIP part only
THRESHOLD_QUANTILE, THRESHOLD_STEEPNESS = 0.5, 50.0  # the seed's soft threshold (GuidanceConfig)
SEED_DEPTH = 24  # SD3-medium, the model the seed's block numbers are for
EARLY_BLOCKS, LATE_BLOCKS = (4, 8), (8, 10)  # the seed's blocks 4-7 and 8-9 (get_adaptive_blocks), half-open
LATE_FRACTION = 0.35  # the seed measures the late blocks once (N - i) / N <= 0.35
SEED_STEP, SEED_WEIGHT = 30.0, 1000.0  # the seed's latent step 30 at the node's default weight (the paper's 1000)
ROW_CHUNK = 256  # image query rows per log-sum-exp chunk: bounds the rows x all-keys matrix the backward holds


def _row_logsumexp(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    return (q @ k.transpose(-1, -2) * scale).logsumexp(dim=-1)


def image_text_probabilities(q: torch.Tensor, k: torch.Tensor, image: tuple[int, int], text: tuple[int, int],
                             chunk: int = ROW_CHUNK) -> torch.Tensor:
    """`(B, L_i, T)`: the head-averaged joint softmax(q k^T / sqrt(d)) of image query rows x text key columns.

    q, k are `(B, H, L, D)`; `image` and `text` are `(start, stop)` spans of the sequence. The softmax's
    normaliser is a log-sum-exp over all keys, chunked over image rows (and recomputed chunk by chunk in the
    backward pass), so the `(B, H, L_i, L)` probability matrix of the seed's explicit softmax never exists.
    """
    precision = torch.promote_types(q.dtype, torch.float32)  # softmax in at least float32, as upcast attention
    q_image = q[:, :, image[0]:image[1]].to(precision)
    keys = k.to(precision)
    scale = q.shape[-1] ** -0.5
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)
    parts = []
    for start in range(0, q_image.shape[2], chunk):
        rows = q_image[:, :, start:start + chunk]
        parts.append(torch.utils.checkpoint.checkpoint(_row_logsumexp, rows, keys, scale, use_reentrant=False)
                     if grad else _row_logsumexp(rows, keys, scale))
    lse = torch.cat(parts, dim=2)
    scores = q_image @ keys[:, :, text[0]:text[1]].transpose(-1, -2) * scale
    return (scores - lse[..., None]).exp().mean(dim=1)


def soft_threshold(maps: torch.Tensor, quantile: float = THRESHOLD_QUANTILE,
                   steepness: float = THRESHOLD_STEEPNESS) -> torch.Tensor:
    """`(B, H, W)` maps times sigmoid(steepness (A - q(A))), q the per-map quantile (seed: apply_soft_threshold)."""
    threshold = torch.quantile(maps.flatten(1).float(), quantile, dim=1).to(maps.dtype)
    return maps * torch.sigmoid(steepness * (maps - threshold[:, None, None]))


def joint_object_map(probs: torch.Tensor, grid: tuple[int, int], tokens: Sequence[int]) -> torch.Tensor:
    """`(B, h, w)`: the mean of a word's token columns on the token grid, soft-thresholded (no resize, as the seed)."""
    return soft_threshold(probs[..., list(tokens)].mean(dim=-1).reshape(probs.shape[0], *grid))


def joint_guidance_loss(blocks: Sequence[torch.Tensor], grid: tuple[int, int], tokens_a: Sequence[int],
                        tokens_b: Sequence[int], settings: SpatialSettings) -> torch.Tensor:
    """The per-image loss `(B,)` of the seed's CentroidLossStrategy on the block-averaged maps.

    The seed averages the maps over its blocks and applies presence and balance together
    (sd3_guidance_modular.py:1004-1008); the UNet version instead averages per-layer losses with one
    energy term per layer, as the paper (`guidance_loss`).
    """
    if not blocks:
        raise ValueError("no joint-attention maps were recorded for the guidance")
    probs = torch.stack(list(blocks)).mean(dim=0)
    return compound_loss(joint_object_map(probs, grid, tokens_a), joint_object_map(probs, grid, tokens_b), settings,
                         presence=True, balance=True)


def joint_guidance_blocks(depth: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(early, late) joint blocks: the seed's 4-7 and 8-9 of SD3-medium's 24, as the same fractions of `depth`.

    Each range keeps at least one block, so a 2-block model measures block 0 at every step.
    """
    def span(start: int, stop: int) -> tuple[int, ...]:
        first = min(start * depth // SEED_DEPTH, depth - 1)
        return tuple(range(first, max(stop * depth // SEED_DEPTH, first + 1)))

    return span(*EARLY_BLOCKS), span(*LATE_BLOCKS)


def flow_guided_denoised(denoised: torch.Tensor, sigma: torch.Tensor, sigma_next: float, gradient: torch.Tensor,
                         weight: float) -> torch.Tensor:
    """The seed's x <- x - s dL/dx before its Euler step (velocity reused), as a change of denoised = x - sigma v.

    An Euler step from sigma to sigma_next moves x by (sigma_next - sigma) (x - denoised) / sigma, so shifting
    denoised by -s sigma / (sigma - sigma_next) dL/dx moves the next latent by exactly -s dL/dx. The step is
    s = 30 weight / 1000: the seed's 30 at the node's default weight.
    """
    sigma = sigma.reshape(-1, *[1] * (denoised.ndim - 1)).to(denoised)
    step = SEED_STEP * weight / SEED_WEIGHT
    return denoised - step * sigma / (sigma - sigma_next) * gradient.to(denoised)
