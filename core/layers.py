"""Canonical attention-layer ids of every model family, and their names in ComfyUI and diffusers.

UNets (SD1.x/2.x, SDXL): a layer id is ComfyUI's patch key `(block, number, depth)`: `block` is
input/middle/output, `number` indexes `input_blocks`/`output_blocks` (0 for the middle block) and
`depth` is the transformer block inside that SpatialTransformer. Its diffusers name follows from the
UNet's number of res blocks per level (`UNetLayout`), so one table serves both hosts and every
SD1.x/2.x/SDXL-shaped UNet, the tiny test models included. UNet layers are listed in diffusers'
`unet.attn_processors` order (down blocks, up blocks, middle), the order StyleAligned's
`only_self_level` counts in.

DiTs (`DiTLayout`): one id per joint attention, block `joint` (SD3/SD3.5 MMDiT), `double` or
`single` (Flux), `number` = the block index, depth 0. Image and text tokens share that one softmax;
where the image tokens sit in the sequence depends on the host (`token_order`, `image_span`). The
SD3.5-M image-only `attn2` is not a layer id: style methods act on the joint attention only.

`ModelLayout` is what both layouts offer; selections (`select_all`, `select_blocks`,
`select_evenly_spaced`, `LayerSelection.check`) take either.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch

from .errors import InputError

UNET_BLOCKS = ("input", "middle", "output")
DIT_BLOCKS = ("joint", "double", "single")  # SD3/SD3.5 joint blocks; Flux double- and single-stream blocks
BLOCKS = UNET_BLOCKS + DIT_BLOCKS


@dataclass(frozen=True, order=True)
class LayerId:
    block: str
    number: int
    depth: int = 0

    def __post_init__(self) -> None:
        if self.block not in BLOCKS:
            raise ValueError(f"layer block must be one of {BLOCKS}, got {self.block!r}")
        if self.block in DIT_BLOCKS and self.depth != 0:
            raise ValueError(f"a DiT layer has depth 0 (one attention per block), "
                             f"got {self.block}.{self.number}.{self.depth}")

    @property
    def is_dit(self) -> bool:
        return self.block in DIT_BLOCKS

    def __str__(self) -> str:
        return f"{self.block}.{self.number}" if self.is_dit else f"{self.block}.{self.number}.{self.depth}"

    @property
    def comfy_key(self) -> tuple[str, int, int]:
        return (self.block, self.number, self.depth)

    @classmethod
    def parse(cls, text: str) -> LayerId:
        """`output.1.0` (UNet) or `joint.3` (DiT; `joint.3.0` is accepted too)."""
        parts = text.strip().split(".")
        if len(parts) == 2 and parts[0] in DIT_BLOCKS:
            return cls(parts[0], int(parts[1]))
        block, number, depth = parts
        return cls(block, int(number), int(depth))


@dataclass(frozen=True)
class UNetLayout:
    """The self-attention layers of one UNet shape.

    `res_blocks` is the number of res blocks per resolution level (diffusers' `layers_per_block`),
    `depths` the transformer depth per level (0: no attention at that level), `middle_depth` the
    middle block's. `family` is "sd1", "sd2" or "sdxl" (the tiny test models carry their family).
    """

    family: str
    res_blocks: tuple[int, ...]
    depths: tuple[int, ...]
    middle_depth: int

    @property
    def layers(self) -> tuple[LayerId, ...]:
        down = [layer for level in range(len(self.depths)) for layer in self.level_layers(level, "input")]
        up = [layer for level in reversed(range(len(self.depths))) for layer in self.level_layers(level, "output")]
        middle = [LayerId("middle", 0, d) for d in range(self.middle_depth)]
        return tuple(down + up + middle)

    def level_layers(self, level: int, block: str) -> list[LayerId]:
        """The attention layers of one resolution level (0 = full resolution) in the encoder ("input") or decoder ("output")."""
        if self.depths[level] == 0:
            return []
        if block == "input":
            # input_blocks[0] is conv_in; each level adds its res blocks, then one downsample block.
            first = 1 + sum(n + 1 for n in self.res_blocks[:level])
            count = self.res_blocks[level]
        else:
            # output_blocks run from the deepest level up, each level with one extra res block.
            first = sum(self.res_blocks[lv] + 1 for lv in range(level + 1, len(self.res_blocks)))
            count = self.res_blocks[level] + 1
        return [LayerId(block, first + j, d) for j in range(count) for d in range(self.depths[level])]

    def diffusers_path(self, layer: LayerId) -> str:
        """`down_blocks.1.attentions.0.transformer_blocks.0.attn1` for `input.4.0` on SDXL."""
        if layer.block == "middle":
            return f"mid_block.attentions.0.transformer_blocks.{layer.depth}.attn1"
        if layer.block == "input":
            offset = layer.number - 1
            for level, n in enumerate(self.res_blocks):
                if offset < n:
                    return f"down_blocks.{level}.attentions.{offset}.transformer_blocks.{layer.depth}.attn1"
                offset -= n + 1
        else:
            offset = layer.number
            for up_index, level in enumerate(reversed(range(len(self.res_blocks)))):
                n = self.res_blocks[level] + 1
                if offset < n:
                    return f"up_blocks.{up_index}.attentions.{offset}.transformer_blocks.{layer.depth}.attn1"
                offset -= n
        raise ValueError(f"{layer} is not a layer of this UNet")

    def layer_from_diffusers_path(self, path: str) -> LayerId:
        by_path = {self.diffusers_path(layer): layer for layer in self.layers}
        name = path.removesuffix(".processor")
        if name not in by_path:
            raise KeyError(f"{path!r} is not a self-attention layer of this {self.family} UNet")
        return by_path[name]


SD1 = UNetLayout("sd1", (2, 2, 2, 2), (1, 1, 1, 0), 1)
SD2 = UNetLayout("sd2", (2, 2, 2, 2), (1, 1, 1, 0), 1)
SDXL = UNetLayout("sdxl", (2, 2, 2), (0, 2, 10), 10)


Host = Literal["comfyui", "diffusers"]
TokenOrder = Literal["text_first", "image_first"]
DIT_FAMILIES = {"sd3": "mmdit", "sd35": "mmdit", "flux": "flux"}  # family -> architecture
TOKEN_ORDER: dict[tuple[str, str], TokenOrder] = {
    # Where the image tokens sit in the joint sequence an attention hook sees (dit.md §0.2, §1.2-1.3).
    ("comfyui", "mmdit"): "text_first",
    ("comfyui", "flux"): "text_first",
    ("diffusers", "mmdit"): "image_first",
    ("diffusers", "flux"): "text_first",
}
DIT_PATCH = 2  # SD3 and Flux both turn 2x2 latent pixels into one token (Flux packs them before the model)


def image_token_count(height: int, width: int, patch: int = DIT_PATCH) -> int:
    """Image tokens of a latent of `height` x `width`: odd sizes are padded (ceil), as both hosts do."""
    return math.ceil(height / patch) * math.ceil(width / patch)


@dataclass(frozen=True)
class DiTLayout:
    """The attention layers of one DiT shape: `joint` MMDiT blocks (SD3/SD3.5), or `double` + `single` (Flux).

    `family` is "sd3", "sd35" or "flux". Layers are listed in diffusers' `attn_processors` order
    (joint or double blocks, then single blocks), the order `select_evenly_spaced` counts in.
    """

    family: str
    joint: int = 0
    double: int = 0
    single: int = 0

    def __post_init__(self) -> None:
        if self.family not in DIT_FAMILIES:
            raise ValueError(f"DiT family must be one of {tuple(DIT_FAMILIES)}, got {self.family!r}")
        if self.architecture == "mmdit" and (self.double or self.single):
            raise ValueError("an SD3/SD3.5 layout has joint blocks only")
        if self.architecture == "flux" and self.joint:
            raise ValueError("a Flux layout has double and single blocks, not joint ones")

    @property
    def architecture(self) -> str:
        return DIT_FAMILIES[self.family]

    @property
    def layers(self) -> tuple[LayerId, ...]:
        return tuple(LayerId(block, i) for block, count in (("joint", self.joint), ("double", self.double),
                                                             ("single", self.single)) for i in range(count))

    def diffusers_path(self, layer: LayerId) -> str:
        """`transformer_blocks.{i}.attn` (joint, double blocks) or `single_transformer_blocks.{i}.attn` (single)."""
        if layer not in self.layers:
            raise ValueError(f"{layer} is not a layer of this {self.family} model")
        prefix = "single_transformer_blocks" if layer.block == "single" else "transformer_blocks"
        return f"{prefix}.{layer.number}.attn"

    def layer_from_diffusers_path(self, path: str) -> LayerId:
        by_path = {self.diffusers_path(layer): layer for layer in self.layers}
        name = path.removesuffix(".processor")
        if name not in by_path:
            raise KeyError(f"{path!r} is not a joint attention layer of this {self.family} model")
        return by_path[name]

    def token_order(self, host: Host) -> TokenOrder:
        return TOKEN_ORDER[(host, self.architecture)]

    def image_tokens(self, latent_shape: Sequence[int]) -> int:
        """Image tokens of a latent `(..., height, width)` (Flux: the latent before packing)."""
        return image_token_count(latent_shape[-2], latent_shape[-1])

    def image_span(self, host: Host, sequence_tokens: int, image_tokens: int, extra_tokens: int = 0) -> tuple[int, int]:
        """`(start, stop)` of the image tokens in a joint sequence of `sequence_tokens`.

        `extra_tokens` follow the image tokens (Flux Kontext reference latents, dit.md §1.3); text is the rest.
        """
        if image_tokens + extra_tokens > sequence_tokens:
            raise ValueError(f"{image_tokens} image and {extra_tokens} extra tokens "
                             f"do not fit a sequence of {sequence_tokens}")
        if self.token_order(host) == "image_first":
            return (0, image_tokens)
        start = sequence_tokens - image_tokens - extra_tokens
        return (start, start + image_tokens)


SD3_MEDIUM = DiTLayout("sd3", joint=24)
SD35_MEDIUM = DiTLayout("sd35", joint=24)  # MMDiT-X: its image-only attn2 (blocks 0-12) is not a style layer
SD35_LARGE = DiTLayout("sd35", joint=38)
FLUX1 = DiTLayout("flux", double=19, single=38)


class ModelLayout(Protocol):
    """What a UNet and a DiT layout both offer: the family, the canonical layers, the diffusers names."""

    @property
    def family(self) -> str: ...

    @property
    def layers(self) -> tuple[LayerId, ...]: ...

    def diffusers_path(self, layer: LayerId) -> str: ...

    def layer_from_diffusers_path(self, path: str) -> LayerId: ...


def switch_vector(total: int, level: float) -> list[bool]:
    """StyleAligned's `_get_switch_vec`: True marks a layer left unshared, evenly spaced.

    Same arithmetic as the original, including its integer stride `total // num`.
    """
    if level == 0:
        return [False] * total
    if level == 1:
        return [True] * total
    flip = level > 0.5
    share = 1 - level if flip else level
    count = int(share * total)
    if count == 0:
        # The original divides by zero here; no layer is switched at such a small level.
        return [flip] * total
    stride = total // count
    return [(i % stride == 0) != flip for i in range(total)]


STYLE_FEATURES = frozenset({"q", "k", "v", "share"})  # AdaIN on q/k/v, shared attention


@dataclass(frozen=True)
class LayerSelection:
    """Which self-attention layers a style patch acts on, for one architecture family.

    Static unless `schedule` is given: then, at each scheduled timestep, which of q/k/v/share each
    layer gets (Conditional Balance); a timestep between keys takes the nearest one.
    """

    family: str
    layers: frozenset[LayerId]
    label: str = ""
    schedule: dict[int, dict[LayerId, frozenset[str]]] | None = field(default=None, compare=False, hash=False)
    lambda_t: float = 0.0  # Conditional Balance: a ControlNet's down residuals are dropped below t = lambda_t * 1000
    graded_values: bool = False  # built from a grading that holds v: its v choice turns AdaIN on values on
    group_norm: bool | None = None  # shared GroupNorm with this selection; None: as the style node's own setting

    def shares_group_norm(self, requested: bool) -> bool:
        """Whether GroupNorm is shared when the style node asks for `requested`."""
        return requested if self.group_norm is None else self.group_norm

    @property
    def per_timestep(self) -> bool:
        return self.schedule is not None

    def features(self, layer: LayerId, timestep: float = 0.0) -> frozenset[str]:
        if self.schedule is None:
            return STYLE_FEATURES if layer in self.layers else frozenset()
        key = min(self.schedule, key=lambda t: (abs(t - timestep), -t))
        return self.schedule[key].get(layer, frozenset())

    def check(self, layout: ModelLayout, node: str, input_name: str = "layers") -> None:
        if self.family != layout.family:
            raise InputError(node, input_name, f"the layer selection is for {self.family} but the model is {layout.family}",
                             "Build the selection from this model (LayerBalance with the same model) or remove it.")
        unknown = sorted(str(layer) for layer in self.layers - set(layout.layers))
        if unknown:
            raise InputError(node, input_name, f"layers {', '.join(unknown[:5])} are not in this model",
                             "Build the selection for this model's architecture.")


def select_all(layout: ModelLayout) -> LayerSelection:
    return LayerSelection(layout.family, frozenset(layout.layers), "all")


def select_evenly_spaced(layout: ModelLayout, only_self_level: float) -> LayerSelection:
    """The layers StyleAligned shares at `only_self_level` (the fraction left unshared)."""
    unshared = switch_vector(len(layout.layers), only_self_level)
    kept = frozenset(layer for layer, off in zip(layout.layers, unshared) if not off)
    return LayerSelection(layout.family, kept, f"only_self_level={only_self_level}")


_BLOCK_TERM = re.compile(r"^(input|middle|output|joint|double|single)(?:\.(\d+))?(?::(\d+)(?:-(\d+))?)?$")


def select_blocks(layout: ModelLayout, spec: str, node: str = "LayerSelection",
                  input_name: str = "blocks") -> LayerSelection:
    """Parse a block list such as `output.1, input.8:0-3, middle` (UNet; `:a-b` picks transformer depths)
    or `joint`, `joint.3`, `double`, `single.0` (DiT)."""
    chosen: set[LayerId] = set()
    for term in filter(None, (t.strip() for t in spec.split(","))):
        match = _BLOCK_TERM.match(term)
        if not match:
            raise InputError(node, input_name, f"cannot parse {term!r}",
                             "Write terms like 'output.1', 'input.8:0-3' or 'middle' (UNet), or 'joint.3', "
                             "'double', 'single.0' (DiT), separated by commas.")
        block, number, first, last = match.groups()
        depth_lo = int(first) if first is not None else 0
        depth_hi = int(last) if last is not None else (depth_lo if first is not None else 10**6)
        found = {layer for layer in layout.layers
                 if layer.block == block and (number is None or layer.number == int(number))
                 and depth_lo <= layer.depth <= depth_hi}
        if not found:
            raise InputError(node, input_name, f"{term!r} names no self-attention layer of this {layout.family} model",
                             f"Use blocks the model has: {describe_blocks(layout)}.")
        chosen |= found
    if not chosen:
        raise InputError(node, input_name, "the block list is empty", "Name at least one block, e.g. 'output.1'.")
    return LayerSelection(layout.family, frozenset(chosen), spec)


def describe_blocks(layout: ModelLayout) -> str:
    if any(layer.is_dit for layer in layout.layers):
        counts: dict[str, int] = {}
        for layer in layout.layers:
            counts[layer.block] = counts.get(layer.block, 0) + 1
        return ", ".join(f"{block}.0-{block}.{count - 1}" for block, count in counts.items())
    seen: dict[str, int] = {}
    for layer in layout.layers:
        key = f"{layer.block}.{layer.number}"
        seen[key] = max(seen.get(key, 0), layer.depth + 1)
    return ", ".join(f"{key} (depth {depth})" for key, depth in seen.items())


def layout_from_layers(family: str, layers: Iterable[LayerId], res_blocks: Sequence[int]) -> UNetLayout:
    """Rebuild a layout from enumerated layers (what a host finds in a loaded model)."""
    layers = list(layers)
    levels = len(res_blocks)
    depths = [0] * levels
    probe = UNetLayout(family, tuple(res_blocks), tuple([1] * levels), 0)
    for level in range(levels):
        numbers = {layer.number for layer in probe.level_layers(level, "input")}
        depths[level] = max((layer.depth + 1 for layer in layers if layer.block == "input" and layer.number in numbers), default=0)
    middle = max((layer.depth + 1 for layer in layers if layer.block == "middle"), default=0)
    layout = UNetLayout(family, tuple(res_blocks), tuple(depths), middle)
    if set(layout.layers) != set(layers):
        raise ValueError(f"the model's attention layers do not follow the {family} UNet pattern")
    return layout


def selection_chart(selection: LayerSelection, layers: Sequence[LayerId], timesteps: Sequence[float],
                    cell: int = 6) -> torch.Tensor:
    """The selection as an RGB image: a row per layer, a column per timestep (noisiest left).

    Red = AdaIN on q, blue = on k, green = on v; a layer that only shares attention is grey.
    """
    colours = {"q": (1.0, 0.0, 0.0), "v": (0.0, 1.0, 0.0), "k": (0.0, 0.0, 1.0)}
    chart = torch.zeros(len(layers), len(timesteps), 3)
    for row, layer in enumerate(layers):
        for column, timestep in enumerate(timesteps):
            features = selection.features(layer, timestep)
            for feature, colour in colours.items():
                if feature in features:
                    chart[row, column] += torch.tensor(colour)
            if features == {"share"}:
                chart[row, column] = 0.5
    return chart.repeat_interleave(cell, dim=0).repeat_interleave(cell, dim=1)
