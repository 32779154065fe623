"""StyleAligned on a diffusers UNet: an attention processor on the shared attn1 layers, GroupNorm hooks.

`install_style_aligned(unet_or_pipeline, args)` replaces the processors of the self-attention
layers `args.only_self_level` selects (counted in `unet.attn_processors` order, as the original's
`_get_switch_vec`), leaves every other processor as it was, hooks every GroupNorm when
`args.share_group_norm`, and returns a handle whose `remove()` restores the UNet exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention

from ..chunks import ChunkLayout, chunk_layout
from ..layers import LayerId, LayerSelection, UNetLayout, select_evenly_spaced
from ..style import (AdaINSettings, ShareSettings, StyleAlignedArgs, allowed_adain, allowed_share, attach_shared_norm,
                     style_attention)
from .handle import ProcessorHandle
from .processor import attention_inputs, attention_output, projections

CFG_CHUNKS = 2  # diffusers runs classifier-free guidance as one batch [uncond, cond]
Observer = Callable[[Any, ChunkLayout, torch.Tensor, torch.Tensor, torch.Tensor], None]


def unet_of(unet_or_pipeline: Any) -> UNet2DConditionModel:
    unet = getattr(unet_or_pipeline, "unet", unet_or_pipeline)
    if not isinstance(unet, UNet2DConditionModel):
        raise TypeError(f"StyleAligned needs a UNet2DConditionModel or a pipeline with one, got {type(unet).__name__}")
    return unet


def _per_level(value: int | tuple | list, levels: int, name: str) -> tuple[int, ...]:
    values = tuple(value) if isinstance(value, (tuple, list)) else (value,) * levels
    if len(values) != levels or not all(isinstance(v, int) for v in values):
        raise ValueError(f"unsupported UNet config: {name}={value!r} (expected one int per level)")
    return values


def unet_family(unet: UNet2DConditionModel) -> str:
    config = unet.config
    if config.addition_embed_type == "text_time":
        return "sdxl"
    return "sd2" if config.cross_attention_dim == 1024 else "sd1"


def unet_layout(unet: UNet2DConditionModel) -> UNetLayout:
    """The self-attention layers of an SD1.x/SD2/SDXL-shaped UNet, read from its config.

    Checked against the model's own `attn_processors`: the order must be the same, since
    `only_self_level` counts layers in that order.
    """
    config = unet.config
    levels = len(config.down_block_types)
    res_blocks = _per_level(config.layers_per_block, levels, "layers_per_block")
    transformer_depths = _per_level(config.transformer_layers_per_block, levels, "transformer_layers_per_block")
    depths = tuple(d if "CrossAttn" in kind else 0 for d, kind in zip(transformer_depths, config.down_block_types))
    # diffusers builds the middle block with the deepest level's transformer depth.
    middle = transformer_depths[-1] if config.mid_block_type == "UNetMidBlock2DCrossAttn" else 0
    layout = UNetLayout(unet_family(unet), res_blocks, depths, middle)
    expected = [layout.diffusers_path(layer) for layer in layout.layers]
    found = [name.removesuffix(".processor") for name in unet.attn_processors if name.endswith("attn1.processor")]
    if expected != found:
        raise ValueError("this UNet's self-attention layers do not follow the SD1.x/SD2/SDXL pattern "
                         f"(expected {len(expected)} layers like {expected[:2]}, found {len(found)} like {found[:2]})")
    return layout


def shared_layers(unet: UNet2DConditionModel, only_self_level: float) -> list[str]:
    """Module paths of the attn1 layers StyleAligned shares at `only_self_level`, in processor order."""
    layout = unet_layout(unet)
    selection: LayerSelection = select_evenly_spaced(layout, only_self_level)
    return [layout.diffusers_path(layer) for layer in layout.layers if layer in selection.layers]


@dataclass
class StepClock:
    """The UNet call's timestep, written by a forward pre-hook for per-timestep layer selections."""

    timestep: float = 0.0

    def hook(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        timestep = kwargs["timestep"] if "timestep" in kwargs else args[1]
        self.timestep = float(timestep.max()) if isinstance(timestep, torch.Tensor) else float(timestep)


@dataclass
class StyleAlignedProcessor:
    """diffusers attention processor for one shared self-attention layer (`SharedAttentionProcessor`).

    Batches are `chunks` equal chunks (2 for diffusers' CFG); each chunk's reference is its row
    `reference_index`. Not an `nn.Module`, so installing it leaves the UNet's state dict alone.
    """

    adain: AdaINSettings | None
    share: ShareSettings | None
    chunks: int = CFG_CHUNKS
    reference_index: int = 0
    layer: LayerId | None = None
    selection: LayerSelection | None = None  # per-timestep choice (Conditional Balance), read through `clock`
    clock: StepClock | None = None
    observe: Observer | None = None  # sees the projected q, k, v before AdaIN (the grading analysis records them)

    def layout(self, batch: int) -> ChunkLayout:
        return chunk_layout(self.chunks, batch, self.reference_index)

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 *args: Any, **kwargs: Any) -> torch.Tensor:
        if encoder_hidden_states is not None:
            raise ValueError("StyleAligned's processor is for self-attention (attn1); it got encoder_hidden_states")
        if attention_mask is not None:
            # The original feeds a mask sized for N keys to attention over 2N keys; no SD UNet passes one.
            raise ValueError("StyleAligned's shared self-attention does not support an attention_mask")
        hidden, source, shape = attention_inputs(attn, hidden_states, None, temb)
        query, key, value = projections(attn, hidden, source)
        layout = self.layout(query.shape[0])
        if self.observe is not None:
            self.observe(self.layer, layout, query, key, value)
        adain, share = self.adain, self.share
        if self.selection is not None:
            allowed = self.selection.features(self.layer, self.clock.timestep if self.clock else 0.0)
            adain, share = allowed_adain(adain, allowed, self.selection.graded_values), allowed_share(share, allowed)
        out = style_attention(query, key, value, attn.heads, layout, adain, share)
        return attention_output(attn, out, hidden_states, shape, query.dtype)


