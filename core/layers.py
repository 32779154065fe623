"""Canonical self-attention layer ids and their names in ComfyUI and diffusers.

A layer id is ComfyUI's patch key `(block, number, depth)`: `block` is input/middle/output,
`number` indexes `input_blocks`/`output_blocks` (0 for the middle block) and `depth` is the
transformer block inside that SpatialTransformer. Its diffusers name follows from the UNet's
number of res blocks per level, so one table serves both hosts and every SD1.x/2.x/SDXL-shaped
UNet, the tiny test models included.

Layers are listed in diffusers' `unet.attn_processors` order (down blocks, up blocks, middle),
the order StyleAligned's `only_self_level` counts in.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch

from .errors import InputError

BLOCKS = ("input", "middle", "output")


@dataclass(frozen=True, order=True)
class LayerId:
    block: str
    number: int
    depth: int

    def __post_init__(self) -> None:
        if self.block not in BLOCKS:
            raise ValueError(f"layer block must be one of {BLOCKS}, got {self.block!r}")

    def __str__(self) -> str:
        return f"{self.block}.{self.number}.{self.depth}"

    @property
    def comfy_key(self) -> tuple[str, int, int]:
        return (self.block, self.number, self.depth)

    @classmethod
    def parse(cls, text: str) -> LayerId:
        block, number, depth = text.strip().split(".")
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

    def check(self, layout: UNetLayout, node: str, input_name: str = "layers") -> None:
        if self.family != layout.family:
            raise InputError(node, input_name, f"the layer selection is for {self.family} but the model is {layout.family}",
                             "Build the selection from this model (LayerBalance with the same model) or remove it.")
        unknown = sorted(str(layer) for layer in self.layers - set(layout.layers))
        if unknown:
            raise InputError(node, input_name, f"layers {', '.join(unknown[:5])} are not in this model",
                             "Build the selection for this model's architecture.")


def select_all(layout: UNetLayout) -> LayerSelection:
    return LayerSelection(layout.family, frozenset(layout.layers), "all")


def select_evenly_spaced(layout: UNetLayout, only_self_level: float) -> LayerSelection:
    """The layers StyleAligned shares at `only_self_level` (the fraction left unshared)."""
    unshared = switch_vector(len(layout.layers), only_self_level)
    kept = frozenset(layer for layer, off in zip(layout.layers, unshared) if not off)
    return LayerSelection(layout.family, kept, f"only_self_level={only_self_level}")


_BLOCK_TERM = re.compile(r"^(input|middle|output)(?:\.(\d+))?(?::(\d+)(?:-(\d+))?)?$")


def select_blocks(layout: UNetLayout, spec: str, node: str = "LayerSelection", input_name: str = "blocks") -> LayerSelection:
    """Parse a block list such as `output.1, input.8:0-3, middle`; `:a-b` picks transformer depths."""
    chosen: set[LayerId] = set()
    for term in filter(None, (t.strip() for t in spec.split(","))):
        match = _BLOCK_TERM.match(term)
        if not match:
            raise InputError(node, input_name, f"cannot parse {term!r}",
                             "Write terms like 'output.1', 'input.8:0-3' or 'middle', separated by commas.")
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


def describe_blocks(layout: UNetLayout) -> str:
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
