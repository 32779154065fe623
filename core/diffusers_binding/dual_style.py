"""Dual-style blending on a diffusers pipeline: two prompts in one image (Goldszal & Mercier).

`install_epsilon_blend(pipe, second_prompt, weights)` makes each [uncond, cond] UNet call of the
pipeline also predict the second prompt's conditional noise, in the same call, and hands the
pipeline [uncond, blend(cond_first, cond_second, w)]. `install_cross_attention_blend` makes every
cross-attention layer attend to both prompts and blend the two outputs per image token, at the
layer's own height and width. The pipeline is then called as usual with `prompt=<first prompt>`
and guidance > 1. Both return a handle whose `remove()` restores the UNet; the math is
`core.blend`'s, shared with the ComfyUI nodes.

The UNet batch must be [uncond, cond] halves (diffusers' classifier-free guidance): an odd batch,
or a call of a pipeline that runs without guidance, raises a ValueError rather than blending
rows that are not what they seem.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import DiffusionPipeline, UNet2DConditionModel
from diffusers.models.attention_processor import Attention
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

from ..attention import sdpa_attention
from ..blend import (CROSS_ATTENTION_SHARPNESS, EPSILON_SHARPNESS, Profile, Weights, blend, check_mask,
                     dual_context_attention, latent_weights, layer_weights, rows_of)
from ..layers import LayerId, LayerSelection
from .flow_pipeline import flow_family
from .handle import ProcessorHandle
from .pipeline import default_size, initial_latents
from .processor import (Size, TokenGrid, attention_inputs, attention_output, call_argument, cross_attention_layers,
                        projections)
from .style_aligned import StepClock, unet_layout

METHODS = ("epsilon", "cross-attention", "plain-first", "plain-second")

# UNets that carry a dual-style blend: a second one would grow the batch or the context twice.
_INSTALLED: weakref.WeakSet[UNet2DConditionModel] = weakref.WeakSet()


@dataclass(frozen=True)
class SecondPrompt:
    """The second prompt as the pipeline encodes a prompt: `(1, tokens, width)`, and SDXL's pooled `(1, width)`."""

    embeds: torch.Tensor
    pooled: torch.Tensor | None = None


@torch.no_grad()
def encode_second_prompt(pipe: DiffusionPipeline, prompt: str) -> SecondPrompt:
    """Encode `prompt` with the pipeline's own `encode_prompt` (SD returns 2 tensors, SDXL 4 with the pooled ones)."""
    device = getattr(pipe, "_execution_device", pipe.unet.device)
    # Both signatures name these four arguments alike; SDXL's `prompt_2` defaults to `prompt`, as in its __call__.
    encoded = pipe.encode_prompt(prompt=prompt, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False)
    if len(encoded) == 4:
        return SecondPrompt(encoded[0], encoded[2])
    return SecondPrompt(encoded[0])


def checked_weights(weights: Weights | None, sharpness: float = EPSILON_SHARPNESS) -> Weights:
    """`weights`, or the original's sigmoid across the width at `sharpness` when None; a bad MASK raises."""
    if weights is None:
        return Profile(sharpness=sharpness)
    if isinstance(weights, Profile):
        return weights
    if not isinstance(weights, torch.Tensor):
        raise TypeError(f"weights must be a Profile or a MASK tensor, got {type(weights).__name__}")
    problem = check_mask(weights)
    if problem is not None:
        raise ValueError(problem)
    return weights


def images_of(pipe: Any, batch: int) -> int:
    """How many images a UNet batch of [uncond, cond] halves holds; a ValueError for any other batch."""
    try:
        guided = bool(pipe.do_classifier_free_guidance)
    except AttributeError:  # the pipeline has not run (a direct UNet call): the batch is taken as [uncond, cond]
        guided = True
    if not guided:
        raise ValueError("dual-style blending needs classifier-free guidance: call the pipeline with guidance_scale > 1 "
                         "(its UNet batch must be [uncond, cond])")
    if batch % 2:
        raise ValueError(f"dual-style blending needs a UNet batch of [uncond, cond] halves, got {batch} rows")
    return batch // 2


def _with_argument(args: tuple, kwargs: dict, index: int, name: str, value: Any) -> tuple[tuple, dict]:
    if name in kwargs or len(args) <= index:
        return args, {**kwargs, name: value}
    return args[:index] + (value,) + args[index + 1:], kwargs


