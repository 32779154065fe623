"""EpsilonBlend and CrossAttnBlend: two prompts in one image (dual-style blending, Goldszal & Mercier).

EpsilonBlend tags the two prompts' conditioning entries; a CALC_COND_BATCH wrapper then gives
each entry a mask at the sampled latent's exact size, so ComfyUI's own masked-conditioning sum
runs all prompts and the negative in one batched model call and returns the blend.
CrossAttnBlend appends the second prompt's tokens to the context (DIFFUSION_MODEL wrapper) and
splits them again in every cross-attention layer (attn2 replace), blending per image token. On SD3/SD3.5
and Flux.1, whose text and image share one joint attention, it appends them through an APPLY_MODEL
wrapper and, in ComfyUI's attention override, runs every joint attention as two passes that each leave
one text out, blending the image tokens (`core.blend.dual_text_joint_attention`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import comfy.patcher_extension
import comfy.samplers
import torch
from comfy_api.latest import io

from ..core.blend import (CROSS_ATTENTION_SHARPNESS, DIRECTIONS, EPSILON_SHARPNESS, Profile, Weights, check_mask,
                          dual_context_attention, dual_text_joint_attention, latent_weights, layer_weights, rows_of,
                          side_factor, stretch_note)
from ..core.errors import InputError
from ..core.layers import DiTLayout, LayerId, LayerSelection
from .common import (CATEGORY, HIDDEN, LAYERS_TYPE, OVERRIDE, SECOND_CONTEXT, SECOND_TOKENS, checked_label,
                     current_sigma, existing_replace, model_layout, plain_attention, restored_override, search_aliases,
                     selection_allows, set_override)
from .style import BLOCK_TOKENS, FLUX_BLOCK, FLUX_CALL

EPSILON_BLEND = "MultiCond_EpsilonBlend"
CROSS_ATTN_BLEND = "MultiCond_CrossAttnBlend"
BLEND_TAG = "multicond_blend"  # key of EpsilonBlend's tag in a conditioning entry
EPSILON_WRAPPER_KEY = "multicond.epsilon_blend"
CONTEXT_WRAPPER_KEY = "multicond.cross_attn_blend"
DUAL_TEXT = "multicond_dual_text"  # transformer_options key: the DualText of a DiT call
BLOCK_LAYER = "multicond_blend_layer"  # transformer_options key: the running DiT block's LayerId (LayerStamp)
DUAL_TEXT_PASS = "multicond_dual_text_pass"  # transformer_options key of a pass's call: SECOND_PASS on the second's
SECOND_PASS = "second"

PROFILES = ("sigmoid", "linear", "cosine", "mask")
ANGLE = "angle"
WEIGHTINGS = ("complementary", "normalised")
UNCOND = 1  # ComfyUI's CFGGuider runs [positive, negative]: chunk index 1 is the uncond


@dataclass(frozen=True, eq=False)
class BlendWeights:
    """The first prompt's weight (an analytic profile or a user mask) and the node that set it."""

    node: str
    weights: Weights = field(repr=False)
    cache: dict[tuple, torch.Tensor] = field(default_factory=dict, repr=False)  # per size and device: built once

    def at(self, height: int, width: int, images: int, device: torch.device) -> torch.Tensor:
        """`(images or 1, height, width)` weights at a latent's size."""
        key = ("latent", height, width, images, device)
        if key not in self.cache:
            self._note_stretch(height, width)
            self.cache[key] = self._rows(latent_weights(self.weights, height, width), images).to(device)
        return self.cache[key]

    def at_layer(self, latent: tuple[int, int], layer: tuple[int, int], images: int, device: torch.device) -> torch.Tensor:
        """`(images or 1, tokens, 1)` weights for a layer of `layer` (height, width) inside a latent of `latent`."""
        key = ("layer", latent, layer, images, device)
        if key not in self.cache:
            self._note_stretch(*latent)
            weights = self._rows(layer_weights(self.weights, latent, layer), images)
            self.cache[key] = weights.reshape(weights.shape[0], -1, 1).to(device)
        cached = self.cache[key]
        # Built during an inference-mode step, the cache is an inference tensor autograd cannot save (Spatial Guidance).
        return cached.clone() if torch.is_grad_enabled() and cached.is_inference() else cached

    def _note_stretch(self, height: int, width: int) -> None:
        """Warn, once per latent size, when a mask is stretched to the latent."""
        key = ("stretch noted", height, width)
        if key in self.cache or not isinstance(self.weights, torch.Tensor):
            return
        self.cache[key] = torch.empty(0)
        if note := stretch_note(tuple(self.weights.shape[-2:]), (height, width)):
            logging.warning("%s: %s.", self.node, note)

    def _rows(self, weights: torch.Tensor, images: int) -> torch.Tensor:
        if weights.shape[0] == 1:
            return weights
        try:
            return rows_of(weights, images)
        except ValueError as error:
            raise InputError(self.node, "mask", str(error), "Give one mask, or one per image of the latent batch.") from error


