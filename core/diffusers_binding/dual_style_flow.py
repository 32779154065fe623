"""Dual-style blending on SD3/SD3.5 and Flux pipelines: the velocity blend and the joint-attention text blend
(dit.md §4.3).

On a flow model the blend acts on the predicted velocities: x̂₀ = x − σ·v is affine in v, so blending the two
prompts' velocities per latent pixel is blending their predictions of the image, and with a shared uncond and
plain CFG, blending the conditional velocities before CFG equals the paper's blend of the two CFG'd ones
(`core.blend.blend`). It does not hold for guidance that is not affine in the prediction (CFG rescale, APG,
SD3's skip-layer guidance), which these pipelines do not run by default.

`install_flow_epsilon_blend(pipe, second_prompt, weights)` grows each transformer call by the second prompt's
rows (SD3 under CFG: [uncond, cond] → [uncond, cond, cond_second]; without CFG and on Flux-dev, which embeds
its guidance: [cond, cond_second]) and hands the pipeline the blend. On Flux the weights are packed into its
2x2-pixel tokens like the latent. A Flux true-CFG step (a negative prompt and `true_cfg_scale` > 1) calls the
transformer a second time at the same scheduler step with the negative prompt: that call is left alone, so the
blend stays before CFG with the shared negative.

`install_flow_cross_attention_blend(pipe, second_prompt, weights)` is the cross-attention blend where text and
image share one joint attention: the second prompt's tokens are appended to every row's text, and in every joint
attention (SD3's joint blocks; Flux's double and single blocks) the two texts never see each other and the image
tokens take w·(attention without the second text) + (1 − w)·(attention without the first), per image token
(`core.blend.dual_text_joint_attention`). The uncond rows, and layers a selection leaves out, take the first
prompt's pass only (weight 1); the second pass runs on the cond rows alone, as the node's. The pooled text embedding stays the first prompt's, as on SDXL.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import DiffusionPipeline

from ..attention import sdpa_attention
from ..blend import (CROSS_ATTENTION_SHARPNESS, EPSILON_SHARPNESS, Weights, blend, dual_text_joint_attention,
                     latent_weights, layer_weights, rows_of)
from ..layers import LayerSelection, select_all
from .dual_style import DualStyleHandle, SecondPrompt, checked_weights
from .flow_pipeline import first_call_of_step, flow_family, pack
from .joint_style import (FlowClock, JointStyleProcessor, dit_layout, install_processors, sd3_joint_output,
                          sd3_joint_qkv)
from .joint_style_flux import flux_layout, joint_qkv, rotated

# Transformers that carry a flow epsilon blend: a second would grow the batch twice.
_INSTALLED: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()
BATCHED = ("hidden_states", "timestep", "guidance")  # per-row inputs the second prompt's rows copy from the cond rows
# The transformers' forward arguments in order (the pipelines pass keywords; positions are read too).
SD3_NAMES = ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep")
FLUX_NAMES = (*SD3_NAMES, "img_ids", "txt_ids", "guidance")


@torch.no_grad()
def encode_flow_second_prompt(pipe: DiffusionPipeline, prompt: str,
                              max_sequence_length: int | None = None) -> SecondPrompt:
    """The second prompt as the pipeline encodes its prompt: context `(1, tokens, width)` and pooled `(1, width)`."""
    device = pipe._execution_device
    length = {} if max_sequence_length is None else {"max_sequence_length": max_sequence_length}
    if flow_family(pipe) == "flux":
        embeds, pooled, _ = pipe.encode_prompt(prompt, None, device=device, **length)
    else:
        embeds, _, pooled, _ = pipe.encode_prompt(prompt, None, None, device=device, do_classifier_free_guidance=False,
                                                  **length)
    return SecondPrompt(embeds, pooled)


def _arguments(args: tuple, kwargs: dict, flux: bool) -> dict[str, Any]:
    """The hooked call as keywords (the pipelines pass keywords; positions are the forward's order)."""
    named = dict(kwargs)
    for index, name in enumerate(FLUX_NAMES if flux else SD3_NAMES):
        if name not in named and len(args) > index:
            named[name] = args[index]
    return named


def latent_size(named: dict[str, Any], flux: bool) -> tuple[int, int]:
    """The unpacked latent's (h, w): SD3's input itself; Flux's from its image ids' rows and columns (2x2 per token)."""
    if not flux:
        return tuple(named["hidden_states"].shape[-2:])
    ids = named["img_ids"]
    ids = ids[0] if ids.ndim == 3 else ids
    return 2 * (int(ids[:, 1].max()) + 1), 2 * (int(ids[:, 2].max()) + 1)


@dataclass
class FlowBlend:
    """What both flow blends share: the pipeline, the second prompt, the weights, and which rows of a call blend."""

    pipe: Any
    second: SecondPrompt
    weights: Weights
    flux: bool
    steps_seen: set[tuple[int, Any]] = field(default_factory=set)  # Flux: (schedule, step) pairs already blended
    cache: dict[tuple, torch.Tensor] = field(default_factory=dict, repr=False)

    def cond_rows(self, batch: int) -> tuple[int, int] | None:
        """Where the cond rows start and how many; None for a Flux true-CFG negative call (the step's second)."""
        if self.flux:
            return (0, batch) if first_call_of_step(self.pipe, self.steps_seen) else None
        if getattr(self.pipe, "do_classifier_free_guidance", True):  # SD3 under CFG: [uncond, cond]
            if batch % 2:
                raise ValueError(f"the epsilon blend needs a batch of [uncond, cond] halves, got {batch} rows")
            return batch // 2, batch // 2
        return 0, batch

    def second_embeds(self, context: torch.Tensor, same_length: bool) -> torch.Tensor:
        """The second prompt's context on the first's device and dtype; a ValueError when the widths (and, for the
        epsilon blend's batch, the lengths) differ."""
        second = self.second.embeds.to(context.device, context.dtype)
        if second.shape[-1] != context.shape[-1] or (same_length and second.shape[1] != context.shape[1]):
            raise ValueError(f"the second prompt's embeddings are {tuple(second.shape[1:])} but the first's "
                             f"{tuple(context.shape[1:])}; encode both with the same max_sequence_length")
        return second


@dataclass
class FlowEpsilonBlend(FlowBlend):
    """Transformer hooks: grow the call by the second prompt's rows, then blend its velocities into the cond rows."""

    rows: tuple[int, int] | None = None  # (first cond row, images) of the call in flight; None: left alone
    latent_size: tuple[int, int] = (0, 0)

    def before(self, transformer: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        named = _arguments(args, kwargs, self.flux)
        hidden = named["hidden_states"]
        self.rows = self.cond_rows(hidden.shape[0])
        if self.rows is None:
            return args, kwargs
        start, images = self.rows
        context = named["encoder_hidden_states"]
        second = self.second_embeds(context, same_length=True)
        grown = {name: torch.cat([value, value[start:start + images]])
                 for name in BATCHED if isinstance(value := named.get(name), torch.Tensor) and value.ndim
                 and value.shape[0] == hidden.shape[0]}
        pooled = named["pooled_projections"]
        grown["encoder_hidden_states"] = torch.cat([context, second.expand(images, -1, -1)])
        grown["pooled_projections"] = torch.cat([pooled, self.second.pooled.to(pooled).expand(images, -1)])
        self.latent_size = latent_size(named, self.flux)
        return (), {**named, **grown}

    def weight(self, images: int, channels: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The first prompt's weight per latent pixel, `(images, 1, h, w)`; on Flux packed to `(images, L, 4C)`."""
        key = (self.latent_size, images, channels, device, dtype)
        if key not in self.cache:
            weight = rows_of(latent_weights(self.weights, *self.latent_size), images)[:, None]
            if self.flux:
                weight = pack(weight.expand(-1, channels // 4, -1, -1).contiguous())
            self.cache[key] = weight.to(device, dtype)
        return self.cache[key]

    def after(self, transformer: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        rows, self.rows = self.rows, None
        if rows is None:
            return output
        start, images = rows
        sample = output[0] if isinstance(output, tuple) else output.sample
        first, second = sample[start:start + images], sample[-images:]
        weight = self.weight(images, sample.shape[-1], sample.device, sample.dtype)
        out = torch.cat([sample[:start], blend(first, second, weight)])
        if isinstance(output, tuple):
            return (out, *output[1:])
        output.sample = out
        return output


def install_flow_epsilon_blend(pipe: DiffusionPipeline, second_prompt: str, weights: Weights | None = None,
                               max_sequence_length: int | None = None) -> DualStyleHandle:
    """Blend the second prompt's velocity into an SD3/SD3.5 or Flux pipeline's, per latent pixel (1 = first prompt).

    Call the pipeline with `prompt=<first>`; `max_sequence_length` must be the call's (T5 pads to it). `weights` is
    a `Profile` or a MASK; None is the original's sigmoid, sharpness 20. Returns the handle that removes it.
    """
    family = flow_family(pipe)
    if family is None:
        raise TypeError(f"install_flow_epsilon_blend needs an SD3/SD3.5 or Flux pipeline, got {type(pipe).__name__}")
    transformer = pipe.transformer
    if transformer in _INSTALLED:
        raise RuntimeError("an epsilon blend is already installed on this transformer; remove() its handle first")
    blender = FlowEpsilonBlend(pipe, encode_flow_second_prompt(pipe, second_prompt, max_sequence_length),
                               checked_weights(weights, EPSILON_SHARPNESS), family == "flux")
    handle = DualStyleHandle(transformer, registry=_INSTALLED, method="epsilon")
    handle.hooks.append(transformer.register_forward_pre_hook(blender.before, with_kwargs=True))
    handle.hooks.append(transformer.register_forward_hook(blender.after, with_kwargs=True))
    _INSTALLED.add(transformer)
    return handle


# ---------------------------------------------------------------- the cross-attention blend in joint attention

@dataclass
class FlowCrossAttentionBlend(FlowBlend):
    """The transformer pre-hook: the second prompt's tokens appended to every row's text; what each processor reads.

    `second_tokens` is None for a call left alone (a Flux true-CFG negative call); `row_weight` is the first
    prompt's weight per row and image token, 1 on the uncond rows.
    """

    first_tokens: int = 0
    second_tokens: int | None = None
    row_weight: torch.Tensor | None = None
    second_rows: list[int] | None = None  # the rows that blend (SD3 under CFG: the cond half); None: all
    clock: FlowClock = field(default_factory=FlowClock)

    def before(self, transformer: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        named = _arguments(args, kwargs, self.flux)
        hidden, context = named["hidden_states"], named["encoder_hidden_states"]
        rows = self.cond_rows(hidden.shape[0])
        self.second_tokens = None
        if rows is None:
            return args, kwargs
        second = self.second_embeds(context, same_length=False)
        self.first_tokens, self.second_tokens = context.shape[1], second.shape[1]
        self.row_weight = self.weight(hidden.shape[0], rows, latent_size(named, self.flux), hidden.device)
        start, images = rows
        # The second pass only where it blends: the uncond rows (weight 1) would compute it for nothing.
        self.second_rows = None if images == hidden.shape[0] else list(range(start, start + images))
        appended = {"encoder_hidden_states": torch.cat([context, second.expand(hidden.shape[0], -1, -1)], dim=1)}
        text_ids = named.get("txt_ids")
        if self.flux and text_ids is not None:  # T5 tokens sit at position 0 on every rotary axis, as the pipeline's
            ids = text_ids[0] if text_ids.ndim == 3 else text_ids
            appended["txt_ids"] = torch.cat([ids, ids.new_zeros(self.second_tokens, ids.shape[-1])])
        return (), {**named, **appended}

    def weight(self, batch: int, rows: tuple[int, int], latent: tuple[int, int], device: torch.device) -> torch.Tensor:
        """`(batch, image tokens, 1)`: the profile at the token grid (2x2 latent pixels per token) on the cond rows."""
        start, images = rows
        key = (batch, rows, latent, device)
        if key not in self.cache:
            grid = ((latent[0] + 1) // 2, (latent[1] + 1) // 2)
            cond = rows_of(layer_weights(self.weights, latent, grid), images).reshape(images, -1, 1)
            weight = torch.ones(batch, cond.shape[1], 1)
            weight[start:start + images] = cond
            self.cache[key] = weight.to(device)
        return self.cache[key]


@dataclass
class DualTextProcessor:
    """diffusers processor for one SD3 or Flux joint attention with the cross-attention blend.

    Calls that carry no second text (the blend's hook left them alone; SD3.5-M's image-only attn2) go to the
    processor it replaced. `selected` is False where a layer selection leaves the layer out: the image tokens
    then take the first prompt's pass only.
    """

    blend: FlowCrossAttentionBlend
    original: Any
    layer: Any = None
    selection: LayerSelection | None = None

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, image_rotary_emb: Any = None, **kwargs: Any) -> Any:
        blend = self.blend
        joint = encoder_hidden_states is not None or blend.flux  # Flux single blocks carry the text in hidden_states
        if blend.second_tokens is None or not joint:
            extra = {"image_rotary_emb": image_rotary_emb} if blend.flux else {}
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, **extra, **kwargs)
        if attention_mask is not None:
            raise ValueError("the cross-attention blend on SD3/Flux does not take an attention mask")
        heads, text = attn.heads, blend.first_tokens + blend.second_tokens
        if blend.flux:
            q, k, v = joint_qkv(attn, hidden_states, encoder_hidden_states)
            q, k = rotated(q, image_rotary_emb, heads), rotated(k, image_rotary_emb, heads)
            first, second, image = (0, blend.first_tokens), (blend.first_tokens, text), (text, q.shape[1])
        else:
            q, k, v = sd3_joint_qkv(attn, hidden_states, encoder_hidden_states)
            image_tokens = hidden_states.shape[1]
            first = (image_tokens, image_tokens + blend.first_tokens)
            second, image = (first[1], q.shape[1]), (0, image_tokens)
        weight = blend.row_weight if self.blends() else torch.ones_like(blend.row_weight)
        def attend(index: torch.Tensor, rows: list[int] | None) -> torch.Tensor:
            picked = (q, k, v) if rows is None else (q[rows], k[rows], v[rows])
            return sdpa_attention(*(x[:, index] for x in picked), heads)

        out = dual_text_joint_attention(attend, q.shape[1], first, second, image, weight, q.device,
                                        blend.second_rows).to(q.dtype)
        if not blend.flux:
            return sd3_joint_output(attn, out, hidden_states.shape[1])
        if encoder_hidden_states is None:  # a single block: the joint stream goes on as one
            return out
        return attn.to_out[1](attn.to_out[0](out[:, text:].contiguous())), attn.to_add_out(out[:, :text].contiguous())

    def blends(self) -> bool:
        """Whether this layer blends now (a per-timestep selection is read at the call's 1000·σ)."""
        return self.selection is None or bool(self.selection.features(self.layer, self.blend.clock.timestep))


def install_flow_cross_attention_blend(pipe: DiffusionPipeline, second_prompt: str, weights: Weights | None = None,
                                       layers: LayerSelection | None = None,
                                       max_sequence_length: int | None = None) -> DualStyleHandle:
    """The cross-attention blend on an SD3/SD3.5 or Flux pipeline (see the module's text); call the pipeline with
    `prompt=<first>`. `weights` is a `Profile` or a MASK (1 = first prompt); None is the original's sigmoid,
    sharpness 30. `layers` picks the joint attentions that blend (SD3 `joint.N`, Flux `double.N` / `single.N`;
    per timestep for a graded selection, at 1000·σ); the others attend to the first prompt."""
    family = flow_family(pipe)
    if family is None:
        raise TypeError(f"install_flow_cross_attention_blend needs an SD3/SD3.5 or Flux pipeline, got "
                        f"{type(pipe).__name__}")
    transformer = pipe.transformer
    if transformer in _INSTALLED:
        raise RuntimeError("a dual-style blend is already installed on this transformer; remove() its handle first")
    if any(isinstance(p, (JointStyleProcessor, DualTextProcessor)) for p in transformer.attn_processors.values()):
        raise RuntimeError("another of the pack's processors (StyleAligned) is on this transformer: the cross-attention "
                           "blend replaces the joint attention's processor, so remove() that handle first")
    flux = family == "flux"
    blender = FlowCrossAttentionBlend(pipe, encode_flow_second_prompt(pipe, second_prompt, max_sequence_length),
                                      checked_weights(weights, CROSS_ATTENTION_SHARPNESS), flux,
                                      clock=FlowClock(scale=1000.0 if flux else 1.0))
    return install_dual_text_processors(transformer, blender, layers)


def install_dual_text_processors(transformer: torch.nn.Module, blender: FlowCrossAttentionBlend,
                                 layers: LayerSelection | None = None) -> DualStyleHandle:
    """A `DualTextProcessor` on every joint attention of `transformer` and the blend's hooks (the second prompt
    already encoded in `blender`)."""
    layout = flux_layout(transformer) if blender.flux else dit_layout(transformer)
    selection = layers if layers is not None else select_all(layout)
    selection.check(layout, "install_flow_cross_attention_blend")
    processors = {layout.diffusers_path(layer): DualTextProcessor(
        blender, transformer.get_submodule(layout.diffusers_path(layer)).processor, layer,
        None if layers is None else selection) for layer in layout.layers}
    handle = install_processors(transformer, processors)
    handle = DualStyleHandle(transformer, handle.previous, handle.hooks, registry=_INSTALLED, method="cross-attention",
                             processors=processors)
    handle.hooks.append(transformer.register_forward_pre_hook(blender.clock.hook, with_kwargs=True))
    handle.hooks.append(transformer.register_forward_pre_hook(blender.before, with_kwargs=True))
    _INSTALLED.add(transformer)
    return handle
