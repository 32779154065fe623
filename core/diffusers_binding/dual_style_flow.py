"""The epsilon blend on SD3/SD3.5 and Flux pipelines: a velocity blend of two prompts (dit.md §4.3).

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
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import DiffusionPipeline

from ..blend import EPSILON_SHARPNESS, Weights, blend, latent_weights, rows_of
from .dual_style import DualStyleHandle, SecondPrompt, checked_weights
from .flow_pipeline import flow_family, pack

# Transformers that carry a flow epsilon blend: a second would grow the batch twice.
_INSTALLED: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()
# Both transformers' forward(hidden_states, encoder_hidden_states, pooled_projections, timestep, ...).
HIDDEN, TEXT, POOLED, TIMESTEP = 0, 1, 2, 3
IMAGE_IDS = 4  # Flux's img_ids: (index, row, column) per token
BATCHED = ("hidden_states", "timestep", "guidance")  # per-row inputs the second prompt's rows copy from the cond rows
NAMES = ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "img_ids")


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


def _arguments(args: tuple, kwargs: dict) -> dict[str, Any]:
    """The hooked call as keywords (the pipelines pass keywords; positions are the forward's order)."""
    named = dict(kwargs)
    for index, name in enumerate(NAMES):
        if name not in named and len(args) > index:
            named[name] = args[index]
    return named


@dataclass
class FlowEpsilonBlend:
    """Transformer hooks: grow the call by the second prompt's rows, then blend its velocities into the cond rows."""

    pipe: Any
    second: SecondPrompt
    weights: Weights
    flux: bool
    rows: tuple[int, int] | None = None  # (first cond row, images) of the call in flight; None: left alone
    latent_size: tuple[int, int] = (0, 0)
    steps_seen: set[tuple[int, Any]] = field(default_factory=set)  # (schedule, step) pairs already grown
    cache: dict[tuple, torch.Tensor] = field(default_factory=dict, repr=False)

    def cond_rows(self, batch: int) -> tuple[int, int] | None:
        """Where the cond rows start and how many; None for a Flux true-CFG negative call (the step's second)."""
        if self.flux:
            scheduler = self.pipe.scheduler
            step = (id(scheduler.timesteps), scheduler.step_index)
            if step in self.steps_seen:
                return None
            self.steps_seen.add(step)
            return 0, batch
        if getattr(self.pipe, "do_classifier_free_guidance", True):  # SD3 under CFG: [uncond, cond]
            if batch % 2:
                raise ValueError(f"the epsilon blend needs a batch of [uncond, cond] halves, got {batch} rows")
            return batch // 2, batch // 2
        return 0, batch

    def before(self, transformer: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        named = _arguments(args, kwargs)
        hidden = named["hidden_states"]
        self.rows = self.cond_rows(hidden.shape[0])
        if self.rows is None:
            return args, kwargs
        start, images = self.rows
        context = named["encoder_hidden_states"]
        second = self.second.embeds.to(context.device, context.dtype)
        if second.shape[1:] != context.shape[1:]:
            raise ValueError(f"the second prompt's embeddings are {tuple(second.shape[1:])} but the first's "
                             f"{tuple(context.shape[1:])}; encode both with the same max_sequence_length")
        grown = {name: torch.cat([value, value[start:start + images]])
                 for name in BATCHED if isinstance(value := named.get(name), torch.Tensor) and value.ndim
                 and value.shape[0] == hidden.shape[0]}
        pooled = named["pooled_projections"]
        grown["encoder_hidden_states"] = torch.cat([context, second.expand(images, -1, -1)])
        grown["pooled_projections"] = torch.cat([pooled, self.second.pooled.to(pooled).expand(images, -1)])
        self.latent_size = self._latent_size(named)
        return (), {**named, **grown}

    def _latent_size(self, named: dict[str, Any]) -> tuple[int, int]:
        """The unpacked latent's (h, w): SD3's input itself; Flux's from its image ids' rows and columns (2x2 per token)."""
        if not self.flux:
            return tuple(named["hidden_states"].shape[-2:])
        ids = named["img_ids"]
        ids = ids[0] if ids.ndim == 3 else ids
        return 2 * (int(ids[:, 1].max()) + 1), 2 * (int(ids[:, 2].max()) + 1)

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