def blend_weights(node: str, profile: str, direction: str, angle: float, center: float, sharpness: float,
                  ramp_width: float, mask: torch.Tensor | None) -> BlendWeights:
    """The node inputs as `Weights`, or an error naming the input."""
    if profile == "mask":
        if mask is None:
            raise InputError(node, "mask", "profile is 'mask' but no mask is connected",
                             "Connect a MASK (white = first prompt), or choose sigmoid, linear or cosine.")
        problem = check_mask(mask)
        if problem is not None:
            raise InputError(node, "mask", problem, "Use a MASK of shape (height, width) or (batch, height, width), "
                                                    "e.g. from Load Image (alpha) or Solid Mask.")
        return BlendWeights(node, mask.detach().float().cpu())
    if mask is not None:
        raise InputError(node, "mask", f"a mask is connected but profile is {profile!r}",
                         "Set profile to mask, or disconnect the mask.")
    degrees = angle if direction == ANGLE else DIRECTIONS[direction]
    return BlendWeights(node, Profile(profile, sharpness, degrees, center, ramp_width))


# --- EpsilonBlend -------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class BlendGroup:
    """One EpsilonBlend: its weights and how entries mix; the tag of each entry is (group, side)."""

    weights: BlendWeights
    weighting: str


def _tag(entry: dict) -> tuple[BlendGroup, int] | None:
    return entry.get(BLEND_TAG)


