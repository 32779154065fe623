"""SpatialGuidance: objects where the prompt puts them (InfSplign, Rastegar et al.).

On a guided step an APPLY_MODEL wrapper runs the conditional rows once with autograd (outside
ComfyUI's inference mode, through `guided_autograd`), while attn2 replace
patches on the original's decoder layers record the cross-attention probabilities; the loss's
gradient with respect to the latent goes into a `StepGradient` that a PREDICT_NOISE wrapper
creates for that one prediction and then applies to the guided result. The unconditional rows
run as usual, without autograd.

The per-step state lives only inside one PREDICT_NOISE call: it survives `ModelPatcher.clone()`
(0.3.64 deep-copies `model_options` but shares wrappers, so a state object shared between a
wrapper and a post-CFG function would split in two) and no failed step can leak a gradient into
the next run.

SD3/SD3.5 (InfSplign's sd3_guidance_modular.py, dit.md section 4.4): there is no attn2, so a `JointMapRecorder`
in `transformer_options["optimized_attention_override"]` reads the joint attention of the measured blocks
(a `LayerStamp` dit patch per block tells it which block runs): the head-averaged probabilities of the image
queries over the CLIP part of the text keys. The loss is the seed's, on the block-averaged maps, and the update
is the seed's latent step x <- x - 30 dL/dx, made as a change of the denoised prediction (`flow_guided_denoised`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import comfy.ldm.modules.attention as comfy_attention
import comfy.model_management
from comfy.patcher_extension import WrappersMP
import torch
from comfy_api.latest import io

from ..core.errors import InputError
from ..core.inference_grad import guided_autograd
from ..core.layers import DiTLayout, LayerId, image_token_count
from ..core.spatial import (CLIP_TOKENS, LATE_FRACTION, PHI, RELATIONS, LayerMaps, SpatialSettings, attention_with_maps,
                            find_subsequence, flow_guided_denoised, guidance_layers, guidance_loss, guided_denoised,
                            image_text_probabilities, joint_guidance_blocks, joint_guidance_loss, parse_relation)
from .blend import BLOCK_LAYER, DUAL_TEXT_PASS, SECOND_PASS, stamp_blocks
from .common import (CATEGORY, HIDDEN, OVERRIDE, SECOND_CONTEXT, SECOND_TOKENS, checked_label, current_sigma,
                     existing_replace, model_layout, plain_attention, search_aliases, set_override, sigma_range)

SPATIAL_GUIDANCE = "MultiCond_SpatialGuidance"
WRAPPER_KEY = "multicond.spatial_guidance"
RECORD = "multicond_spatial_maps"  # transformer_options: the list the guided layers append their maps to
STEP = "multicond_spatial_step"  # transformer_options: the StepGradient of the prediction being made
FROM_PROMPT = "from prompt"
COND = 0  # ComfyUI's CFGGuider runs [positive, negative]: chunk index 0 is the positive


@dataclass
class StepGradient:
    """The loss gradient of one prediction, summed over the conditional chunks that ran it."""

    total: torch.Tensor | None = None
    chunks: int = 0

    def add(self, gradient: torch.Tensor) -> None:
        self.total = gradient if self.total is None else self.total + gradient
        self.chunks += 1

    def mean(self) -> torch.Tensor | None:
        """The mean over chunks (ComfyUI averages several positive prompts); None when no guided pass ran."""
        return None if self.total is None else self.total / self.chunks


@dataclass(frozen=True)
class JointBlocks:
    """The measured joint (Flux: double) blocks: the seed's early set while (N - i) / N > 0.35, then the late set."""

    early: tuple[int, ...]
    late: tuple[int, ...]
    sigma_switch: float  # the sigma at 65 % of the sampling: above it the early blocks
    text_limit: int | None = CLIP_TOKENS  # SD3: the CLIP part of the text; Flux (T5 only): None, every text token

    def at(self, sigma: float) -> tuple[int, ...]:
        return self.early if sigma > self.sigma_switch else self.late


