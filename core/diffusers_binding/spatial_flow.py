"""InfSplign spatial guidance on diffusers SD3/SD3.5 and Flux pipelines (the seed's sd3_guidance_modular.py, dit.md
§4.4).

`generate_spatial_flow(pipe, prompt, object_a, relation, object_b)` runs the pipeline's own `__call__` (its prompt
encoding, schedule, CFG and decoding) with three hooks. A forward pre-hook on the transformer, at a guided step
(the first 30 % of the steps by default, as the seed), runs the conditional rows once more with autograd, up to
the last measured block only (the seed runs the whole model and reuses its prediction; here the pipeline's own call
predicts, so the rest would be wasted), while `FlowMapProcessor`s on the measured joint blocks record the
head-averaged joint softmax of the image queries over the text keys (`core.spatial.image_text_probabilities`): SD3's
CLIP part of the text (its first 77 tokens, image tokens first in diffusers), Flux's T5 text (text first, q/k after
RoPE). The seed's loss on the block-averaged maps (`joint_guidance_loss`) gives g = dL/dx; the pipeline then predicts
the velocity of the unmoved latent with its own CFG (Flux-dev: no uncond rows; a true-CFG negative call, the step's
second, is left alone), steps, and a step-end callback moves the result by -s g, s = 30 weight / 1000: the seed's
LATENTS mode x <- x - 30 g followed by its Euler step, which is also what the ComfyUI node's `flow_guided_denoised`
makes of a denoised prediction. The math is `core.spatial`'s, shared with the node.

Steps are guided by index, as the seed (`int(N start) <= i < int(N end)`); the node's `start_percent`/`end_percent`
are fractions of the model's σ range (ComfyUI's convention), so the two hosts pick the same steps only where those
agree (28 steps of SD3's shift-3 schedule: the node's end 0.3 guides steps 0-8, σ >= 0.875; the seed's 0-7). The
measured blocks are the seed's early set while (N - i) / N > 0.35, else its late set (`joint_guidance_blocks`); on
Flux the same fractions of its double blocks, as the node.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import DiffusionPipeline

from ..spatial import (CLIP_TOKENS, LATE_FRACTION, SEED_STEP, SEED_WEIGHT, SpatialSettings, centroid_and_variance,
                       image_text_probabilities, joint_guidance_blocks, joint_guidance_loss, joint_object_map)
from .flow_pipeline import default_flow_size, first_call_of_step, flow_family
from .handle import ProcessorHandle
from .joint_style import dit_layout, sd3_joint_qkv
from .joint_style_flux import flux_layout, joint_qkv, rotated
from .pipeline import row_generators
from .spatial import HALF_LOSS_RESCALE, SpatialResult, checked_run, frozen_weights, object_tokens

SEED_END = 0.3  # the seed guides the first int(N * 0.3) steps
BATCHED = ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "guidance")  # per-row inputs
Grid = tuple[int, int]


# ---------------------------------------------------------------- tokens


def flow_object_tokens(pipe: DiffusionPipeline, prompt: str, word: str, exclude: Sequence[int] = (),
                       max_sequence_length: int | None = None) -> list[int]:
    """The text columns of `word` in the maps: SD3 the CLIP-L positions (BOS at 0, the seed's index + 1), Flux the
    T5 positions (no start token) within `max_sequence_length`."""
    if flow_family(pipe) == "flux":
        return object_tokens(pipe, prompt, word, exclude, tokenizer=pipe.tokenizer_2,
                             max_length=max_sequence_length or pipe.tokenizer_2.model_max_length)
    return object_tokens(pipe, prompt, word, exclude)


# ---------------------------------------------------------------- recording


@dataclass
class FlowMaps:
    """What the processors record: the measured blocks, the rows of the call being recorded (None: none), the maps."""

    blocks: tuple[int, ...] = ()
    rows: slice | None = None
    maps: list[torch.Tensor] = field(default_factory=list)

    @contextmanager
    def recording(self, blocks: tuple[int, ...], rows: slice) -> Iterator[list[torch.Tensor]]:
        self.blocks, self.rows, self.maps = blocks, rows, []
        try:
            yield self.maps
        finally:
            self.rows = None


def _heads_first(x: torch.Tensor, heads: int) -> torch.Tensor:
    """`(B, L, H*D)` -> `(B, H, L, D)`."""
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)


@dataclass
class FlowMapProcessor:
    """diffusers processor of one measured joint (Flux: double) block's attention: while its recorder records this
    block, the image x text probabilities of the recorded rows go to the recorder; the output is always the previous
    processor's, so recording never changes the image. Not an `nn.Module`: the state dict is untouched."""

    recorder: FlowMaps
    block: int
    flux: bool
    previous: Any

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, image_rotary_emb: Any = None, **kwargs: Any) -> Any:
        rows = self.recorder.rows
        if rows is not None and self.block in self.recorder.blocks and encoder_hidden_states is not None:
            self.recorder.maps.append(self.probabilities(attn, hidden_states[rows], encoder_hidden_states[rows],
                                                         image_rotary_emb))
        extra = {"image_rotary_emb": image_rotary_emb} if self.flux else {}
        return self.previous(attn, hidden_states, encoder_hidden_states, attention_mask, **extra, **kwargs)

    def probabilities(self, attn: Any, hidden: torch.Tensor, text: torch.Tensor, rotary: Any) -> torch.Tensor:
        """`(B, L_i, T)`: SD3 image first, the CLIP columns only; Flux text first, q/k after RoPE (the seed's order
        differs, the softmax over all keys does not)."""
        heads, image_tokens, text_tokens = attn.heads, hidden.shape[1], text.shape[1]
        if self.flux:
            q, k, _ = joint_qkv(attn, hidden, text)
            q, k = rotated(q, rotary, heads), rotated(k, rotary, heads)
            image, columns = (text_tokens, text_tokens + image_tokens), (0, text_tokens)
        else:
            q, k, _ = sd3_joint_qkv(attn, hidden, text)
            image, columns = (0, image_tokens), (image_tokens, image_tokens + min(CLIP_TOKENS, text_tokens))
        return image_text_probabilities(_heads_first(q, heads), _heads_first(k, heads), image, columns)