def _entry_weight(entry: dict, x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor | None:
    """The `(B, H, W)` weight ComfyUI gives this entry now (mask, strength, area), or None when it is inactive."""
    found = comfy.samplers.get_area_and_mult(entry, x, timestep)
    if found is None:
        return None
    mult = found.mult[:, 0]
    if found.area is None:
        return mult
    height, width, top, left = found.area  # ComfyUI's 2-D area: (height, width, y, x)
    full = torch.zeros(x.shape[0], *x.shape[2:], device=mult.device, dtype=mult.dtype)
    full[:, top:top + height, left:left + width] = mult
    return full


def _masked(entry: dict, factor: torch.Tensor) -> dict:
    """A copy of `entry` whose mask is its own mask (if any) times `factor`."""
    own = entry.get("mask")
    mask = factor if own is None else own.to(factor) * factor
    return {**entry, "mask": mask}


def blend_entries(entries: list[dict], x: torch.Tensor, timestep: torch.Tensor) -> list[dict]:
    """One conditioning list with EpsilonBlend's weights applied to its tagged entries."""
    groups = {id(tag[0]): tag[0] for entry in entries if (tag := _tag(entry)) is not None}
    if not groups:
        return entries
    if len(groups) > 1:
        raise InputError(EPSILON_BLEND, "positive", "the positive holds the outputs of several EpsilonBlend nodes",
                         "Give each sampler the positive of one EpsilonBlend (chain blends through its first/second inputs).")
    group = next(iter(groups.values()))
    if x.ndim != 4:
        raise InputError(group.weights.node, "model", f"the latent has {x.ndim} dimensions; the blend profile is 2-D",
                         "Use an image model (latents of shape batch, channels, height, width).")
    weight = group.weights.at(x.shape[-2], x.shape[-1], x.shape[0], x.device)
    sides = [_sides(entry) for entry in entries]
    if group.weighting == "normalised":
        # ComfyUI's rule over all entries: sum(w_s m_e eps_e) / sum(w_s m_e); untagged entries keep their weight.
        factors = [weight if s == (True, False) else 1 - weight if s == (False, True) else None for s in sides]
    else:
        own = [_entry_weight(entry, x, timestep) for entry in entries]
        totals = tuple(sum((m for m, s in zip(own, sides) if m is not None and s[side]), torch.zeros_like(weight))
                       for side in (0, 1))
        factors = [side_factor(weight, totals, s) for s in sides]
    return [entry if factor is None else _masked(entry, factor) for entry, factor in zip(entries, factors)]


def _sides(entry: dict) -> tuple[bool, bool]:
    """Which sides an entry counts for: its tag's side; an untagged entry combined in counts for both."""
    tag = _tag(entry)
    return (True, True) if tag is None else (tag[1] == 0, tag[1] == 1)


@dataclass(frozen=True)
class EpsilonBlendWrapper:
    """CALC_COND_BATCH wrapper: masks the tagged entries of every conditioning list, then runs ComfyUI's batch."""

    node: str  # the node's label, for the error when its positive is not the sampler's

    def __call__(self, executor: Any, model: Any, conds: list[list[dict] | None], x: torch.Tensor, timestep: torch.Tensor,
                 model_options: dict) -> list[torch.Tensor]:
        if not any(_tag(entry) is not None for entries in conds if entries for entry in entries):
            raise InputError(self.node, "positive", "the sampler's positive is not this node's positive output, so "
                             "there is nothing to blend", "Connect Epsilon Blend's positive output to the sampler's positive.")
        blended = [entries if entries is None else blend_entries(entries, x, timestep) for entries in conds]
        return executor(model, blended, x, timestep, model_options)


def _profile_inputs(sharpness: float) -> list:
    return [
        io.Combo.Input("profile", options=list(PROFILES), default="sigmoid",
                       tooltip="How the first prompt's weight falls off across the image: sigmoid (the paper), "
                               "linear or cosine ramp, or the mask input (white = first prompt)."),
        io.Combo.Input("direction", options=[*DIRECTIONS, ANGLE], default="left to right",
                       tooltip="Where the first prompt sits: 'left to right' puts it on the left. 'angle' uses the "
                               "angle input."),
        io.Float.Input("angle", default=0.0, min=-360.0, max=360.0, step=1.0,
                       tooltip="With direction 'angle': degrees on the image, 0 = first prompt on the left, "
                               "90 = on top (used only then)."),
        io.Float.Input("center", default=0.5, min=0.0, max=1.0, step=0.01,
                       tooltip="Where both prompts weigh one half, as a fraction along the direction."),
        io.Float.Input("sharpness", default=sharpness, min=0.0, max=200.0, step=0.5,
                       tooltip=f"Sigmoid slope across the whole frame (paper: {sharpness:g}); higher = harder seam. "
                               "Sigmoid only."),
        io.Float.Input("ramp_width", default=1.0, min=0.01, max=1.0, step=0.01,
                       tooltip="Linear and cosine: the fraction of the frame the transition spans (1 = the paper's "
                               "full-width linear ramp)."),
    ]


def _mask_input() -> io.Mask.Input:
    return io.Mask.Input("mask", optional=True,
                         tooltip="With profile 'mask': the first prompt's weight (1 = first, 0 = second), resized "
                                 "to the latent; one mask or one per image. A mask of another aspect ratio is "
                                 "stretched, as ComfyUI's masked conditioning does (the log says so).")


class EpsilonBlend(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            hidden=HIDDEN,
            node_id=EPSILON_BLEND,
            **search_aliases("regional prompt", "regional", "two prompts", "dual style", "style mix", "blend prompts"),
            display_name="Epsilon Blend (dual style)",
            category=f"{CATEGORY}/blend",
            description="Regional prompting, two prompts in one image (Goldszal & Mercier): each step the model "
                        "predicts the noise for both prompts and blends the predictions with a spatial profile built "
                        "at the latent's exact size; the negative is shared, which equals the paper's blend of the two "
                        "CFG'd predictions. ConditioningSetMask + Combine can do a similar blend from a hand-made "
                        "mask; it divides by the summed weight of all entries, so strengths and masks already on the "
                        "prompts weigh against the profile. Here 'complementary' averages each prompt on its own and "
                        "then takes w and 1 - w (the paper); 'normalised' follows ConditioningSetMask's rule. Wire "
                        "both outputs into the sampler.",
            inputs=[
                io.Model.Input("model", tooltip="The model to sample with (any image model)."),
                io.Conditioning.Input("first", tooltip="The first style's prompt (left with the default direction)."),
                io.Conditioning.Input("second", tooltip="The second style's prompt (right with the default direction)."),
                *_profile_inputs(EPSILON_SHARPNESS),
                io.Combo.Input("weighting", options=list(WEIGHTINGS), default="complementary",
                               tooltip="complementary: w * first + (1 - w) * second, each prompt first averaged over "
                                       "its own entries (the paper). normalised: ConditioningSetMask's "
                                       "sum(weight * prediction) / sum(weight), where strengths and masks set "
                                       "upstream count too. Same result with a hard 0/1 profile or plain prompts."),
                _mask_input(),
            ],
            outputs=[
                io.Model.Output(display_name="model", tooltip="The model with the blend installed; sample with it."),
                io.Conditioning.Output(display_name="positive",
                                       tooltip="Both prompts, tagged for the blend: the sampler's positive."),
            ],
        )

    @classmethod
    def execute(cls, model: Any, first: list, second: list, profile: str, direction: str, angle: float, center: float,
                sharpness: float, ramp_width: float, weighting: str, mask: torch.Tensor | None = None) -> io.NodeOutput:
        label = checked_label(cls, locals())
        for name, conditioning in (("first", first), ("second", second)):
            if not conditioning:
                raise InputError(label, name, "the conditioning is empty", f"Connect a prompt to {name} (CLIP Text Encode).")
        group = BlendGroup(blend_weights(label, profile, direction, angle, center, sharpness, ramp_width, mask), weighting)
        positive = [[tensor, {**options, BLEND_TAG: (group, side)}]
                    for side, conditioning in enumerate((first, second)) for tensor, options in conditioning]
        patched = model.clone()
        patched.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.CALC_COND_BATCH, EPSILON_WRAPPER_KEY)
        patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.CALC_COND_BATCH, EPSILON_WRAPPER_KEY,
                                     EpsilonBlendWrapper(label))
        return io.NodeOutput(patched, positive)