@dataclass
class JointRecord:
    """What the guided SD3 pass records: the maps `(B, L_i, T)` of the measured blocks of one model call."""

    blocks: tuple[int, ...]
    image_tokens: int
    maps: list[torch.Tensor]
    joint_blocks: Any = None  # the MMDiT's joint_blocks, run without their activation checkpoint (DetachedTail)
    text_limit: int | None = CLIP_TOKENS


@dataclass(frozen=True)
class Guidance:
    settings: SpatialSettings
    tokens_a: tuple[int, ...]
    tokens_b: tuple[int, ...]
    sigma_high: float
    sigma_low: float
    last_block: int  # the last output block holding a guided layer: later blocks are off the gradient's path
    joint: JointBlocks | None = None  # SD3/SD3.5: the measured joint blocks; None on UNets

    def active(self, sigma: float) -> bool:
        # A zero weight moves nothing: no autograd pass is run for it.
        return self.settings.weight != 0 and self.sigma_low <= sigma <= self.sigma_high


@dataclass(frozen=True)
class MapRecorder:
    """attn2 replacement on a guided layer: while the guided pass records, attention from explicit probabilities."""

    layer: LayerId
    role: str
    inner: Any = None

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict) -> torch.Tensor:
        record = extra_options.get(RECORD)
        if record is None or extra_options.get(SECOND_CONTEXT):  # the object words are in the sampler's prompt only
            return plain_attention(q, k, v, extra_options) if self.inner is None else self.inner(q, k, v, extra_options)
        _, _, height, width = extra_options["activations_shape"]
        prompt = k.shape[1] - extra_options.get(SECOND_TOKENS, 0)  # CrossAttnBlend's second prompt is appended
        out, probs = attention_with_maps(q, k[:, :prompt], v[:, :prompt], extra_options["n_heads"])
        record.append(LayerMaps(probs, height, width, self.role))
        if self.inner is None:
            return out
        # Another pack's patch (IPAdapter) keeps its output value; it may hold inference tensors autograd cannot
        # save, so it runs without autograd and the gradient flows through the text attention alone.
        with torch.no_grad():
            foreign = self.inner(q, k, v, extra_options)
        return out + (foreign - out).detach()


