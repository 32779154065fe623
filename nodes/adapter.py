"""MaskedAdapter: a T2I-Adapter or ControlNet that acts only inside a mask (Domingo-Gregorio et al.).

The control last applied to a conditioning (by ComfyUI's Apply ControlNet nodes) is copied into a
subclass whose `control_merge` multiplies each of its own residuals by the mask resized to that
residual's height and width (`core.adapter.mask_features`), or, for an SD3/SD3.5 or Flux ControlNet's
image-token residuals, by the mask resized to the latent's token grid (`core.adapter.mask_tokens`),
before they are merged with the controls applied earlier, which keep working unmasked (mask them
with another MaskedAdapter).
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Any

import comfy.controlnet
import torch
from comfy_api.latest import io

from ..core.adapter import mask_features, mask_tokens
from ..core.blend import check_mask, stretch_note
from ..core.errors import InputError
from .common import CATEGORY, HIDDEN, checked_label, search_aliases

MASKED_ADAPTER = "MultiCond_MaskedAdapter"
RESIZE_MODES = ("nearest", "bilinear", "area")


class MaskedControl:
    """Mixin for a comfy ControlBase: its own residuals are masked before the merge with the previous controls."""

    effect_mask: torch.Tensor
    resize: str = "nearest"
    feather: float = 0.0
    level_strengths: tuple[float, ...] = ()
    node: str = MASKED_ADAPTER  # the node's label in errors

    rows: int = 1  # rows of the model call in flight (a T2I-Adapter's features have one row per hint image)
    latent_size: tuple[int, int] = (0, 0)  # (H, W) of the model call in flight: a DiT's token grid comes from it

    def get_control(self, x_noisy: torch.Tensor, t: Any, cond: Any, batched_number: int, transformer_options: dict) -> Any:
        self.rows, masks = x_noisy.shape[0], self.effect_mask.shape[0] if self.effect_mask.ndim == 3 else 1
        self.latent_size = tuple(x_noisy.shape[-2:])
        images = self.rows // max(batched_number, 1)
        if masks not in (1, images):
            raise InputError(self.node, "mask", f"{masks} masks for a latent batch of {images} images",
                             "Give one mask, or one per latent image.")
        self._note_stretch(tuple(x_noisy.shape[-2:]))
        return super().get_control(x_noisy, t, cond, batched_number, transformer_options)

    def _note_stretch(self, latent_size: tuple[int, int]) -> None:
        """Warn, once per latent size and sampling, when the mask is stretched to the latent."""
        if getattr(self, "stretch_noted", None) == latent_size:
            return
        self.stretch_noted = latent_size
        if note := stretch_note(tuple(self.effect_mask.shape[-2:]), latent_size):
            logging.warning("%s: %s.", self.node, note)

    def control_merge(self, control: dict, control_prev: dict | None, output_dtype: Any) -> dict:
        # SD3/SD3.5 and Flux ControlNets add image tokens [B, L, C]; UNet controls add feature maps [B, C, H, W].
        if any(x is not None and x.ndim == 3 for residuals in control.values() for x in residuals):
            return super().control_merge(self._token_masked(control), control_prev, output_dtype)
        # Resolution levels, finest first, from the widths this call's residuals come at.
        widths = sorted({x.shape[-1] for residuals in control.values() for x in residuals if x is not None}, reverse=True)
        per_image = self.effect_mask.ndim == 3 and self.effect_mask.shape[0] > 1
        masked = {}
        for key, residuals in control.items():
            # Several masks need a row per image: broadcast features (one hint for all rows) are expanded first.
            present = [x.expand(self.rows, *x.shape[1:]) if per_image and x.shape[0] == 1 else x
                       for x in residuals if x is not None]
            try:
                scaled = iter(mask_features(present, self.effect_mask, self.resize, self.feather))
            except ValueError as error:
                raise InputError(self.node, "mask", str(error), "Give one mask, or one per latent image.") from error
            masked[key] = [None if x is None else self._level_scaled(next(scaled), widths) for x in residuals]
        return super().control_merge(masked, control_prev, output_dtype)

    def _token_masked(self, control: dict) -> dict:
        """An SD3/SD3.5 or Flux ControlNet's residuals [B, L, C] (image tokens), each distinct tensor masked once."""
        if self.level_strengths:
            raise InputError(self.node, "level_strengths", "an SD3/SD3.5 or Flux ControlNet's residuals are image "
                             "tokens at one resolution: there are no levels to weight", "Leave level_strengths empty, "
                             "and lower the strength in Apply ControlNet instead.")
        try:
            return {key: mask_tokens(list(residuals), self.effect_mask, self.latent_size, self.resize, self.feather)
                    for key, residuals in control.items()}
        except ValueError as error:
            raise InputError(self.node, "positive", f"the control's residuals are not what this node can mask: {error}",
                             "Use the node with UNet ControlNets/T2I-Adapters or with SD3/SD3.5 and Flux.1 ControlNets, "
                             "or apply this control without it.") from error

    def _level_scaled(self, residual: torch.Tensor, widths: list[int]) -> torch.Tensor:
        if not self.level_strengths:
            return residual
        level = widths.index(residual.shape[-1])
        return residual * self.level_strengths[min(level, len(self.level_strengths) - 1)]

    def copy(self) -> Any:
        return masked_copy(super().copy(), self.effect_mask, self.resize, self.feather, self.level_strengths, self.node)


@functools.cache
def masked_class(base: type) -> type:
    """One masked subclass per control class (ControlNet, T2IAdapter, ControlLora, ...)."""
    return type(f"Masked{base.__name__}", (MaskedControl, base), {})


