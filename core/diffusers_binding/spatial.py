"""InfSplign spatial guidance on a diffusers SD1.x/SD2/SDXL pipeline: "A to the left of B" comes out right.

`generate_spatial(pipe, prompt, object_a, relation, object_b)` samples with its own loop over
`pipe.scheduler`. At a guided step the conditional rows run with gradients and record the
head-averaged cross-attention probabilities of the greenlisted attn2 layers
(`core.spatial.guidance_layers`), each at its layer's own height and width; `guidance_loss` of
the two objects' maps is differentiated with respect to the scheduler's latent (the UNet input)
and added to the CFG noise prediction, `eps <- eps_u + g (eps_c - eps_u) + w dL/dx_t`, as the
original's `models.py`. The loss math is `core.spatial`'s, shared with the ComfyUI nodes.

The original samples with `DDPMScheduler(timestep_spacing="trailing")`, 50 steps
(`infsplign_scheduler`); `generate_spatial` uses whatever scheduler the pipeline has.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import DDPMScheduler, DiffusionPipeline, UNet2DConditionModel
from diffusers.utils.torch_utils import randn_tensor

from ..spatial import (RELATION_PHRASES, LayerMaps, SpatialSettings, attention_with_maps, centroid_and_variance,
                       find_subsequence, guidance_layers, guidance_loss, object_map, relation_distance)
from .handle import ProcessorHandle
from .dual_style import DualContextProcessor
from .flow_pipeline import flow_family
from .pipeline import cfg_unet_inputs, default_size, row_generators
from .processor import TokenGrid, attention_inputs, attention_output, call_argument, cross_attention_layers, projections
from .style_aligned import unet_layout, unet_of

# Backward through a float16 UNet: the loss is scaled up before autograd and the gradient scaled
# back in float32, so small gradients do not flush to zero (what the original's unused `sg_loss_rescale`
# argument was for).
HALF_LOSS_RESCALE = 1024.0

# UNets that carry the map recorders: a second install would wrap the first.
_INSTALLED: weakref.WeakSet[UNet2DConditionModel] = weakref.WeakSet()


def infsplign_scheduler(pipe: DiffusionPipeline) -> DDPMScheduler:
    """The original's sampler: `DDPMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")`."""
    return DDPMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")


def normalized_relation(relation: str) -> str:
    """"to the left of" -> "left of": a relation of `core.spatial.RELATIONS` or one of its phrases."""
    text = " ".join(relation.lower().replace("-", " ").replace("_", " ").split())
    return RELATION_PHRASES.get(text, text)


# ---------------------------------------------------------------- tokens


def object_tokens(pipe: DiffusionPipeline, prompt: str, word: str, exclude: Sequence[int] = (), *,
                  tokenizer: Any = None, max_length: int | None = None) -> list[int]:
    """The positions of `word`'s tokens in the tokenised `prompt` (BOS at 0), avoiding `exclude`.

    As the original: the prompt is tokenised with the pipeline's `tokenizer` (CLIP-L on SDXL, whose
    positions the 2048-wide context shares), the word without BOS/EOS, and the first occurrence of
    the word's ids that avoids `exclude` is taken. Pass object A's positions as `exclude` for
    object B, so "a dog to the left of a dog" gives B the second dog. A word that is not in the
    prompt (within the tokenizer's context) raises a ValueError naming both. `tokenizer` and `max_length`
    pick another tokenizer and context (Flux: its T5's, no start token; `spatial_flow.flow_object_tokens`).
    """
    tokenizer = tokenizer or pipe.tokenizer
    max_length = max_length or tokenizer.model_max_length
    ids = tokenizer(prompt, truncation=True, max_length=max_length).input_ids
    word_ids = tokenizer(word, add_special_tokens=False).input_ids
    if not word.strip() or not word_ids:
        raise ValueError(f"the object word must be a word of the prompt, got {word!r}")
    positions = find_subsequence(ids, word_ids, exclude)
    if not positions:
        again = " (again, apart from the other object's)" if find_subsequence(ids, word_ids) else ""
        raise ValueError(f"the object {word!r} is not{again} in the prompt {prompt!r} (within its first "
                         f"{max_length} tokens); use a word of the prompt, spelled as there")
    return positions