@dataclass(frozen=True)
class JointMapRecorder:
    """`optimized_attention_override` for SD3/SD3.5 and Flux.1: while the guided pass records, a measured block's
    joint attention leaves its image-x-text probabilities (SD3: the CLIP text); every call goes on to the override
    that was there before (`inner`), else to ComfyUI's kernel (PyTorch's while recording: differentiable). Text
    comes first in both (dit.md §1.4); SD3 q/k are `[B, L, H*D]`, Flux's `[B, H, L, D]` after RoPE."""

    inner: Any = None

    def __call__(self, func: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        options = kwargs.get("transformer_options") or {}
        record = options.get(RECORD)
        if not isinstance(record, JointRecord) or options.get(DUAL_TEXT_PASS) == SECOND_PASS:
            return self._attend(func, *args, **kwargs)
        layer = options.get(BLOCK_LAYER)
        q, k = args[0], args[1]
        tokens = q.shape[-2] if q.ndim == 4 else q.shape[1]
        # SD3.5-M's image-only attn2 has no text: L == L_i (dit.md §2.4); Flux's single blocks are not measured.
        if (layer is not None and layer.block != "single" and layer.number in record.blocks
                and tokens > record.image_tokens):
            heads = kwargs["heads"] if "heads" in kwargs else args[3]
            split = (lambda t: t) if q.ndim == 4 else (  # noqa: E731
                lambda t: t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2))
            text = tokens - record.image_tokens
            columns = (0, text if record.text_limit is None else min(record.text_limit, text))
            record.maps.append(image_text_probabilities(split(q), split(k), (text, tokens), columns))
        # The guided pass needs a differentiable kernel whatever backend ComfyUI runs with.
        return self._attend(comfy_attention.attention_pytorch, *args, **kwargs)

    def _attend(self, func: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.inner(func, *args, **kwargs) if self.inner is not None else func(*args, **kwargs)


@dataclass(frozen=True)
class DetachedTail:
    """dit patch of a joint block for the guided pass: blocks after the last measured one run without autograd, the
    others without activation checkpointing.

    ComfyUI's patched-block path runs SD3 blocks under `torch.utils.checkpoint` (dit.md §2.2), whose backward
    recomputes them outside the pack's inference-weight routing and fails on inference weights; the block the
    patch chain finally runs is the same block with `use_checkpoint=False`.
    """

    layer: LayerId
    inner: Any = None

    def __call__(self, args: dict, extra: dict) -> dict:
        record = args["transformer_options"].get(RECORD)
        if not isinstance(record, JointRecord):
            return self._run(args, extra)
        if record.joint_blocks is not None:
            extra = {**extra, "original_block": self._unchecked(record.joint_blocks[self.layer.number])}
        if self.layer.block == "single" or self.layer.number > max(record.blocks):  # Flux's single blocks come last
            with torch.no_grad():
                return self._run(args, extra)
        return self._run(args, extra)

    def _run(self, args: dict, extra: dict) -> dict:
        return self.inner(args, extra) if self.inner is not None else extra["original_block"](args)

    @staticmethod
    def _unchecked(block: Any) -> Any:
        def run(args: dict) -> dict:  # ComfyUI's block_wrap, with the checkpoint off
            txt, img = block(args["txt"], args["img"], c=args["vec"], use_checkpoint=False,
                             transformer_options=args["transformer_options"])
            return {"txt": txt, "img": img}
        return run


def _rows(value: Any, rows: torch.Tensor, batch: int) -> Any:
    """`value` with every tensor batched like the model input narrowed to `rows` (in lists and dicts too), cloned."""
    if isinstance(value, torch.Tensor):
        return value[rows].clone() if value.ndim and value.shape[0] == batch else value.clone()
    if isinstance(value, (list, tuple)):
        return type(value)(_rows(item, rows, batch) for item in value)
    if isinstance(value, dict):
        return {key: _rows(item, rows, batch) for key, item in value.items()}
    return value


@dataclass(frozen=True)
class DetachTail:
    """output_block_patch of the guided pass: blocks after the last guided one run without autograd (no saved activations)."""

    last_block: int

    def __call__(self, h: torch.Tensor, skip: torch.Tensor, transformer_options: dict) -> tuple[torch.Tensor, torch.Tensor]:
        if transformer_options["block"][1] > self.last_block:
            return h.detach(), skip.detach()
        return h, skip


def _pytorch_attention(function: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
    # The guided pass needs a differentiable kernel whatever backend ComfyUI runs with.
    return comfy_attention.attention_pytorch(*args, **kwargs)


@dataclass(frozen=True)
class GuidanceWrapper:
    """APPLY_MODEL wrapper: on a guided step, the conditional rows run with autograd and leave the gradient."""

    guidance: Guidance

    def __call__(self, executor: Any, x: torch.Tensor, t: torch.Tensor, c_concat: Any, c_crossattn: Any, control: Any,
                 transformer_options: dict, **kwargs: Any) -> torch.Tensor:
        chunks = transformer_options["cond_or_uncond"]
        sigma = current_sigma(transformer_options)
        step = transformer_options.get(STEP)  # None: a model call outside a sampler's prediction, nothing to update
        if step is None or COND not in chunks or not self.guidance.active(sigma):
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        images = x.shape[0] // len(chunks)
        kinds = torch.tensor(chunks).repeat_interleave(images)
        guided, plain = (kinds == COND).nonzero()[:, 0], (kinds != COND).nonzero()[:, 0]
        out = torch.empty_like(x)
        if len(plain):
            narrowed = _rows((c_concat, c_crossattn, control, kwargs), plain, x.shape[0])
            options = {**transformer_options, "cond_or_uncond": [kind for kind in chunks if kind != COND]}
            out[plain] = executor(x[plain], t[plain], *narrowed[:3], options, **narrowed[3])
        denoised, gradient = self._guided(executor, x, t, (c_concat, c_crossattn, control, kwargs), transformer_options,
                                          guided, chunks.count(COND))
        out[guided] = denoised
        step.add(gradient.reshape(-1, images, *x.shape[1:]).sum(0))
        return out

    def _guided(self, executor: Any, x: torch.Tensor, t: torch.Tensor, inputs: tuple, transformer_options: dict,
                rows: torch.Tensor, chunks: int) -> tuple[torch.Tensor, torch.Tensor]:
        guidance = self.guidance
        if guidance.joint is not None:
            return self._guided_joint(executor, x, t, inputs, transformer_options, rows, chunks)
        with torch.inference_mode(False), torch.enable_grad():
            latent = x[rows].detach().clone().requires_grad_(True)
            c_concat, c_crossattn, control, kwargs = _rows(inputs, rows, x.shape[0])
            maps: list[LayerMaps] = []
            patches = dict(transformer_options.get("patches", {}))
            patches["output_block_patch"] = [*patches.get("output_block_patch", []), DetachTail(guidance.last_block)]
            options = {**transformer_options, "cond_or_uncond": [COND] * chunks, RECORD: maps, "patches": patches,
                       "optimized_attention_override": _pytorch_attention}
            with guided_autograd(), differentiable_rope():
                denoised = executor(latent, t[rows].clone(), c_concat, c_crossattn, control, options, **kwargs)
            loss = guidance_loss(maps, guidance.tokens_a, guidance.tokens_b, guidance.settings)
            (gradient,) = torch.autograd.grad(loss.sum(), latent)  # each image's own loss: a sum over images
        return denoised.detach(), gradient.detach()

    def _guided_joint(self, executor: Any, x: torch.Tensor, t: torch.Tensor, inputs: tuple, transformer_options: dict,
                      rows: torch.Tensor, chunks: int) -> tuple[torch.Tensor, torch.Tensor]:
        guidance = self.guidance
        height, width = x.shape[-2:]
        grid = ((height + 1) // 2, (width + 1) // 2)  # 2x2 latent pixels per token, odd sides padded
        check_text_tokens(inputs[1], guidance)
        with torch.inference_mode(False), torch.enable_grad():
            latent = x[rows].detach().clone().requires_grad_(True)
            c_concat, c_crossattn, control, kwargs = _rows(inputs, rows, x.shape[0])
            diffusion_model = getattr(getattr(executor, "class_obj", None), "diffusion_model", None)
            record = JointRecord(guidance.joint.at(current_sigma(transformer_options)),
                                 image_token_count(height, width), [], getattr(diffusion_model, "joint_blocks", None),
                                 guidance.joint.text_limit)
            options = {**transformer_options, "cond_or_uncond": [COND] * chunks, RECORD: record}
            with guided_autograd(), differentiable_rope():
                denoised = executor(latent, t[rows].clone(), c_concat, c_crossattn, control, options, **kwargs)
                maps = list(record.maps)
                if not maps:
                    raise InputError(SPATIAL_GUIDANCE, "model", "no joint-attention maps were recorded: a node after "
                                     "this one replaced its attention override or its block patches",
                                     "Apply Spatial Guidance after that node (it keeps an override it finds).")
                loss = joint_guidance_loss(maps, grid, guidance.tokens_a, guidance.tokens_b, guidance.settings)
                (gradient,) = torch.autograd.grad(loss.sum(), latent)  # each image's own loss: a sum over images
        return denoised.detach(), gradient.detach()


@contextmanager
def differentiable_rope() -> Iterator[None]:
    """For the guided pass only: the host's training switch, which its own training nodes set, selects PyTorch's
    RoPE on Flux; 0.33.0's fused kernel has no backward (0.3.64 has no switch and needs none)."""
    previous = getattr(comfy.model_management, "in_training", None)
    if previous is None:
        yield
        return
    comfy.model_management.in_training = True
    try:
        yield
    finally:
        comfy.model_management.in_training = previous


def check_text_tokens(context: Any, guidance: Guidance) -> None:
    """The words' tokens must lie in the text the maps read: SD3's CLIP part (its first 77 tokens), Flux's T5 text."""
    limit = guidance.joint.text_limit
    available = context.shape[1] if isinstance(context, torch.Tensor) else limit or 0
    available = available if limit is None else min(limit, available)
    if max(*guidance.tokens_a, *guidance.tokens_b) >= available:
        raise InputError(SPATIAL_GUIDANCE, "text", f"the object words' tokens reach past the {available} text tokens "
                         "of the sampler's positive that the maps read", "Use this node's positive output (or the "
                         "same prompt; on SD3 short enough for one 77-token CLIP window) as the sampler's positive.")


@dataclass(frozen=True)
class GuidanceStep:
    """PREDICT_NOISE wrapper: a fresh StepGradient for this prediction, then the original's eps <- eps + w dL/dx_t.

    The update follows every CFG and post-CFG function, as the original adds it to the final eps.
    """

    guidance: Guidance

    def __call__(self, executor: Any, x: torch.Tensor, timestep: torch.Tensor, model_options: dict, seed: Any = None) -> torch.Tensor:
        step = StepGradient()
        options = {**model_options, "transformer_options": {**model_options.get("transformer_options", {}), STEP: step}}
        denoised = executor(x, timestep, options, seed)
        gradient = step.mean()
        if gradient is None:  # an unguided step
            return denoised
        if self.guidance.joint is not None:
            sigma_next = next_sigma(options["transformer_options"], float(timestep.max()))
            return flow_guided_denoised(denoised, timestep, sigma_next, gradient, self.guidance.settings.weight)
        return guided_denoised(denoised, timestep, gradient, self.guidance.settings.weight)


def next_sigma(transformer_options: dict, sigma: float) -> float:
    """The sampler's next sigma below `sigma` (0 after the last): where the Euler step from `sigma` lands."""
    sigmas = transformer_options.get("sample_sigmas")
    below = [float(s) for s in sigmas if float(s) < sigma * (1 - 1e-6)] if sigmas is not None else []
    return max(below, default=0.0)


def install_joint(patched: Any, layout: DiTLayout, settings: SpatialSettings, tokens_a: tuple[int, ...],
                  tokens_b: tuple[int, ...], high: float, low: float) -> Guidance:
    """SD3/SD3.5, Flux.1: the map recorder in the attention override (wrapping any override there), a stamp per block.

    Flux has no published block choice: the seed's fractions of depth are taken over its double blocks, the
    ones with separate text and image streams as SD3's joint blocks.
    """
    flux = layout.architecture == "flux"
    early, late = joint_guidance_blocks(layout.double if flux else layout.joint)
    switch = float(patched.get_model_object("model_sampling").percent_to_sigma(1.0 - LATE_FRACTION))
    # Inside a Cross-Attention Blend: the maps are the positive's pass, its image queries over its own text.
    set_override(patched, lambda current: JointMapRecorder(current.inner if isinstance(current, JointMapRecorder)
                                                           else current))
    stamp_blocks(patched, layout)
    slots = patched.model_options["transformer_options"]["patches_replace"]["dit"]  # stamping copied the options
    for layer in layout.layers:
        kind = "single_block" if layer.block == "single" else "double_block"
        current = slots[(kind, layer.number)]
        if not isinstance(current, DetachedTail):
            patched.set_model_patch_replace(DetachedTail(layer, current), "dit", kind, layer.number)
    blocks = JointBlocks(early, late, switch, None if flux else CLIP_TOKENS)
    return Guidance(settings, tokens_a, tokens_b, high, low, max(late + early), blocks)


def prompt_tokens(clip: Any, text: str, encoder: str = "l") -> list[int]:
    """Token ids of `text` as the CLIP-L (SD2: OpenCLIP-H; Flux: `encoder` "t5xxl") encoder sees them, batches of 77
    concatenated."""
    tokens = clip.tokenize(text)
    key = encoder if encoder in tokens else next(iter(tokens))
    return [item[0] if isinstance(item[0], int) else -1 for batch in tokens[key] for item in batch]


def word_tokens(clip: Any, word: str, encoder: str = "l") -> list[int]:
    """A word's token ids without start and end tokens (`word_ids < 49406` in the original; T5 has no start token)."""
    tokenizer = clip.tokenizer
    if encoder == "l":
        inner = getattr(tokenizer, "clip_l", None) or getattr(tokenizer, getattr(tokenizer, "clip", ""), None)
    else:
        inner = getattr(tokenizer, encoder, None)
    if inner is None:
        raise InputError(SPATIAL_GUIDANCE, "clip", f"{type(tokenizer).__name__} is not a CLIP tokenizer this node reads",
                         "Use the CLIP of an SD1.x, SD2.x, SDXL, SD3/SD3.5 or Flux.1 checkpoint.")
    return inner.tokenizer(word)["input_ids"][inner.tokens_start:-1]


def object_positions(clip: Any, text: str, word: str, input_name: str, exclude: list[int] = (),
                     encoder: str = "l") -> list[int]:
    ids = word_tokens(clip, word.strip().lower(), encoder)
    positions = find_subsequence(prompt_tokens(clip, text, encoder), ids, exclude) if ids else []
    if not positions:
        raise InputError(SPATIAL_GUIDANCE, input_name, f"{word!r} is not in the prompt {text!r}",
                         "Use a word that appears in the prompt, as written there.")
    return positions


def resolve_words(text: str, object_a: str, relation: str, object_b: str) -> tuple[str, str, str]:
    """The words and relation: as given, or parsed from a prompt like "a cat to the left of a dog"."""
    parsed = parse_relation(text)
    missing = [name for name, value in (("object_a", object_a), ("object_b", object_b)) if not value.strip()]
    if relation == FROM_PROMPT or missing:
        if parsed is None:
            name = "relation" if relation == FROM_PROMPT else missing[0]
            raise InputError(SPATIAL_GUIDANCE, name, f"no relation like 'to the left of' found in {text!r}",
                             "Write the prompt as 'A to the left of B' (or above, below, right of, next to), or fill "
                             "object_a, relation and object_b.")
        object_a = object_a.strip() or parsed.object_a
        object_b = object_b.strip() or parsed.object_b
        relation = parsed.relation if relation == FROM_PROMPT else relation
    return object_a.strip(), relation, object_b.strip()


class SpatialGuidance(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            hidden=HIDDEN,
            node_id=SPATIAL_GUIDANCE,
            **search_aliases("layout", "object placement", "spatial relation", "position", "left of",
                             "regional layout"),
            display_name="Spatial Guidance (InfSplign)",
            category=f"{CATEGORY}/spatial",
            description="Layout from the prompt, InfSplign (Rastegar et al.): each guided step pushes the noise along "
                        "the gradient of a loss on the cross-attention maps of two words, so 'A to the left of B' "
                        "comes out as written. SD3/SD3.5: the joint attention's maps of the CLIP tokens and the "
                        "seed's latent step. Encodes the prompt itself: use its positive output. About twice the "
                        "time of a plain step.",
            inputs=[
                io.Model.Input("model", tooltip="An SD1.x, SD2.x, SDXL, SD3/SD3.5 or Flux.1 model."),
                io.Clip.Input("clip", tooltip="The model's CLIP: encodes the prompt and finds the words' tokens."),
                io.String.Input("text", multiline=True, default="a cat to the left of a dog",
                                tooltip="The prompt, e.g. 'a cat to the left of a dog'."),
                io.String.Input("object_a", default="", tooltip="The first object's word as in the prompt; empty: "
                                                                "parsed from the prompt (the word before the relation)."),
                io.Combo.Input("relation", options=[FROM_PROMPT, *RELATIONS], default=FROM_PROMPT,
                               tooltip="Where object A goes relative to object B; 'from prompt' reads it from the text "
                                       "(to the left of, on top of, under, near, ...)."),
                io.String.Input("object_b", default="", tooltip="The second object's word; empty: parsed from the prompt."),
                io.Float.Input("weight", default=1000.0, min=0.0, max=100000.0, step=10.0,
                               tooltip="Guidance strength on the paper's epsilon scale (paper: 1000). SD3/SD3.5: the "
                                       "latent moves by 0.03 x weight x the gradient per guided step (the seed's 30 "
                                       "at 1000)."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Fraction of the sampling where guidance starts (paper: every step)."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Fraction of the sampling where guidance ends (SD3 seed: 0.3)."),
                io.Combo.Input("phi", options=list(PHI), default="gelu",
                               tooltip="The spatial hinge phi(alpha (margin - d)) (paper: gelu)."),
                io.Float.Input("alpha", default=0.75, min=0.0, max=20.0, step=0.05,
                               tooltip="The hinge's slope (paper: 0.75; SD3 seed: 1.5)."),
                io.Float.Input("margin", default=0.25, min=-1.0, max=1.0, step=0.01,
                               tooltip="How far apart the centroids should be, as a fraction of the image (paper: 0.25)."),
                io.Float.Input("lambda_spatial", default=1.0, min=0.0, max=100.0, step=0.1,
                               tooltip="Weight of the relation term (paper: 1; SD3 seed: 0.5)."),
                io.Float.Input("lambda_presence", default=1.0, min=0.0, max=100.0, step=0.1,
                               tooltip="Weight of var_A + var_B on the coarser layers: compact, present objects (paper: 1)."),
                io.Float.Input("lambda_balance", default=1.0, min=0.0, max=100.0, step=0.1,
                               tooltip="Weight of |var_A - var_B| on the finer layers: balanced objects (paper: 1)."),
            ],
            outputs=[
                io.Model.Output(display_name="model", tooltip="The model with the guidance installed."),
                io.Conditioning.Output(display_name="positive", tooltip="The prompt encoded: the sampler's positive."),
            ],
        )

    @classmethod
    def execute(cls, model: Any, clip: Any, text: str, object_a: str, relation: str, object_b: str, weight: float,
                start_percent: float, end_percent: float, phi: str, alpha: float, margin: float, lambda_spatial: float,
                lambda_presence: float, lambda_balance: float) -> io.NodeOutput:
        label = checked_label(cls, locals())
        if weight == 0:
            logging.warning("%s: weight 0, no guidance", label)
        layout = model_layout(model, label, dit=True)
        flux = isinstance(layout, DiTLayout) and layout.architecture == "flux"
        # SD3 as UNets: CLIP-L's tokens, index + 1 for its start token; Flux: its T5 text, no start token.
        encoder = "t5xxl" if flux else "l"
        high, low = sigma_range(model, start_percent, end_percent, SPATIAL_GUIDANCE)
        object_a, relation, object_b = resolve_words(text, object_a, relation, object_b)
        tokens_a = object_positions(clip, text, object_a, "object_a", encoder=encoder)
        tokens_b = object_positions(clip, text, object_b, "object_b", exclude=tokens_a, encoder=encoder)
        settings = SpatialSettings(relation, phi, alpha, margin, lambda_spatial, lambda_presence, lambda_balance, weight)
        patched = model.clone()
        if isinstance(layout, DiTLayout):
            guidance = install_joint(patched, layout, settings, tuple(tokens_a), tuple(tokens_b), high, low)
        else:
            roles = guidance_layers(layout)
            guidance = Guidance(settings, tuple(tokens_a), tuple(tokens_b), high, low, max(layer.number for layer in roles))
            for layer, role in roles.items():
                patched.set_model_attn2_replace(MapRecorder(layer, role, existing_replace(patched, "attn2", layer)),
                                                *layer.comfy_key)
        for kind, wrapper in ((WrappersMP.APPLY_MODEL, GuidanceWrapper(guidance)), (WrappersMP.PREDICT_NOISE, GuidanceStep(guidance))):
            patched.remove_wrappers_with_key(kind, WRAPPER_KEY)
            patched.add_wrapper_with_key(kind, WRAPPER_KEY, wrapper)
        positive = clip.encode_from_tokens_scheduled(clip.tokenize(text))
        return io.NodeOutput(patched, positive)
