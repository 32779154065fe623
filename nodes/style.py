"""SharedAttention and AdaINStyle: StyleAligned as two composable MODEL patches.

Both install one `StylePatch` per selected self-attention layer (ComfyUI's attn1 replace slot,
which sees projected q, k, v). A second node on the same layer extends the patch already there;
a foreign patch on the layer is kept and delegated to.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass, field, replace
from typing import Any

import comfy.patcher_extension
import torch
from comfy_api.latest import io

from ..core.errors import InputError
from ..core.layers import STYLE_FEATURES, LayerId, LayerSelection, select_all
from ..core.style import (AdaINSettings, ShareSettings, allowed_adain, allowed_share, attach_shared_norm,
                          release_control_geometry, style_attention, zero_reference_control)
from .common import (CATEGORY, HIDDEN, LAYERS_TYPE, batch_layout, checked_label, current_sigma, existing_replace,
                     model_layout, plain_attention, search_aliases, sigma_range, sigma_timestep)

SHARED_ATTENTION = "MultiCond_SharedAttention"
ADAIN_STYLE = "MultiCond_AdaINStyle"
BATCH_WRAPPER_KEY = "multicond.style_batch"

LayerSelectionInput = io.Custom(LAYERS_TYPE)


@dataclass(frozen=True)
class Stage:
    """One node's part of a layer's patch: its settings, sampling range and reference."""

    node: str
    settings: AdaINSettings | ShareSettings
    sigma_high: float
    sigma_low: float
    reference_index: int
    selection: LayerSelection | None = None
    log_sigmas: torch.Tensor | None = field(default=None, compare=False)  # the model's, for per-timestep selections

    def active(self, sigma: float) -> bool:
        return self.sigma_low <= sigma <= self.sigma_high

    def features(self, layer: LayerId, sigma: float) -> frozenset[str]:
        """What the selection allows on `layer` at this sigma (everything without a selection)."""
        if self.selection is None:
            return STYLE_FEATURES
        if not self.selection.per_timestep:
            return self.selection.features(layer)
        return self.selection.features(layer, sigma_timestep(self.log_sigmas, sigma))


@dataclass(frozen=True)
class StylePatch:
    """attn1 replacement for one layer: AdaIN and/or shared attention, else the previous patch."""

    layer: LayerId
    adain: Stage | None = None
    share: Stage | None = None
    inner: Any = None

    def with_stage(self, kind: str, stage: Stage) -> StylePatch:
        other = self.share if kind == "adain" else self.adain
        if other is not None and other.reference_index != stage.reference_index:
            raise InputError(stage.node, "reference_index",
                             f"{other.node} on this model uses reference_index {other.reference_index}",
                             "Give both nodes the same reference_index.")
        return replace(self, **{kind: stage})

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict) -> torch.Tensor:
        sigma = current_sigma(extra_options)
        adain_settings, share_settings = self._adain_at(sigma), self._share_at(sigma)
        if adain_settings is None and share_settings is None:
            return self._attention(q, k, v, extra_options)
        stage = self.share or self.adain
        layout = batch_layout(extra_options["cond_or_uncond"], q.shape[0], stage.reference_index, stage.node)
        heads = extra_options["n_heads"]
        if self.inner is None:
            return style_attention(q, k, v, heads, layout, adain_settings, share_settings)

        def delegated(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, bias: torch.Tensor | None) -> torch.Tensor:
            if bias is not None:
                raise InputError(stage.node, "score_shift", f"another node replaced attention on layer {self.layer}, "
                                 "which cannot take a score shift", "Set score_shift to 0 or remove the other attention patch.")
            return self.inner(q, k, v, extra_options)

        return style_attention(q, k, v, heads, layout, adain_settings, share_settings, delegated, full_batch=True)

    def _adain_at(self, sigma: float) -> AdaINSettings | None:
        if self.adain is None or not self.adain.active(sigma):
            return None
        graded_values = self.adain.selection is not None and self.adain.selection.graded_values
        return allowed_adain(self.adain.settings, self.adain.features(self.layer, sigma), graded_values)

    def _share_at(self, sigma: float) -> ShareSettings | None:
        if self.share is None or not self.share.active(sigma):
            return None
        return allowed_share(self.share.settings, self.share.features(self.layer, sigma))

    def _attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict) -> torch.Tensor:
        return plain_attention(q, k, v, extra_options) if self.inner is None else self.inner(q, k, v, extra_options)


@dataclass
class StyleBatchWrapper:
    """Around each UNet call: zero the reference's control residuals, share GroupNorm statistics."""

    stage: Stage
    share_group_norm: bool
    zero_reference_control: bool
    # The model's GroupNorms, found once per model object: a module walk costs about a millisecond per call.
    group_norms: weakref.WeakKeyDictionary = field(default_factory=weakref.WeakKeyDictionary, repr=False, compare=False)

    def __call__(self, executor: Any, x: torch.Tensor, timesteps: Any, context: Any, y: Any, control: Any,
                 transformer_options: dict, *args: Any, **kwargs: Any) -> torch.Tensor:
        layout = batch_layout(transformer_options["cond_or_uncond"], x.shape[0], self.stage.reference_index, self.stage.node)
        if control and self.zero_reference_control:
            control = zero_reference_control(control, layout)
        if control and self.stage.selection is not None:
            control = release_control_geometry(control, float(timesteps.max()), self.stage.selection.lambda_t)
        handles = []
        if self.share_group_norm and self.stage.active(current_sigma(transformer_options)):
            refs = layout.reference_of_row(x.device)
            model = executor.class_obj
            if model not in self.group_norms:
                self.group_norms[model] = [m for m in model.modules() if isinstance(m, torch.nn.GroupNorm)]
            handles = attach_shared_norm(self.group_norms[model],
                                         lambda batch, device: refs if batch == layout.batch else None)
        try:
            return executor(x, timesteps, context, y, control, transformer_options, *args, **kwargs)
        finally:
            for handle in handles:
                handle.remove()