class MapsRecorded(Exception):
    """Raised before the first block after the last measured one in a guided pass: the loss needs nothing later."""


@dataclass
class StopAfter:
    """Pre-hook of a block: a guided pass (recording with autograd) ends before it when it follows the last measured
    block, so the pass costs the blocks up to that one, not the whole transformer (the pipeline's own call predicts)."""

    recorder: FlowMaps
    number: int | None  # None: a Flux single block, always after the double blocks

    def hook(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        recorder = self.recorder
        if recorder.rows is None or not torch.is_grad_enabled() or not recorder.blocks:
            return
        if self.number is None or self.number > max(recorder.blocks):
            raise MapsRecorded


@dataclass
class FlowSpatialHandle(ProcessorHandle):
    """The installed map processors and hooks; `remove()` restores them (also on leaving a `with`)."""

    recorder: FlowMaps = field(default_factory=FlowMaps)
    early: tuple[int, ...] = ()
    late: tuple[int, ...] = ()


def install_flow_spatial_maps(transformer: torch.nn.Module, flux: bool,
                              blocks: tuple[Sequence[int], Sequence[int]] | None = None) -> FlowSpatialHandle:
    """A `FlowMapProcessor` on every joint (Flux: double) block the guidance may measure, and the stopping hooks.

    `blocks` (early, late): the measured blocks before and after 65 % of the steps; None: the seed's
    (`joint_guidance_blocks`)."""
    layout = flux_layout(transformer) if flux else dit_layout(transformer)
    if any(isinstance(p, FlowMapProcessor) for p in transformer.attn_processors.values()):
        raise RuntimeError("spatial map processors are already installed on this transformer; remove() their handle")
    depth = layout.double if flux else layout.joint
    early, late = joint_guidance_blocks(depth) if blocks is None else (tuple(blocks[0]), tuple(blocks[-1]))
    if (blocks is not None and len(blocks) != 2) or not early or not late \
            or not all(0 <= number < depth for number in (*early, *late)):
        kind = "double" if flux else "joint"
        raise ValueError(f"blocks must be two non-empty lists of {kind} block numbers in 0..{depth - 1} (early, late), "
                         f"got {blocks}")
    recorder = FlowMaps()
    handle = FlowSpatialHandle(transformer, recorder=recorder, early=early, late=late)
    for number in sorted({*early, *late}):
        path = f"transformer_blocks.{number}.attn"
        module = transformer.get_submodule(path)
        handle.previous[path] = module.processor
        module.set_processor(FlowMapProcessor(recorder, number, flux, module.processor))
    blocks = [(number, block) for number, block in enumerate(transformer.transformer_blocks)]
    blocks += [(None, block) for block in getattr(transformer, "single_transformer_blocks", [])]
    handle.hooks += [block.register_forward_pre_hook(StopAfter(recorder, number).hook, with_kwargs=True)
                     for number, block in blocks]
    return handle


# ---------------------------------------------------------------- guidance


def seed_guided_steps(steps: int, start: float, end: float, weight: float) -> list[int]:
    """The steps int(N start) <= i < int(N end) (the seed's `i < int(N * 0.3)`); none at weight 0."""
    if weight == 0:
        return []
    first, stop = int(steps * start + 1e-9), int(steps * end + 1e-9)  # 1e-9: 0.7 * 10 is 7.000000000000001
    return list(range(first, stop))


def block_centroids(maps: Sequence[torch.Tensor], grid: Grid, tokens: Sequence[int]) -> torch.Tensor:
    """`(B, 2)`: the centroid (x, y, y down) of the word's soft-thresholded map of the block-averaged maps, as the loss
    reads it."""
    probs = torch.stack(list(maps)).mean(dim=0)
    cx, cy, _ = centroid_and_variance(joint_object_map(probs, grid, tokens))
    return torch.stack([cx, cy], dim=-1)


@dataclass
class FlowGuidance:
    """The hooks of one guided sampling: which step runs, the latent move to apply after it, the final maps."""

    pipe: Any
    handle: FlowSpatialHandle
    tokens_a: list[int]
    tokens_b: list[int]
    settings: SpatialSettings
    steps: int
    guided: set[int]
    flux: bool
    step: int = 0
    move: torch.Tensor | None = None
    grid: Grid = (0, 0)
    final: list[torch.Tensor] = field(default_factory=list)
    losses: list[list[float] | None] = field(default_factory=list)
    busy: bool = False  # inside the guided call: the hooks leave it alone
    steps_seen: set[tuple[int, Any]] = field(default_factory=set)  # (schedule, step) pairs whose first call ran

    def blocks(self, step: int) -> tuple[int, ...]:
        """The seed's early blocks while (N - i) / N > 0.35, then its late ones."""
        return self.handle.early if (self.steps - step) / self.steps > LATE_FRACTION else self.handle.late

    def cond_rows(self, batch: int) -> slice:
        """SD3 under CFG runs [uncond, cond]; without CFG, and Flux-dev (no uncond), every row is a cond row."""
        if not self.flux and getattr(self.pipe, "do_classifier_free_guidance", False):
            return slice(batch // 2, batch)
        return slice(0, batch)

    def token_grid(self, named: dict[str, Any]) -> Grid:
        """SD3: the latent over the patch; Flux: the image ids' rows and columns (one token per 2x2 latent pixels)."""
        if not self.flux:
            patch = self.pipe.transformer.config.patch_size
            height, width = named["hidden_states"].shape[-2:]
            return height // patch, width // patch
        ids = named["img_ids"]
        ids = ids[0] if ids.ndim == 3 else ids
        return int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1

    def before(self, transformer: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        # A Flux true-CFG step calls the transformer again with the negative prompt: only the first call is the cond's.
        if self.busy or not first_call_of_step(self.pipe, self.steps_seen):
            return
        rows = self.cond_rows(kwargs["hidden_states"].shape[0])
        self.grid = self.token_grid(kwargs)
        last = self.step == self.steps - 1
        if self.step in self.guided:
            loss, maps = self.guide(transformer, kwargs, rows)
            self.losses[self.step] = loss.float().tolist()
            if last:
                self.final = maps
        elif last:  # the final maps, recorded as a side computation of the pipeline's own call
            self.handle.recorder.blocks, self.handle.recorder.rows = self.blocks(self.step), rows
            self.handle.recorder.maps = []

    def after(self, transformer: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        recorder = self.handle.recorder
        if self.busy or recorder.rows is None:
            return
        recorder.rows = None
        self.final = list(recorder.maps)
        self.losses[self.step] = self.loss(self.final).float().tolist()

    def loss(self, maps: Sequence[torch.Tensor]) -> torch.Tensor:
        return joint_guidance_loss(maps, self.grid, self.tokens_a, self.tokens_b, self.settings)

    def guide(self, transformer: torch.nn.Module, kwargs: dict, rows: slice) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The cond rows once more with autograd: the per-image loss, the maps (detached), and the latent move -s g."""
        cond = {key: value[rows] if key in BATCHED and isinstance(value, torch.Tensor) and value.ndim else value
                for key, value in kwargs.items()}
        x = cond["hidden_states"].detach().requires_grad_()
        scale = HALF_LOSS_RESCALE if x.dtype == torch.float16 else 1.0
        self.busy = True
        try:
            with frozen_weights(transformer), torch.enable_grad(), \
                    self.handle.recorder.recording(self.blocks(self.step), slice(None)) as maps:
                try:
                    transformer(**{**cond, "hidden_states": x})
                except MapsRecorded:
                    pass
                loss = self.loss(maps)
                (gradient,) = torch.autograd.grad(loss.sum() * scale, x)  # each image's own loss: a sum over images
        finally:
            self.busy = False
        step = SEED_STEP * self.settings.weight / SEED_WEIGHT  # the seed's 30 at weight 1000
        self.move = step * gradient.float() / scale
        return loss.detach(), [probs.detach() for probs in maps]

    def step_end(self, pipe: Any, index: int, t: Any, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The seed's x <- x - s g before its Euler step (velocity of the unmoved latent), applied after the step."""
        self.step = index + 1
        move, self.move = self.move, None
        if move is None:
            return {}
        latents = tensors["latents"]
        return {"latents": (latents.float() - move.to(latents.device)).to(latents.dtype)}


# ---------------------------------------------------------------- sampling


def check_flow_size(pipe: DiffusionPipeline, height: int, width: int) -> None:
    """Both families need sides that are multiples of 16 (8x VAE, then 2x2 patches or packing)."""
    step = pipe.vae_scale_factor * 2
    if height % step or width % step or height < step or width < step:
        raise ValueError(f"height and width must be positive multiples of {step}, got {height}x{width}")


def generate_spatial_flow(pipe: DiffusionPipeline, prompt: str, object_a: str, relation: str, object_b: str,
                          settings: SpatialSettings = SpatialSettings(), *, steps: int = 28,
                          guidance_scale: float | None = None, seed: int = 0, images: int = 1,
                          height: int | None = None, width: int | None = None, start: float = 0.0,
                          end: float = SEED_END, max_sequence_length: int | None = None,
                          negative_prompt: str | None = None, true_cfg_scale: float = 1.0,
                          blocks: tuple[Sequence[int], Sequence[int]] | None = None,
                          output_type: str = "pil") -> SpatialResult:
    """`images` images of `prompt` on an SD3/SD3.5 or Flux pipeline with `object_a` `relation` `object_b` guided by
    the seed's InfSplign (see the module's text); the same kind of result as the UNet `generate_spatial`.

    `guidance_scale` None is the family's: SD3 CFG 7 (the seed's), Flux-dev its distilled guidance 3.5.
    `negative_prompt` is SD3's CFG negative (default empty) or, with `true_cfg_scale` > 1, Flux's true-CFG negative
    (a second transformer call per step, left unguided: the gradient is the prompt's, as the seed's cond rows).
    `blocks` (early, late) replaces the measured blocks (`install_flow_spatial_maps`). Steps i with
    int(N start) <= i < int(N end) are guided (the seed's first 30 %); `settings.weight` 0 guides none and is the
    pipeline's own sampling from the same noise, exactly. Image i starts from the noise of `seed + i`. The
    transformer's processors are restored afterwards, also on an error.
    """
    family = flow_family(pipe)
    if family is None:
        raise TypeError(f"generate_spatial_flow needs an SD3/SD3.5 or Flux pipeline, got {type(pipe).__name__}")
    flux = family == "flux"
    if true_cfg_scale != 1.0 and not flux:
        raise ValueError(f"true_cfg_scale is Flux's true CFG; SD3 takes its CFG scale as guidance_scale, got "
                         f"true_cfg_scale={true_cfg_scale}")
    settings = checked_run(settings, relation, steps, images, start, end)
    height, width = height or default_flow_size(pipe), width or default_flow_size(pipe)
    check_flow_size(pipe, height, width)
    guidance_scale = (3.5 if flux else 7.0) if guidance_scale is None else guidance_scale
    tokens_a = flow_object_tokens(pipe, prompt, object_a, max_sequence_length=max_sequence_length)
    tokens_b = flow_object_tokens(pipe, prompt, object_b, exclude=tokens_a, max_sequence_length=max_sequence_length)
    transformer = pipe.transformer
    text = {} if max_sequence_length is None else {"max_sequence_length": max_sequence_length}
    if negative_prompt is not None:
        text["negative_prompt"] = [negative_prompt] * images
    if flux:
        text["true_cfg_scale"] = true_cfg_scale
    with install_flow_spatial_maps(transformer, flux, blocks) as handle:
        guidance = FlowGuidance(pipe, handle, tokens_a, tokens_b, settings, steps,
                                set(seed_guided_steps(steps, start, end, settings.weight)), flux,
                                losses=[None] * steps)
        handle.hooks.append(transformer.register_forward_pre_hook(guidance.before, with_kwargs=True))
        handle.hooks.append(transformer.register_forward_hook(guidance.after, with_kwargs=True))
        out = pipe(prompt=[prompt] * images, num_inference_steps=steps, guidance_scale=guidance_scale, height=height,
                   width=width, generator=row_generators(seed, images), output_type=output_type,
                   callback_on_step_end=guidance.step_end, callback_on_step_end_tensor_inputs=["latents"], **text)
    if not guidance.final:
        raise RuntimeError("no joint-attention maps were recorded at the last step")
    centroids_a = block_centroids(guidance.final, guidance.grid, tokens_a).float().tolist()
    centroids_b = block_centroids(guidance.final, guidance.grid, tokens_b).float().tolist()
    return SpatialResult(out.images, settings.relation, [tuple(c) for c in centroids_a],
                         [tuple(c) for c in centroids_b], guidance.losses, sorted(guidance.guided), tokens_a, tokens_b)