def _grow(value: Any, batch: int, images: int) -> Any:
    """Append a copy of the cond half's rows to every tensor batched like the UNet input (in lists and dicts too).

    The second prompt's rows share the first's latent, timestep, time ids and control residuals.
    Containers are rebuilt, never changed: the pipeline reuses its `added_cond_kwargs` each step.
    """
    if isinstance(value, torch.Tensor):
        return torch.cat([value, value[batch - images:]]) if value.ndim and value.shape[0] == batch else value
    if isinstance(value, (list, tuple)):
        return type(value)(_grow(item, batch, images) for item in value)
    if isinstance(value, dict):
        return {key: _grow(item, batch, images) for key, item in value.items()}
    return value


# ---------------------------------------------------------------- handle


@dataclass
class DualStyleHandle(ProcessorHandle):
    """What an install changed; `remove()` puts it back (also on leaving a `with`).

    `processors` are the cross-attention processors by module path (empty for the epsilon blend).
    """

    method: str = ""
    processors: dict[str, DualContextProcessor] = field(default_factory=dict)


def _claim(pipe: DiffusionPipeline) -> UNet2DConditionModel:
    """The pipeline's UNet, refused if it is no SD-style UNet or already carries a blend."""
    unet = getattr(pipe, "unet", None)
    if not isinstance(unet, UNet2DConditionModel) or not hasattr(pipe, "encode_prompt"):
        raise TypeError(f"dual-style blending needs an SD1.x/SD2/SDXL pipeline (a UNet2DConditionModel and "
                        f"encode_prompt), got {type(pipe).__name__}")
    if unet in _INSTALLED:
        raise RuntimeError("a dual-style blend is already installed on this UNet; "
                           "remove() its handle before installing another")
    return unet


# ---------------------------------------------------------------- epsilon