def install_stage(model: Any, kind: str, stage: Stage, layers: LayerSelection | None) -> Any:
    """A clone of `model` with `stage` on every selected self-attention layer."""
    layout = model_layout(model, stage.node)
    selection = layers if layers is not None else select_all(layout)
    selection.check(layout, stage.node)
    if selection.per_timestep:
        stage = replace(stage, selection=selection, log_sigmas=model.get_model_object("model_sampling").log_sigmas.float().cpu())
    elif layers is not None:
        stage = replace(stage, selection=selection)
    patched = model.clone()
    for layer in layout.layers:
        if layer not in selection.layers:
            continue
        current = existing_replace(patched, "attn1", layer)
        patch = current if isinstance(current, StylePatch) else StylePatch(layer, inner=current)
        patched.set_model_attn1_replace(patch.with_stage(kind, stage), *layer.comfy_key)
    return patched


def _range_inputs() -> list:
    return [
        io.Int.Input("reference_index", default=0, min=0, max=63,
                     tooltip="Which image of the latent batch is the style reference (0 = the first). "
                             "Every other image takes its style."),
        io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                       tooltip="Fraction of the sampling at which the effect starts (0 = first step)."),
        io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01,
                       tooltip="Fraction of the sampling at which the effect ends (1 = last step)."),
        LayerSelectionInput.Input("layers", optional=True,
                                  tooltip="Self-attention layers to act on (from LayerBalance). "
                                          "Unconnected: every layer, as the paper."),
    ]