@dataclass
class StyleAlignedHandle(ProcessorHandle):
    """What `install_style_aligned` changed; `remove()` puts it back (also on leaving a `with`)."""

    layers: list[str] = field(default_factory=list)


def _reference_rows(chunks: int, reference_index: int) -> Callable[[int, torch.device], torch.Tensor | None]:
    known: dict[tuple[int, torch.device], torch.Tensor] = {}  # every GroupNorm of a UNet call asks for the same rows

    def reference_of_row(batch: int, device: torch.device) -> torch.Tensor | None:
        # A batch that is not made of `chunks` chunks is left plain (it is no StyleAligned batch).
        if batch % chunks or batch // chunks <= reference_index:
            return None
        if (batch, device) not in known:
            known[batch, device] = chunk_layout(chunks, batch, reference_index).reference_of_row(device)
        return known[batch, device]

    return reference_of_row


def install_style_aligned(unet_or_pipeline: Any, args: StyleAlignedArgs = StyleAlignedArgs(), chunks: int = CFG_CHUNKS,
                          reference_index: int = 0, layers: LayerSelection | None = None) -> StyleAlignedHandle:
    """Turn StyleAligned on for a UNet (or a pipeline's `.unet`); returns the handle that turns it off.

    `chunks` equal chunks make up each UNet batch (2: diffusers' [uncond, cond] CFG halves, the
    original's `b // 2` rule); the reference image is row `reference_index` of every chunk.
    `layers` replaces `args.only_self_level` with a layer selection; one made from a grading
    (`core.balance.graded_selection`, Conditional Balance) is followed per UNet timestep and shares no
    GroupNorm unless its `group_norm` says so.
    """
    unet = unet_of(unet_or_pipeline)
    if any(isinstance(p, StyleAlignedProcessor) for p in unet.attn_processors.values()):
        raise RuntimeError("StyleAligned is already installed on this UNet; remove() the first handle before installing again")
    if chunks < 1 or reference_index < 0:
        raise ValueError(f"chunks must be >= 1 and reference_index >= 0, got {chunks} and {reference_index}")
    if layers is None:
        paths = shared_layers(unet, args.only_self_level)
        processors = dict.fromkeys(paths, StyleAlignedProcessor(args.adain, args.share, chunks, reference_index))
        clock = None
    else:
        layout = unet_layout(unet)
        layers.check(layout, "install_style_aligned")
        clock = StepClock() if layers.per_timestep else None
        chosen = [layer for layer in layout.layers if layer in layers.layers]
        processors = {layout.diffusers_path(layer): StyleAlignedProcessor(args.adain, args.share, chunks, reference_index,
                                                                          layer, layers, clock) for layer in chosen}
    handle = StyleAlignedHandle(unet, {path: unet.get_submodule(path).processor for path in processors}, layers=list(processors))
    for path, processor in processors.items():
        unet.get_submodule(path).set_processor(processor)
    if clock is not None:
        handle.hooks.append(unet.register_forward_pre_hook(clock.hook, with_kwargs=True))
    if args.share_group_norm if layers is None else layers.shares_group_norm(args.share_group_norm):
        norms = [m for m in unet.modules() if isinstance(m, torch.nn.GroupNorm)]
        handle.hooks += attach_shared_norm(norms, _reference_rows(chunks, reference_index))
    # share_layer_norm has no effect: LayerNorm normalises over channels, the reference is stacked along tokens.
    return handle