@dataclass
class EpsilonBlend:
    """The UNet hooks of the epsilon blend: grow [uncond, cond] to [uncond, cond, cond_second], then blend.

    The original runs 4 rows [uc, uc, c_L, c_R] and blends the two CFG'd predictions; blending the
    two conditional rows before CFG is the same (`core.blend.blend`), so the shared uncond runs once.
    """

    pipe: Any
    second: SecondPrompt
    weights: Weights
    images: int | None = None  # images of the call in flight, set by `before`, cleared by `after`
    latent_size: Size = (0, 0)
    cache: dict[tuple, torch.Tensor] = field(default_factory=dict, repr=False)

    def before(self, unet: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        sample = call_argument(args, kwargs, 0, "sample")
        context = call_argument(args, kwargs, 2, "encoder_hidden_states")
        added = call_argument(args, kwargs, 7, "added_cond_kwargs")
        batch = sample.shape[0]
        images = images_of(self.pipe, batch)
        second = self.second.embeds.to(context.device, context.dtype)
        if second.shape[1:] != context.shape[1:]:
            raise ValueError(f"the second prompt's embeddings are {tuple(second.shape[1:])} but the first's "
                             f"{tuple(context.shape[1:])}; the epsilon blend batches them, so they must match")
        args, kwargs = _grow(args, batch, images), _grow(kwargs, batch, images)
        args, kwargs = _with_argument(args, kwargs, 2, "encoder_hidden_states",
                                      torch.cat([context, second.expand(images, -1, -1)]))
        if added is not None and "text_embeds" in added:
            if self.second.pooled is None:
                raise ValueError("this UNet takes SDXL's pooled text embeddings but the pipeline gave none "
                                 "for the second prompt")
            pooled = self.second.pooled.to(added["text_embeds"].device, added["text_embeds"].dtype)
            grown = _grow(added, batch, images)
            grown["text_embeds"] = torch.cat([added["text_embeds"], pooled.expand(images, -1)])
            args, kwargs = _with_argument(args, kwargs, 7, "added_cond_kwargs", grown)
        self.images, self.latent_size = images, tuple(sample.shape[-2:])
        return args, kwargs

    def weight(self, images: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """`(images, 1, H, W)` at the latent's true size (non-square latents included)."""
        key = (self.latent_size, images, device, dtype)
        if key not in self.cache:
            self.cache[key] = rows_of(latent_weights(self.weights, *self.latent_size), images)[:, None].to(device, dtype)
        return self.cache[key]

    def after(self, unet: torch.nn.Module, args: tuple, output: Any) -> Any:
        images, self.images = self.images, None
        if images is None:
            return output
        sample = output[0] if isinstance(output, tuple) else output.sample
        uncond, first, second = sample[:images], sample[images:2 * images], sample[2 * images:]
        out = torch.cat([uncond, blend(first, second, self.weight(images, sample.device, sample.dtype))])
        if isinstance(output, tuple):
            return (out, *output[1:])
        return UNet2DConditionOutput(sample=out)


def install_epsilon_blend(pipe: DiffusionPipeline, second_prompt: str, weights: Weights | None = None) -> DualStyleHandle:
    """Blend the second prompt's noise prediction into the pipeline's (Goldszal & Mercier, epsilon branch).

    Call the pipeline with `prompt=<first>` and guidance > 1: each step runs one UNet call on
    [uncond, cond_first, cond_second] and the pipeline sees [uncond, blend(cond_first, cond_second, w)].
    `weights` is a `Profile` or a MASK (1 = first prompt); None is the original's sigmoid, sharpness 20.
    """
    unet = _claim(pipe)
    blender = EpsilonBlend(pipe, encode_second_prompt(pipe, second_prompt), checked_weights(weights, EPSILON_SHARPNESS))
    handle = DualStyleHandle(unet, registry=_INSTALLED, method="epsilon")
    handle.hooks.append(unet.register_forward_pre_hook(blender.before, with_kwargs=True))
    handle.hooks.append(unet.register_forward_hook(blender.after))
    _INSTALLED.add(unet)
    return handle


# ---------------------------------------------------------------- cross-attention


@dataclass
class CrossAttentionBlend:
    """The UNet pre-hook of the cross-attention blend and what every layer's processor reads from it.

    The hook appends the second prompt's tokens to every row's context; the uncond rows ignore them.
    The original (SD1.4) has no pooled text embedding; SDXL's stays the first prompt's.
    """

    pipe: Any
    second: SecondPrompt
    weights: Weights
    images: int = 0
    first_tokens: int = 0
    latent_size: Size = (0, 0)
    cache: dict[tuple, torch.Tensor] = field(default_factory=dict, repr=False)

    def before(self, unet: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        sample = call_argument(args, kwargs, 0, "sample")
        context = call_argument(args, kwargs, 2, "encoder_hidden_states")
        images = images_of(self.pipe, sample.shape[0])
        second = self.second.embeds.to(context.device, context.dtype)
        if second.shape[-1] != context.shape[-1]:
            raise ValueError(f"the second prompt's embeddings are {second.shape[-1]} wide, the first's {context.shape[-1]}")
        self.images, self.first_tokens, self.latent_size = images, context.shape[1], tuple(sample.shape[-2:])
        # Only the text tokens are blended: SDXL's pooled embedding stays the first prompt's, as in the ComfyUI node.
        return _with_argument(args, kwargs, 2, "encoder_hidden_states",
                              torch.cat([context, second.expand(context.shape[0], -1, -1)], dim=1))

    @property
    def second_tokens(self) -> int:
        return self.second.embeds.shape[1]

    def weight(self, layer_size: Size, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """`(images, h * w, 1)`: the first prompt's weight per image token of a layer."""
        key = (self.latent_size, layer_size, self.images, device, dtype)
        if key not in self.cache:
            weights = rows_of(layer_weights(self.weights, self.latent_size, layer_size), self.images)
            self.cache[key] = weights.reshape(self.images, -1, 1).to(device, dtype)
        return self.cache[key]


@dataclass
class DualContextProcessor:
    """diffusers attention processor for one cross-attention (attn2) layer, over two contexts.

    The context holds the first prompt's tokens, then the second's (appended by the UNet pre-hook).
    An active layer blends the cond rows' two attention outputs by the weight at its own grid
    (`grid`, from its Transformer2DModel, not sqrt(N) as the original); the others and the uncond
    rows attend to the first context only. Not an `nn.Module`, so installing it leaves the state dict alone.
    """

    blender: CrossAttentionBlend
    grid: TokenGrid
    layer: LayerId | None = None
    selection: LayerSelection | None = None  # None: every layer blends
    clock: StepClock | None = None  # the UNet call's timestep, for a per-timestep selection
    last_weight: torch.Tensor | None = field(default=None, repr=False)  # the weight of the last call, for inspection

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 *args: Any, **kwargs: Any) -> torch.Tensor:
        if encoder_hidden_states is None:
            raise ValueError("the dual-context processor is for cross-attention (attn2); it got no encoder_hidden_states")
        if attention_mask is not None:
            # A mask sized for one context does not fit two; no SD/SDXL pipeline passes one to attn2.
            raise ValueError("the dual-context cross-attention does not support an attention_mask")
        blender = self.blender
        second_tokens = encoder_hidden_states.shape[1] - blender.first_tokens
        if second_tokens != blender.second_tokens:
            raise RuntimeError(f"the context has {encoder_hidden_states.shape[1]} tokens, not the first prompt's "
                               f"{blender.first_tokens} + the second's {blender.second_tokens}: call the whole UNet, "
                               "whose pre-hook appends the second prompt")
        hidden, context, shape = attention_inputs(attn, hidden_states, encoder_hidden_states, temb)
        query, key, value = projections(attn, hidden, context)
        if self.active():
            if query.shape[0] != 2 * blender.images:
                raise RuntimeError(f"the layer got {query.shape[0]} rows but the UNet call {2 * blender.images}")
            weight = self.layer_weight(query.shape[1], query.device, query.dtype)
            rows = slice(blender.images, 2 * blender.images)  # the cond half; the uncond rows keep the first context
            out = dual_context_attention(query, key, value, attn.heads, second_tokens, weight, rows)
        else:
            first = blender.first_tokens
            out = sdpa_attention(query, key[:, :first], value[:, :first], attn.heads)
        return attention_output(attn, out, hidden_states, shape, query.dtype)

    def active(self) -> bool:
        """Whether this layer blends in the current UNet call (its selection's choice at this timestep)."""
        if self.selection is None:
            return True
        return bool(self.selection.features(self.layer, self.clock.timestep if self.clock else 0.0))

    def layer_weight(self, tokens: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        size = self.grid.size
        if size is None or size[0] * size[1] != tokens:
            raise RuntimeError(f"the layer has {tokens} image tokens but its transformer's input was {size}; "
                               "the layer's height and width come from its Transformer2DModel")
        self.last_weight = self.blender.weight(size, device, dtype)
        return self.last_weight


def install_cross_attention_blend(pipe: DiffusionPipeline, second_prompt: str, weights: Weights | None = None,
                                  layers: LayerSelection | None = None) -> DualStyleHandle:
    """Blend the two prompts' cross-attention outputs in every attn2 layer (Goldszal & Mercier, cross-attention branch).

    Call the pipeline with `prompt=<first>` and guidance > 1. `weights` is a `Profile` or a MASK
    (1 = first prompt); None is the original's sigmoid, sharpness 30. Only the second prompt's text
    tokens are used: SDXL's pooled embedding (global, it cannot be blended per token) stays the
    first prompt's. `layers` limits the blend to a selection's layers (per timestep for a
    graded selection); the others attend to the first prompt only. Previous
    processors come back on `remove()`.
    """
    unet = _claim(pipe)
    blender = CrossAttentionBlend(pipe, encode_second_prompt(pipe, second_prompt),
                                  checked_weights(weights, CROSS_ATTENTION_SHARPNESS))
    found = cross_attention_layers(unet)
    if not found:
        raise ValueError("this UNet has no cross-attention (attn2) layers in Transformer2DModel blocks")
    layout = unet_layout(unet) if layers is not None else None
    if layers is not None:
        layers.check(layout, "install_cross_attention_blend")
    clock = StepClock() if layers is not None and layers.per_timestep else None
    grids: dict[int, TokenGrid] = {}
    processors = {}
    for path, transformer in found.items():
        grid = grids.setdefault(id(transformer), TokenGrid())
        # A selection names self-attention layers; the cross-attention sits in the same transformer block.
        layer = layout.layer_from_diffusers_path(path.replace("attn2", "attn1")) if layout else None
        processors[path] = DualContextProcessor(blender, grid, layer, layers, clock)
    handle = DualStyleHandle(unet, {path: unet.get_submodule(path).processor for path in processors}, registry=_INSTALLED,
                             method="cross-attention",
                             processors=processors)
    for path, processor in processors.items():
        unet.get_submodule(path).set_processor(processor)
    transformers = {id(t): t for t in found.values()}
    for key, grid in grids.items():
        handle.hooks.append(transformers[key].register_forward_pre_hook(grid.hook, with_kwargs=True))
    handle.hooks.append(unet.register_forward_pre_hook(blender.before, with_kwargs=True))
    if clock is not None:
        handle.hooks.append(unet.register_forward_pre_hook(clock.hook, with_kwargs=True))
    _INSTALLED.add(unet)
    return handle


# ---------------------------------------------------------------- sampling

Installer = Callable[..., DualStyleHandle]
INSTALLERS: dict[str, Installer] = {"epsilon": install_epsilon_blend, "cross-attention": install_cross_attention_blend}


def generate_dual_style(pipe: DiffusionPipeline, first: str, second: str, method: str = "epsilon",
                        weights: Weights | None = None, *, steps: int = 50, guidance_scale: float = 7.5, seed: int = 0,
                        height: int | None = None, width: int | None = None, layers: LayerSelection | None = None,
                        output_type: str = "pil", **pipeline_kwargs: Any) -> Any:
    """One image of `first` and `second` blended by `weights` (see the installers), or a plain one.

    `method` is "epsilon", "cross-attention", or "plain-first"/"plain-second" (one prompt alone,
    for comparison). Every method starts from the same noise (`seed`), so they compare pixel for
    pixel. Returns the pipeline's `images` (PIL unless `output_type` says otherwise).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if flow_family(pipe) is not None:
        return _generate_flow_dual_style(pipe, first, second, method, weights, steps=steps,
                                         guidance_scale=guidance_scale, seed=seed, height=height, width=width,
                                         layers=layers, output_type=output_type, **pipeline_kwargs)
    height, width = height or default_size(pipe), width or default_size(pipe)
    latents = initial_latents(pipe, 1, height, width, seed)
    call = dict(prompt=second if method == "plain-second" else first, num_inference_steps=steps,
                guidance_scale=guidance_scale, height=height, width=width, latents=latents, output_type=output_type,
                **pipeline_kwargs)
    if method.startswith("plain-"):
        return pipe(**call).images
    if guidance_scale <= 1:
        raise ValueError("dual-style blending needs classifier-free guidance: guidance_scale must be > 1")
    extra = {"layers": layers} if method == "cross-attention" else {}
    if layers is not None and method != "cross-attention":
        raise ValueError("layers selects cross-attention layers; the epsilon blend has none to select")
    with INSTALLERS[method](pipe, second, weights, **extra):
        return pipe(**call).images


def _generate_flow_dual_style(pipe: DiffusionPipeline, first: str, second: str, method: str, weights: Weights | None,
                              *, steps: int, guidance_scale: float, seed: int, height: int | None, width: int | None,
                              layers: LayerSelection | None, output_type: str, **pipeline_kwargs: Any) -> Any:
    """`generate_dual_style` on SD3/SD3.5 and Flux: the velocity blend or the joint-attention text blend; any
    guidance (Flux-dev's is distilled; SD3 without CFG blends its cond rows)."""
    from .dual_style_flow import install_flow_cross_attention_blend, install_flow_epsilon_blend
    from .flow_pipeline import default_flow_size, initial_flow_latents

    if layers is not None and method != "cross-attention":
        raise ValueError("layers selects joint attention layers; the epsilon blend has none to select")
    height, width = height or default_flow_size(pipe), width or default_flow_size(pipe)
    call = dict(prompt=second if method == "plain-second" else first, num_inference_steps=steps,
                guidance_scale=guidance_scale, height=height, width=width,
                latents=initial_flow_latents(pipe, 1, height, width, seed), output_type=output_type, **pipeline_kwargs)
    if method.startswith("plain-"):
        return pipe(**call).images
    length = pipeline_kwargs.get("max_sequence_length")
    if method == "cross-attention":
        handle = install_flow_cross_attention_blend(pipe, second, weights, layers, length)
    else:
        handle = install_flow_epsilon_blend(pipe, second, weights, length)
    with handle:
        return pipe(**call).images