# ---------------------------------------------------------------- recording


@dataclass
class MapRecorder:
    """What the processors record: the rows of the UNet batch being recorded (None: none) and their maps."""

    rows: slice | None = None
    maps: dict[str, LayerMaps] = field(default_factory=dict)

    @contextmanager
    def recording(self, rows: slice) -> Iterator[dict[str, LayerMaps]]:
        """Record `rows` of the UNet calls inside; yields the maps by attn2 path (filled as the call runs)."""
        self.rows, self.maps = rows, {}
        try:
            yield self.maps
        finally:
            self.rows = None


@dataclass
class SpatialMapProcessor:
    """diffusers attention processor for one greenlisted cross-attention (attn2) layer.

    While its recorder records, it keeps `LayerMaps` of the recorded rows: the head-averaged
    probabilities over all text tokens (BOS included, as `get_attention_scores`) at the layer's own
    (height, width) from its Transformer2DModel (`grid`), never sqrt(N). With gradients enabled
    (a guided conditional call) the layer's output comes from the same softmax
    (`attention_with_maps`), so the loss differentiates through the maps and the output alike.
    Without gradients (the final step's maps) the output is the previous processor's, the maps a
    side computation, so the sampled image is unchanged. Not recording, it is the previous
    processor. Not an `nn.Module`, so installing it leaves the state dict alone.
    """

    recorder: MapRecorder
    grid: TokenGrid
    path: str
    role: str
    previous: Any

    def __call__(self, attn: Any, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        rows = self.recorder.rows
        if rows is None:
            return self.previous(attn, hidden_states, *args, **kwargs)
        context = call_argument(args, kwargs, 0, "encoder_hidden_states")
        if context is None:
            raise ValueError(f"{self.path}: the spatial map processor is for cross-attention (attn2); "
                             "it got no encoder_hidden_states")
        if call_argument(args, kwargs, 1, "attention_mask") is not None:
            raise ValueError(f"{self.path}: recording cross-attention maps does not support an attention_mask")
        if attn.spatial_norm is not None or kwargs.get("temb") is not None:
            raise ValueError(f"{self.path}: recording cross-attention maps does not support a spatial norm")
        if not torch.is_grad_enabled():
            out = self.previous(attn, hidden_states, *args, **kwargs)
            flat, text, _ = attention_inputs(attn, hidden_states[rows], context[rows])
            query, key, value = projections(attn, flat, text)
            self.store(attention_with_maps(query, key, value, attn.heads)[1])
            return out
        flat, text, shape = attention_inputs(attn, hidden_states, context)
        query, key, value = projections(attn, flat, text)
        out, probs = attention_with_maps(query, key, value, attn.heads)
        self.store(probs[rows])
        return attention_output(attn, out, hidden_states, shape, query.dtype)

    def store(self, probs: torch.Tensor) -> None:
        size = self.grid.size
        if size is None or size[0] * size[1] != probs.shape[1]:
            raise RuntimeError(f"{self.path}: the layer has {probs.shape[1]} image tokens but its transformer's input "
                               f"was {size}; the layer's height and width come from its Transformer2DModel")
        self.recorder.maps[self.path] = LayerMaps(probs, size[0], size[1], self.role)


@dataclass
class SpatialHandle(ProcessorHandle):
    """The installed map recorders; `remove()` restores the processors and hooks (also on leaving a `with`)."""

    recorder: MapRecorder = field(default_factory=lambda: MapRecorder())
    processors: dict[str, SpatialMapProcessor] = field(default_factory=dict)  # by attn2 path, in guidance_layers order

    def layers(self, maps: dict[str, LayerMaps]) -> list[LayerMaps]:
        """The recorded maps in greenlist order; a layer that recorded nothing raises."""
        missing = [path for path in self.processors if path not in maps]
        if missing:
            raise RuntimeError(f"no cross-attention maps were recorded at {missing}; record a whole UNet call")
        return [maps[path] for path in self.processors]


def spatial_layer_paths(unet: UNet2DConditionModel) -> dict[str, str]:
    """The greenlisted cross-attention (attn2) module paths with their loss roles (`core.spatial.guidance_layers`)."""
    layout = unet_layout(unet)
    return {layout.diffusers_path(layer).removesuffix("attn1") + "attn2": role
            for layer, role in guidance_layers(layout).items()}


def install_spatial_maps(unet_or_pipeline: Any) -> SpatialHandle:
    """Put a `SpatialMapProcessor` on every greenlisted attn2 layer and a grid hook on its transformer.

    Nothing is recorded until `handle.recorder.recording(rows)`; otherwise the UNet computes as before.
    """
    unet = unet_of(unet_or_pipeline)
    if unet in _INSTALLED:
        raise RuntimeError("spatial map recorders are already installed on this UNet; remove() their handle first")
    roles = spatial_layer_paths(unet)
    transformers = cross_attention_layers(unet)
    missing = [path for path in roles if path not in transformers]
    if missing:
        raise ValueError(f"this UNet has no cross-attention layers at {missing}")
    for path in roles:
        if isinstance(unet.get_submodule(path).processor, DualContextProcessor):
            raise RuntimeError(f"{path} carries a dual-style cross-attention blend; remove it before spatial guidance")
    recorder = MapRecorder()
    handle = SpatialHandle(unet, registry=_INSTALLED, recorder=recorder)
    grids: dict[int, TokenGrid] = {}
    for path, role in roles.items():
        transformer = transformers[path]
        if id(transformer) not in grids:
            grids[id(transformer)] = TokenGrid()
            handle.hooks.append(transformer.register_forward_pre_hook(grids[id(transformer)].hook, with_kwargs=True))
        module = unet.get_submodule(path)
        handle.processors[path] = SpatialMapProcessor(recorder, grids[id(transformer)], path, role, module.processor)
        handle.previous[path] = module.processor
    for path, processor in handle.processors.items():
        unet.get_submodule(path).set_processor(processor)
    last = max(int(path.split(".")[1]) for path in roles)  # the last up block holding a guided layer
    tail = DetachTail(recorder)
    handle.hooks += [block.register_forward_pre_hook(tail.hook, with_kwargs=True) for block in unet.up_blocks[last + 1:]]
    _INSTALLED.add(unet)
    return handle


@dataclass
class DetachTail:
    """Pre-hook of the up blocks after the last guided one: while a guided call records, they run without autograd."""

    recorder: MapRecorder

    def hook(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if self.recorder.rows is None or not torch.is_grad_enabled():
            return None
        # The loss reads maps of earlier blocks only: no saved activations, no backward here.
        detached = {key: value.detach() if isinstance(value, torch.Tensor) else
                    tuple(item.detach() for item in value) if key == "res_hidden_states_tuple" else value
                    for key, value in kwargs.items()}
        return tuple(arg.detach() if isinstance(arg, torch.Tensor) else arg for arg in args), detached


# ---------------------------------------------------------------- guidance


@contextmanager
def frozen_weights(module: torch.nn.Module) -> Iterator[None]:
    """`requires_grad_(False)` on every parameter, the previous flags restored afterwards."""
    flags = [(parameter, parameter.requires_grad) for parameter in module.parameters()]
    module.requires_grad_(False)
    try:
        yield
    finally:
        for parameter, flag in flags:
            parameter.requires_grad_(flag)


def object_centroids(layers: Sequence[LayerMaps], tokens: Sequence[int]) -> torch.Tensor:
    """`(B, 2)`: the mean over the layers of each layer's object-map centroid (x, y), y down.

    The same as the centroid of the layers' unit-mass 64x64 maps averaged.
    """
    points = []
    for layer in layers:
        cx, cy, _ = centroid_and_variance(object_map(layer.probs, layer.height, layer.width, tokens))
        points.append(torch.stack([cx, cy], dim=-1))
    return torch.stack(points).mean(dim=0)


def _rows(value: Any, index: int, images: int) -> Any:
    """Row `index` of every 2-row tensor of `cfg_unet_inputs` (in dicts too), repeated for `images` images."""
    if isinstance(value, torch.Tensor):
        return value[index:index + 1].repeat(images, *[1] * (value.ndim - 1))
    if isinstance(value, dict):
        return {key: _rows(item, index, images) for key, item in value.items()}
    return value


def _cat(first: Any, second: Any) -> Any:
    if isinstance(first, torch.Tensor):
        return torch.cat([first, second])
    if isinstance(first, dict):
        return {key: _cat(first[key], second[key]) for key in first}
    return first


@dataclass
class SpatialGuidance:
    """The guidance of one batch of images of one prompt: UNet inputs, object tokens, settings.

    `plain(latents, t)` is one batched [uncond, cond] UNet call and CFG; `loss(x, t)` the per-image
    loss of a conditional call that records the maps, with its graph; `guided(latents, t)` the
    guided noise prediction. Needs the handle of `install_spatial_maps` on the pipeline's UNet.
    """

    pipe: Any
    handle: SpatialHandle
    tokens_a: list[int]
    tokens_b: list[int]
    settings: SpatialSettings
    guidance_scale: float
    images: int
    uncond: dict[str, Any]
    cond: dict[str, Any]
    both: dict[str, Any]

    @classmethod
    def build(cls, pipe: DiffusionPipeline, handle: SpatialHandle, prompt: str, object_a: str, object_b: str,
              settings: SpatialSettings, *, images: int = 1, height: int, width: int,
              guidance_scale: float = 7.5) -> SpatialGuidance:
        tokens_a = object_tokens(pipe, prompt, object_a)
        tokens_b = object_tokens(pipe, prompt, object_b, exclude=tokens_a)
        inputs = cfg_unet_inputs(pipe, prompt, height, width)
        uncond, cond = _rows(inputs, 0, images), _rows(inputs, 1, images)
        return cls(pipe, handle, tokens_a, tokens_b, settings, guidance_scale, images, uncond, cond, _cat(uncond, cond))

    @property
    def unet(self) -> UNet2DConditionModel:
        return self.pipe.unet

    def _model_input(self, latents: torch.Tensor, t: Any) -> torch.Tensor:
        scheduler = self.pipe.scheduler
        return scheduler.scale_model_input(latents, t) if hasattr(scheduler, "scale_model_input") else latents

    def cfg(self, uncond: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return uncond + self.guidance_scale * (cond - uncond)

    @torch.no_grad()
    def plain(self, latents: torch.Tensor, t: Any, record: bool = False) -> tuple[torch.Tensor, list[LayerMaps] | None]:
        """The CFG noise prediction of one [uncond, cond] call, as the pipeline's; `record`: the cond rows' maps."""
        model_input = self._model_input(torch.cat([latents] * 2), t)
        if not record:
            return self.cfg(*self.unet(model_input, t, **self.both, return_dict=False)[0].chunk(2)), None
        with self.handle.recorder.recording(slice(self.images, 2 * self.images)) as maps:
            noise = self.unet(model_input, t, **self.both, return_dict=False)[0]
        return self.cfg(*noise.chunk(2)), self.handle.layers(maps)

    def loss(self, x: torch.Tensor, t: Any) -> tuple[torch.Tensor, torch.Tensor, list[LayerMaps]]:
        """Per-image loss `(B,)` of the conditional call on `x` (its graph kept), that call's noise and its maps."""
        with torch.enable_grad(), self.handle.recorder.recording(slice(None)) as maps:
            cond = self.unet(self._model_input(x, t), t, **self.cond, return_dict=False)[0]
        layers = self.handle.layers(maps)
        with torch.enable_grad():
            return guidance_loss(layers, self.tokens_a, self.tokens_b, self.settings), cond, layers

    def gradient(self, loss: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """dL/dx of the summed per-image losses (each image gets its own), in float32."""
        scale = HALF_LOSS_RESCALE if x.dtype == torch.float16 else 1.0
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(loss.sum() * scale, x)
        return grad.float() / scale

    def guided(self, latents: torch.Tensor, t: Any) -> tuple[torch.Tensor, torch.Tensor, list[LayerMaps]]:
        """eps_u + g (eps_c - eps_u) + w dL/dx_t, the per-image loss, and the cond call's maps.

        The uncond rows run without gradients, the cond rows with them on a detached copy of the
        latent; only that latent gets a gradient (the UNet's weights are frozen meanwhile).
        """
        with frozen_weights(self.unet):
            with torch.no_grad():
                uncond = self.unet(self._model_input(latents, t), t, **self.uncond, return_dict=False)[0]
            x = latents.detach().requires_grad_()
            loss, cond, layers = self.loss(x, t)
            grad = self.gradient(loss, x)
        noise = self.cfg(uncond, cond.detach()).float() + self.settings.weight * grad
        detached = [dataclasses.replace(layer, probs=layer.probs.detach()) for layer in layers]
        return noise.to(latents.dtype), loss.detach(), detached


# ---------------------------------------------------------------- sampling


@dataclass
class SpatialResult:
    """The images, and per image the final step's object centroids (x, y in 0..1, y down) from the recorded maps.

    `losses[i]` holds the per-image loss of step i where maps were recorded (guided steps and the
    last one), else None.
    """

    images: Any
    relation: str
    centroids_a: list[tuple[float, float]]
    centroids_b: list[tuple[float, float]]
    losses: list[list[float] | None]
    guided_steps: list[int]
    tokens_a: list[int]
    tokens_b: list[int]

    @property
    def distances(self) -> list[float]:
        """d per image, positive when the relation holds (`core.spatial.relation_distance`)."""
        return [float(relation_distance(self.relation, tuple(map(torch.tensor, a)), tuple(map(torch.tensor, b))))
                for a, b in zip(self.centroids_a, self.centroids_b)]

    @property
    def holds(self) -> list[bool]:
        return [d > 0 for d in self.distances]


def guided_step_indices(steps: int, start: float, end: float, weight: float) -> list[int]:
    """The steps i with start <= i / steps < end (none at weight 0): the original's sg_t_start <= i < sg_t_end."""
    if weight == 0:
        return []
    return [i for i in range(steps) if start <= i / steps < end]


@torch.no_grad()
def decode(pipe: DiffusionPipeline, latents: torch.Tensor, output_type: str = "pil") -> Any:
    """Latents to images as the pipeline's `__call__` ends (float32 VAE where it must, safety checker, postprocess)."""
    if output_type == "latent":
        return latents
    vae = pipe.vae
    dtype = vae.dtype
    upcast = dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
    if upcast:
        vae.to(torch.float32)
    try:
        z = latents.to(vae.device, vae.dtype)
        mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
        if mean is not None and std is not None:
            mean, std = (torch.tensor(values).view(1, -1, 1, 1).to(z) for values in (mean, std))
            z = z * std / vae.config.scaling_factor + mean
        else:
            z = z / vae.config.scaling_factor
        image = vae.decode(z, return_dict=False)[0]
    finally:
        if upcast:
            vae.to(dtype)
    denormalize = None
    if hasattr(pipe, "run_safety_checker"):
        image, nsfw = pipe.run_safety_checker(image, latents.device, latents.dtype)
        denormalize = None if nsfw is None else [not flagged for flagged in nsfw]
    if getattr(pipe, "watermark", None) is not None:
        image = pipe.watermark.apply_watermark(image)
    return pipe.image_processor.postprocess(image, output_type=output_type, do_denormalize=denormalize)


def checked_run(settings: SpatialSettings, relation: str, steps: int, images: int, start: float,
                end: float) -> SpatialSettings:
    """`settings` with the relation normalised; a ValueError for steps, images or a guided range out of bounds."""
    if steps < 1 or images < 1:
        raise ValueError(f"steps and images must be >= 1, got steps={steps}, images={images}")
    if not 0.0 <= start <= end <= 1.0:
        raise ValueError(f"start and end are fractions of the steps with 0 <= start <= end <= 1, got {start}, {end}")
    return dataclasses.replace(settings, relation=normalized_relation(relation))


def generate_spatial(pipe: DiffusionPipeline, prompt: str, object_a: str, relation: str, object_b: str,
                     settings: SpatialSettings = SpatialSettings(), *, steps: int = 50, guidance_scale: float = 7.5,
                     seed: int = 0, images: int = 1, height: int | None = None, width: int | None = None,
                     start: float = 0.0, end: float = 1.0, output_type: str = "pil") -> SpatialResult:
    """`images` images of `prompt` with `object_a` `relation` `object_b` guided by InfSplign's loss.

    `relation` is one of `core.spatial.RELATIONS` or a phrase of it ("to the left of"); it replaces
    `settings.relation`. Steps i with start <= i / steps < end are guided (none at
    `settings.weight == 0`, which is then the pipeline's own sampling from the same noise, exactly).
    Image i starts from the noise of `seed + i`, its generator also drawing the scheduler's step
    noise (as `pipe(generator=[...])`). The UNet is restored afterwards, also on an error.
    SD3/SD3.5 and Flux pipelines: `spatial_flow.generate_spatial_flow`.
    """
    if flow_family(pipe) is not None:  # the seed's joint-attention version has its own defaults (28 steps, 30 %)
        raise TypeError(f"generate_spatial is for UNet pipelines; for {type(pipe).__name__} use "
                        "spatial_flow.generate_spatial_flow (InfSplign's SD3 extension, also on Flux)")
    settings = checked_run(settings, relation, steps, images, start, end)
    height, width = height or default_size(pipe), width or default_size(pipe)
    scale = pipe.vae_scale_factor
    if height % scale or width % scale:
        raise ValueError(f"height and width must be multiples of {scale}, got {height}x{width}")
    unet = pipe.unet
    generators = row_generators(seed, images)
    shape = (images, unet.config.in_channels, height // scale, width // scale)
    # What `pipe(generator=generators)` draws, in the UNet's dtype: the same start, the same step noise after it.
    latents = randn_tensor(shape, generator=generators, device=unet.device, dtype=unet.dtype)
    scheduler = pipe.scheduler
    scheduler.set_timesteps(steps, device=unet.device)
    latents = latents * scheduler.init_noise_sigma
    extra = pipe.prepare_extra_step_kwargs(generators, 0.0)
    timesteps = scheduler.timesteps
    guided = set(guided_step_indices(len(timesteps), start, end, settings.weight))
    losses: list[list[float] | None] = [None] * len(timesteps)
    with install_spatial_maps(pipe) as handle, torch.no_grad():  # gradients only inside `guidance.loss`
        guidance = SpatialGuidance.build(pipe, handle, prompt, object_a, object_b, settings, images=images,
                                         height=height, width=width, guidance_scale=guidance_scale)
        final: list[LayerMaps] = []
        for i, t in enumerate(timesteps):
            last = i == len(timesteps) - 1
            if i in guided:
                noise, loss, layers = guidance.guided(latents, t)
                losses[i] = loss.float().tolist()
            else:
                noise, layers = guidance.plain(latents, t, record=last)
                if layers is not None:
                    losses[i] = guidance_loss(layers, guidance.tokens_a, guidance.tokens_b, settings).float().tolist()
            if last:
                final = layers
            latents = scheduler.step(noise, t, latents.detach(), **extra, return_dict=False)[0]
        centroids_a = object_centroids(final, guidance.tokens_a).float().tolist()
        centroids_b = object_centroids(final, guidance.tokens_b).float().tolist()
    return SpatialResult(decode(pipe, latents, output_type), settings.relation, [tuple(c) for c in centroids_a],
                         [tuple(c) for c in centroids_b], losses, sorted(guided), guidance.tokens_a, guidance.tokens_b)