# --- CrossAttnBlend -----------------------------------------------------------------------------


@dataclass
class SecondContext:
    """DIFFUSION_MODEL wrapper: appends the second prompt's tokens to every row's context."""

    context: torch.Tensor  # (1, tokens, channels)

    def __call__(self, executor: Any, x: torch.Tensor, timesteps: Any, context: torch.Tensor, y: Any, control: Any,
                 transformer_options: dict, *args: Any, **kwargs: Any) -> torch.Tensor:
        second = self.context.to(context.device, context.dtype).expand(context.shape[0], -1, -1)
        options = {**transformer_options, SECOND_TOKENS: second.shape[1]}
        return executor(x, timesteps, torch.cat([context, second], dim=1), y, control, options, *args, **kwargs)


@dataclass(frozen=True)
class CrossAttnBlendPatch:
    """attn2 replacement for one layer: blend the two contexts' outputs, or attend to the first one only."""

    layer: LayerId
    weights: BlendWeights
    selection: LayerSelection | None = None
    log_sigmas: torch.Tensor | None = field(default=None, compare=False)
    inner: Any = None  # a replace another node set on this layer: delegated to, once per context

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict) -> torch.Tensor:
        second_tokens = extra_options.get(SECOND_TOKENS)
        if second_tokens is None:  # a call that did not go through SecondContext: nothing appended
            return self._attend(q, k, v, extra_options)
        # A delegated patch sees one context per call, and a flag on the second prompt's call.
        first_options = {key: value for key, value in extra_options.items() if key != SECOND_TOKENS}
        if not selection_allows(self.selection, self.layer, extra_options, self.log_sigmas):
            first = k.shape[1] - second_tokens
            return self._attend(q, k[:, :first], v[:, :first], first_options)
        chunks = extra_options["cond_or_uncond"]
        images = q.shape[0] // len(chunks)
        _, _, height, width = extra_options["activations_shape"]
        latent = tuple(extra_options["original_shape"][-2:])
        weight = self.weights.at_layer(latent, (height, width), images, q.device)
        cond = [kind != UNCOND for kind in chunks]
        second_options = {**first_options, SECOND_CONTEXT: True}
        attention = lambda q, k, v, heads, bias: self._attend(q, k, v, first_options)  # noqa: E731
        second_attention = lambda q, k, v, heads, bias: self._attend(q, k, v, second_options)  # noqa: E731
        if self.inner is None:
            rows = [chunk * images + image for chunk, is_cond in enumerate(cond) if is_cond for image in range(images)]
            row_weight = weight.repeat(sum(cond), 1, 1) if weight.shape[0] > 1 else weight
            return dual_context_attention(q, k, v, extra_options["n_heads"], second_tokens, row_weight, rows, attention,
                                          second_attention)
        # A foreign patch indexes its own per-row data by the whole batch: give it every row; uncond rows weigh 1.
        ones = torch.ones_like(weight[:1])
        row_weight = torch.cat([(weight if is_cond else ones).expand(images, -1, -1) for is_cond in cond])
        return dual_context_attention(q, k, v, extra_options["n_heads"], second_tokens, row_weight, slice(None), attention,
                                      second_attention)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict) -> torch.Tensor:
        return plain_attention(q, k, v, extra_options) if self.inner is None else self.inner(q, k, v, extra_options)

    def set_new_condition(self, **kwargs: Any) -> None:
        # IPAdapter, applied after this node, calls this on the patch it finds in the slot.
        raise InputError(self.weights.node, "model", "IPAdapter was applied after Cross-Attention Blend",
                         "Apply IPAdapter first and connect its model to Cross-Attention Blend.")