def masked_copy(control: Any, mask: torch.Tensor, resize: str, feather: float, level_strengths: tuple[float, ...],
                node: str = MASKED_ADAPTER) -> Any:
    """`control` re-classed so its residuals are masked (the object is a fresh copy: nothing shared is changed)."""
    if not isinstance(control, MaskedControl):
        control.__class__ = masked_class(type(control))
    control.effect_mask, control.resize, control.feather, control.level_strengths = mask, resize, feather, level_strengths
    control.node = node
    return control


def _control_of(entry: list) -> Any:
    return entry[1].get("control")


def parse_strengths(text: str, node: str = MASKED_ADAPTER) -> tuple[float, ...]:
    if not text.strip():
        return ()
    try:
        values = tuple(float(part) for part in text.replace(";", ",").split(",") if part.strip())
    except ValueError as error:
        raise InputError(node, "level_strengths", f"{text!r} is not a list of numbers",
                         "Write one strength per resolution level, finest first, e.g. '1, 1, 0.8, 0.5'.") from error
    if not values or any(not math.isfinite(v) or v < 0 for v in values):
        raise InputError(node, "level_strengths", f"{text!r} needs finite, non-negative numbers",
                         "Write one strength per resolution level, finest first, e.g. '1, 1, 0.8, 0.5'.")
    return values


class MaskedAdapter(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            hidden=HIDDEN,
            node_id=MASKED_ADAPTER,
            **search_aliases("controlnet mask", "masked controlnet", "regional controlnet", "t2i adapter",
                             "t2i-adapter mask", "local control"),
            display_name="Masked ControlNet / T2I-Adapter (localized control)",
            category=f"{CATEGORY}/control",
            description="Localized control (Domingo-Gregorio et al.): the T2I-Adapter or ControlNet last applied to these "
                        "conditionings acts only inside the mask; every residual is multiplied by the mask resized to "
                        "its own size (nearest, as the paper), an SD3/SD3.5 or Flux ControlNet's image tokens by the "
                        "mask resized to the token grid. The mask is an EFFECT mask (1 = the control acts), not an "
                        "inpainting mask: the whole image is still generated. Controls applied earlier are left as "
                        "they are. Controls from Advanced-ControlNet are not supported: use its own mask input.",
            inputs=[
                io.Conditioning.Input("positive", tooltip="The positive from Apply ControlNet (it carries the control)."),
                io.Conditioning.Input("negative", tooltip="The negative from the same Apply ControlNet."),
                io.Mask.Input("mask", tooltip="Where the control acts (1) and where it does not (0): an effect mask, "
                                              "not an inpainting mask. One mask or one per latent image; one of "
                                              "another aspect ratio is stretched to the latent, as ComfyUI's masked "
                                              "conditioning does (the log says so)."),
                io.Combo.Input("resize", options=list(RESIZE_MODES), default="nearest",
                               tooltip="How the mask is resized to each residual, or to the token grid of an "
                                       "SD3/SD3.5 or Flux ControlNet (paper: nearest)."),
                io.Float.Input("feather", default=0.0, min=0.0, max=256.0, step=0.5,
                               tooltip="Gaussian blur of the mask in mask pixels before resizing (0 = a hard edge, as the paper)."),
                io.String.Input("level_strengths", default="",
                                tooltip="Optional strengths per resolution level, finest first, e.g. '1, 1, 0.8, 0.5'; "
                                        "empty = 1 everywhere. UNet controls only: an SD3/SD3.5 or Flux ControlNet has "
                                        "one level."),
            ],
            outputs=[
                io.Conditioning.Output(display_name="positive", tooltip="The positive with its control masked."),
                io.Conditioning.Output(display_name="negative", tooltip="The negative with its control masked."),
            ],
        )

    @classmethod
    def execute(cls, positive: list, negative: list, mask: torch.Tensor, resize: str, feather: float,
                level_strengths: str) -> io.NodeOutput:
        label = checked_label(cls, locals())
        problem = check_mask(mask)
        if problem is not None:
            raise InputError(label, "mask", problem, "Use a MASK of shape (height, width) or (batch, height, width).")
        strengths = parse_strengths(level_strengths, label)
        controls = [_control_of(entry) for entry in positive + negative if _control_of(entry) is not None]
        if not controls:
            raise InputError(MASKED_ADAPTER, "positive", "the conditioning carries no ControlNet or T2I-Adapter",
                             "Connect the outputs of Apply ControlNet (with a ControlNet or T2I-Adapter model).")
        for control in controls:
            if not isinstance(control, comfy.controlnet.ControlBase) or hasattr(control, "mask_cond_hint_original"):
                raise InputError(MASKED_ADAPTER, "positive", f"the control is a {type(control).__name__}, not one of "
                                 "ComfyUI's own", "Apply the model with ComfyUI's Apply ControlNet node, or use "
                                 "Advanced-ControlNet's mask input.")
        effect = mask.detach().float().cpu()
        copies: dict[int, Any] = {}  # one copy per control object: positive and negative keep sharing it (one batch)

        def masked(conditioning: list) -> list:
            out = []
            for tensor, options in conditioning:
                control = options.get("control")
                if control is not None:
                    if id(control) not in copies:
                        copy = masked_copy(control.copy(), effect, resize, feather, strengths, label)
                        copies[id(control)] = copy.set_previous_controlnet(control.previous_controlnet)  # copy() drops it
                    options = {**options, "control": copies[id(control)]}
                out.append([tensor, options])
            return out

        return io.NodeOutput(masked(positive), masked(negative))