class SharedAttention(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            hidden=HIDDEN,
            node_id=SHARED_ATTENTION,
            **search_aliases("style aligned", "style transfer", "consistent style", "same style batch",
                             "shared attention"),
            display_name="Shared Attention (StyleAligned)",
            category=f"{CATEGORY}/style",
            description="Style transfer across a batch, StyleAligned (Hertz et al. 2023): every image of the latent "
                        "batch also attends to the reference image's keys and values in self-attention, so the batch "
                        "shares one style. Add AdaIN Style for the paper's full method.",
            inputs=[
                io.Model.Input("model", tooltip="An SD1.x, SD2.x or SDXL model."),
                io.Boolean.Input("share_attention", default=True,
                                 tooltip="Append the reference's keys and values to every image's self-attention."),
                io.Float.Input("score_scale", default=1.0, min=0.0, max=4.0, step=0.01,
                               tooltip="Multiplies the reference keys seen by the other images (paper: 1; "
                                       "0.5 for very famous reference images)."),
                io.Float.Input("score_shift", default=0.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="Added to the attention logits of the reference keys: log w weights the "
                                       "reference by w (paper: 0; log 2 = 0.693 for a real reference image)."),
                io.Boolean.Input("full_attention_share", default=False,
                                 tooltip="Instead: all images of the batch attend to each other jointly (no AdaIN)."),
                io.Boolean.Input("share_group_norm", default=True,
                                 tooltip="GroupNorm statistics include the reference's features (paper default; "
                                         "its SDXL demo turns it off). With a Layer Balance selection, its group_norm "
                                         "input decides (from a grading: off, as Conditional Balance)."),
                io.Boolean.Input("zero_reference_control", default=True,
                                 tooltip="With a ControlNet or T2I-Adapter, the reference image gets no control "
                                         "(as the paper's ControlNet variant)."),
                *_range_inputs(),
            ],
            outputs=[io.Model.Output(tooltip="The model with shared self-attention installed.")],
        )

    @classmethod
    def execute(cls, model: Any, share_attention: bool, score_scale: float, score_shift: float,
                full_attention_share: bool, share_group_norm: bool, zero_reference_control: bool,
                reference_index: int, start_percent: float, end_percent: float,
                layers: LayerSelection | None = None) -> io.NodeOutput:
        label = checked_label(cls, locals())
        if not (share_attention or full_attention_share or share_group_norm):
            raise InputError(label, "share_attention", "share_attention, full_attention_share and share_group_norm "
                             "are all off: the node would change nothing", "Turn one on, or bypass the node.")
        high, low = sigma_range(model, start_percent, end_percent, SHARED_ATTENTION)
        settings = ShareSettings(score_scale, score_shift, full_attention_share)
        stage = Stage(label, settings, high, low, reference_index)
        patched = install_stage(model, "share", stage, layers) if share_attention or full_attention_share else model.clone()
        patched.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, BATCH_WRAPPER_KEY)
        group_norm = share_group_norm if layers is None else layers.shares_group_norm(share_group_norm)
        patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, BATCH_WRAPPER_KEY,
                                     StyleBatchWrapper(replace(stage, selection=layers), group_norm, zero_reference_control))
        return io.NodeOutput(patched)


class AdaINStyle(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            hidden=HIDDEN,
            node_id=ADAIN_STYLE,
            **search_aliases("adain", "style transfer", "style aligned", "consistent style"),
            display_name="AdaIN Style (StyleAligned)",
            category=f"{CATEGORY}/style",
            description="StyleAligned's AdaIN: in self-attention, each image's projected queries/keys/values take the "
                        "per-channel token mean and std of the reference image's. Composes with Shared Attention in "
                        "either order.",
            inputs=[
                io.Model.Input("model", tooltip="An SD1.x, SD2.x or SDXL model."),
                io.Boolean.Input("queries", default=True, tooltip="AdaIN on the queries (paper: on)."),
                io.Boolean.Input("keys", default=True, tooltip="AdaIN on the keys (paper: on)."),
                io.Boolean.Input("values", default=False, tooltip="AdaIN on the values (paper: off). With a Layer Balance "
                                 "grading that holds v, the grading decides where, as the original."),
                io.Float.Input("strength", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="1 = the paper's AdaIN; lower values move the statistics only part of the way."),
                *_range_inputs(),
            ],
            outputs=[io.Model.Output(tooltip="The model with AdaIN toward the reference installed.")],
        )

    @classmethod
    def execute(cls, model: Any, queries: bool, keys: bool, values: bool, strength: float, reference_index: int,
                start_percent: float, end_percent: float, layers: LayerSelection | None = None) -> io.NodeOutput:
        label = checked_label(cls, locals())
        high, low = sigma_range(model, start_percent, end_percent, ADAIN_STYLE)
        settings = AdaINSettings(queries, keys, values, strength)
        if not settings.any:
            raise InputError(label, "queries", "queries, keys and values are all off: the node would change nothing",
                             "Turn one on, or bypass the node.")
        if strength == 0:
            logging.warning("%s: strength 0, AdaIN is off", label)
            return io.NodeOutput(model.clone())
        stage = Stage(label, settings, high, low, reference_index)
        return io.NodeOutput(install_stage(model, "adain", stage, layers))