class CrossAttnBlend(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            hidden=HIDDEN,
            node_id=CROSS_ATTN_BLEND,
            **search_aliases("regional prompt", "regional", "attention couple", "two prompts", "dual style",
                             "blend prompts"),
            display_name="Cross-Attention Blend (dual style)",
            category=f"{CATEGORY}/blend",
            description="Regional prompting, two prompts in one image (Goldszal & Mercier): every cross-attention "
                        "layer attends to the sampler's positive prompt and to a second prompt, and blends the two "
                        "outputs per image token with a spatial profile at that layer's own size. The negative attends "
                        "as usual. One model call per step; only the cross-attention work grows.",
            inputs=[
                io.Model.Input("model", tooltip="An SD1.x, SD2.x, SDXL, SD3/SD3.5 or Flux.1 model. On SD3/Flux, "
                                                "whose text and image share one joint attention, each joint "
                                                "attention runs twice, once without each prompt's text."),
                io.Conditioning.Input("second", tooltip="The second style's prompt (right with the default direction); "
                                                        "the first is the sampler's positive. Only its text tokens are "
                                                        "used (SDXL's, SD3's and Flux's pooled output stays the "
                                                        "positive's)."),
                *_profile_inputs(CROSS_ATTENTION_SHARPNESS),
                _mask_input(),
                io.Custom(LAYERS_TYPE).Input("layers", optional=True,
                                             tooltip="Transformer blocks whose cross-attention blends (from "
                                                     "LayerBalance). Unconnected: every layer, as the paper."),
            ],
            outputs=[io.Model.Output(tooltip="The model with the cross-attention blend installed.")],
        )

    @classmethod
    def execute(cls, model: Any, second: list, profile: str, direction: str, angle: float, center: float,
                sharpness: float, ramp_width: float, mask: torch.Tensor | None = None,
                layers: LayerSelection | None = None) -> io.NodeOutput:
        label = checked_label(cls, locals())
        layout = model_layout(model, label, dit=True)
        context = second_context(model, second, label)
        weights = blend_weights(label, profile, direction, angle, center, sharpness, ramp_width, mask)
        if layers is not None:
            layers.check(layout, label)
        if isinstance(layout, DiTLayout):
            return io.NodeOutput(install_dual_text(model, layout, context, weights, layers))
        log_sigmas = model.get_model_object("model_sampling").log_sigmas.float().cpu() if layers is not None and layers.per_timestep else None
        patched = model.clone()
        for layer in layout.layers:
            inner = existing_replace(patched, "attn2", layer)
            patch = CrossAttnBlendPatch(layer, weights, layers, log_sigmas, inner)
            patched.set_model_attn2_replace(patch, *layer.comfy_key)
        patched.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, CONTEXT_WRAPPER_KEY)
        patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, CONTEXT_WRAPPER_KEY,
                                     SecondContext(context))
        return io.NodeOutput(patched)


def context_width(model: Any) -> int | None:
    """The width of the text embeddings the model takes: a UNet's context_dim, SD3's context embedder's input,
    Flux's txt_in's."""
    diffusion_model = model.get_model_object("diffusion_model")
    for name in ("context_embedder", "txt_in"):
        embedder = getattr(diffusion_model, name, None)
        if embedder is not None and hasattr(embedder, "in_features"):
            return int(embedder.in_features)
    return model.model.model_config.unet_config.get("context_dim")


def second_context(model: Any, second: list, label: str = CROSS_ATTN_BLEND) -> torch.Tensor:
    """The second prompt's token embeddings `(1, tokens, channels)`, checked against the model."""
    if not second:
        raise InputError(label, "second", "the conditioning is empty", "Connect a prompt (CLIP Text Encode).")
    if len(second) > 1:
        raise InputError(label, "second", f"the conditioning holds {len(second)} prompts",
                         "Give one prompt; merge several with Conditioning (Concat) or (Average) first.")
    tensor = second[0][0]
    expected = context_width(model)
    if tensor.ndim != 3 or tensor.shape[0] != 1 or tensor.shape[-1] != expected:
        raise InputError(label, "second", f"the prompt's embedding has shape {tuple(tensor.shape)}, the model "
                         f"takes (1, tokens, {expected})", "Encode the prompt with this model's CLIP.")
    return tensor.detach().cpu()


# --- CrossAttnBlend on SD3/SD3.5 and Flux.1 ------------------------------------------------------


@dataclass(frozen=True)
class DualText:
    """One DiT call's token counts: the first prompt's text, the appended second's, the image's, and the latent."""

    first: int
    second: int
    image: int
    latent: tuple[int, int]

    @property
    def text(self) -> int:
        return self.first + self.second


@dataclass(frozen=True)
class DualTextContext:
    """APPLY_MODEL wrapper (SD3 runs no DIFFUSION_MODEL wrapper): appends the second prompt's tokens to every row's
    context and tells the attention override where the two texts and the image sit."""

    context: torch.Tensor  # (1, tokens, channels)

    def __call__(self, executor: Any, x: torch.Tensor, t: torch.Tensor, c_concat: Any, c_crossattn: Any, control: Any,
                 transformer_options: dict, *args: Any, **kwargs: Any) -> torch.Tensor:
        second = self.context.to(c_crossattn.device, c_crossattn.dtype).expand(c_crossattn.shape[0], -1, -1)
        height, width = x.shape[-2:]
        # Both families patchify 2x2 latent pixels per image token, padding odd sides.
        tokens = DualText(c_crossattn.shape[1], second.shape[1], ((height + 1) // 2) * ((width + 1) // 2),
                          (height, width))
        options = {**transformer_options, DUAL_TEXT: tokens}
        return executor(x, t, c_concat, torch.cat([c_crossattn, second], dim=1), control, options, *args, **kwargs)


@dataclass(frozen=True)
class DualTextPatch:
    """`optimized_attention_override`: every joint attention of the selected blocks as two passes that each leave one
    text out, the image tokens blended per token; image-only calls (SD3.5-M's attn2) and calls without a second text
    go to the override that was there before, else to ComfyUI's kernel. Text comes first in both families (dit.md
    §1.2-1.3); SD3 hands q/k/v `[B, L, ...]`, Flux `[B, H, L, D]`."""

    weights: BlendWeights
    layout: DiTLayout
    selection: LayerSelection | None = None
    inner: Any = None
    keeps_outside: ClassVar[bool] = True  # patches applied later (style, spatial maps) see one pass each

    def __call__(self, func: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        options = kwargs.get("transformer_options") or {}
        tokens: DualText | None = options.get(DUAL_TEXT)
        q = args[0]
        token_dim = 2 if q.ndim == 4 else 1  # Flux [B, H, L, D]; SD3 [B, L, H*D]
        if tokens is None or q.shape[token_dim] < tokens.text + tokens.image:
            return self._attend(func, *args, **kwargs)
        chunks = options["cond_or_uncond"]
        images = q.shape[0] // len(chunks)
        weight = self.weights.at_layer(tokens.latent, ((tokens.latent[0] + 1) // 2, (tokens.latent[1] + 1) // 2),
                                       images, q.device)
        if not self.blends(options):
            weight = torch.ones_like(weight[:1])
        ones = torch.ones_like(weight[:1])
        rows = torch.cat([(weight if kind != UNCOND else ones).expand(images, -1, -1) for kind in chunks])

        cond = [kind != UNCOND for kind in chunks]
        # The second pass only where it blends: the uncond chunks (weight 1) would compute it for nothing.
        second_rows = None if all(cond) else [c * images + i for c, is_cond in enumerate(cond) if is_cond
                                              for i in range(images)]

        def attend(index: torch.Tensor, batch_rows: list[int] | None) -> torch.Tensor:
            picked = tuple(x.index_select(token_dim, index) for x in args[:3])
            pass_options = narrowed(options, int((index < tokens.text).sum()), index)  # one prompt's text tokens
            if int(index[0]) == tokens.first:  # the second text starts this pass: patches below may tell (the maps)
                pass_options[DUAL_TEXT_PASS] = SECOND_PASS
            if batch_rows is not None:  # the cond chunks alone: what the patches below see of the batch
                picked = tuple(x[batch_rows] for x in picked)
                pass_options["cond_or_uncond"] = [kind for kind in chunks if kind != UNCOND]
            return self._attend(func, *picked, *args[3:], **{**kwargs, "transformer_options": pass_options})

        spans = (0, tokens.first), (tokens.first, tokens.text), (tokens.text, tokens.text + tokens.image)
        return dual_text_joint_attention(attend, q.shape[token_dim], *spans, rows, q.device, second_rows)

    def blends(self, options: dict) -> bool:
        """Whether the running block blends (every block without a selection; a graded one by 1000·σ)."""
        if self.selection is None:
            return True
        layer = options.get(BLOCK_LAYER)
        return layer is not None and bool(self.selection.features(layer, 1000.0 * current_sigma(options)))

    def _attend(self, func: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.inner(func, *args, **kwargs) if self.inner is not None else func(*args, **kwargs)


@dataclass(frozen=True)
class LayerStamp:
    """`patches_replace["dit"]` patch of one DiT block: runs it with its LayerId in a copy of transformer_options,
    for a layer selection; a block patch that was there before still runs the block."""

    layer: LayerId
    inner: Any = None

    def __call__(self, args: dict, extra: dict) -> dict:
        stamped = {**args, "transformer_options": {**args["transformer_options"], BLOCK_LAYER: self.layer}}
        return self.inner(stamped, extra) if self.inner is not None else extra["original_block"](stamped)


def stamp_blocks(patched: Any, layout: DiTLayout) -> None:
    """A LayerStamp on every block of the layout (SD3's joint blocks sit in Flux's double_block slots)."""
    slots = patched.model_options.get("transformer_options", {}).get("patches_replace", {}).get("dit", {})
    for layer in layout.layers:
        kind = "single_block" if layer.block == "single" else "double_block"
        current = slots.get((kind, layer.number))
        if not isinstance(current, LayerStamp):
            patched.set_model_patch_replace(LayerStamp(layer, current), "dit", kind, layer.number)


def narrowed(options: dict, text: int, index: torch.Tensor) -> dict:
    """transformer_options for one pass over the tokens `index` with `text` text tokens: the pack's per-block stamps
    (SD3's token counts, Flux's text length and rotary table rows) describe the narrowed sequence."""
    out = dict(options)
    if (block := options.get(BLOCK_TOKENS)) is not None:
        out[BLOCK_TOKENS] = replace(block, text=text)
    if (call := options.get(FLUX_CALL)) is not None:
        out[FLUX_CALL] = replace(call, text=text)
    if (flux_block := options.get(FLUX_BLOCK)) is not None and flux_block.pe is not None:
        out[FLUX_BLOCK] = replace(flux_block, pe=flux_block.pe.index_select(2, index.to(flux_block.pe.device)))
    return out


def without_text_blend(options: dict) -> None:
    """Take an earlier Cross-Attention Blend out of the override chain: a second one replaces it."""
    outer = []
    current = options.get(OVERRIDE)
    while current is not None and getattr(current, "keeps_outside", False):
        if not isinstance(current, DualTextPatch):
            outer.append(current)
        current = current.inner
    for wrapper in reversed(outer):
        current = replace(wrapper, inner=current)
    options[OVERRIDE] = current


def install_dual_text(model: Any, layout: DiTLayout, context: torch.Tensor, weights: BlendWeights,
                      layers: LayerSelection | None) -> Any:
    """A clone of an SD3/SD3.5 or Flux.1 `model` with the joint-attention text blend: the override and the wrapper."""
    patched = model.clone()
    without_text_blend(restored_override(patched))
    set_override(patched, lambda current: DualTextPatch(weights, layout, layers, current))
    if layers is not None:
        stamp_blocks(patched, layout)
    patched.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, CONTEXT_WRAPPER_KEY)
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, CONTEXT_WRAPPER_KEY,
                                 DualTextContext(context))
    return patched
