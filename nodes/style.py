"""SharedAttention and AdaINStyle: StyleAligned as two composable MODEL patches.

UNets: both install one `StylePatch` per selected self-attention layer (ComfyUI's attn1 replace slot,
which sees projected q, k, v). A second node on the same layer extends the patch already there;
a foreign patch on the layer is kept and delegated to.

SD3/SD3.5: one `JointStylePatch` in `transformer_options["optimized_attention_override"]` sees the
projected (post-qk-norm) q, k, v of every joint attention (dit.md §2.1), and a `JointBlockStamp` on
each joint block (`patches_replace["dit"]`) tells it which block runs and how many text and image
tokens it holds (dit.md §2.2). The stamp was chosen over a per-call counter: the block's own
`txt`/`img` give the image span exactly, it stays right when a block is recomputed (gradient
checkpointing) or skipped (Skip Layer Guidance), and SD3's forward runs no DIFFUSION_MODEL wrapper
that could reset a counter. An override or dit patch already there is kept and called.

Flux.1: the same override sees q/k/v `[B, H, L, D]` after qk-norm and RoPE (dit.md §1.3); a
`FluxBlockStamp` on every double and single block the nodes may act on adds the block and its rotary
table `pe`, and a `FluxCallStamp` around the model (DIFFUSION_MODEL wrapper, dit.md §2.3) the text length,
the token grid and the rotation by one grid width. `FluxStylePatch` then does what AlignedGen does (dit.md §4.1.4),
as the diffusers binding (`install_style_aligned_flux`): AdaIN before RoPE and the reference's keys at
positions shifted right by the grid's width (R(p + Δ) = R(Δ) R(p), dit.md §4.1.5); by default on the
single-stream blocks only. Where the patch styles a block, its stamp runs the block with `pe=None`, so the
override gets q/k before RoPE and rotates them itself after AdaIN (`defers_rope`); where something else in
the block needs `pe` (an `attn1_patch`, a mask, an override above ours) it un-rotates with `pe`'s transposed
rotations instead, AdaINs and re-rotates (the same result up to rounding, at the cost of two more passes).
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass, field, replace
from typing import Any

import comfy.ldm.flux.math
import comfy.patcher_extension
import torch
from comfy_api.latest import io

from ..core.errors import InputError
from ..core.attention import sdpa_attention
from ..core.chunks import ChunkLayout
from ..core.joint_style import ImageSpan, joint_features, joint_style_attention, shared_joint_attention
from ..core.layers import STYLE_FEATURES, DiTLayout, LayerId, LayerSelection, select_all, select_blocks
from ..core.style import (AdaINSettings, ShareSettings, adain_targets, allowed_adain, allowed_share,
                          attach_shared_norm, release_control_geometry, style_attention, zero_reference_control)
from .common import (CATEGORY, HIDDEN, LAYERS_TYPE, OVERRIDE, batch_layout, checked_label, current_sigma,
                     existing_replace, model_layout, plain_attention, search_aliases, set_override, sigma_range,
                     sigma_timestep)

SHARED_ATTENTION = "MultiCond_SharedAttention"
ADAIN_STYLE = "MultiCond_AdaINStyle"
BATCH_WRAPPER_KEY = "multicond.style_batch"
BLOCK_TOKENS = "multicond_joint_block"  # set by JointBlockStamp in a copy of transformer_options
FLUX_BLOCK = "multicond_flux_block"  # set by FluxBlockStamp in a copy of transformer_options
FLUX_CALL = "multicond_flux_call"  # set by FluxCallStamp in a copy of transformer_options
FLUX_CALL_KEY = "multicond.flux_call"  # its DIFFUSION_MODEL wrapper key
FLUX_DEFAULT_BLOCKS = "single"  # AlignedGen shares on the single-stream blocks only (dit.md §4.1.4)
WIDTH_AXIS = 2  # Flux position ids are (index, row, column) (dit.md §1.3)

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
    flow: bool = False  # a DiT: per-timestep selections are keyed by 1000·σ (DESIGN.md, model families)

    def active(self, sigma: float) -> bool:
        return self.sigma_low <= sigma <= self.sigma_high

    def features(self, layer: LayerId, sigma: float) -> frozenset[str]:
        """What the selection allows on `layer` at this sigma (everything without a selection)."""
        if self.selection is None:
            return STYLE_FEATURES
        if not self.selection.per_timestep:
            return self.selection.features(layer)
        timestep = 1000.0 * sigma if self.flow else sigma_timestep(self.log_sigmas, sigma)
        return self.selection.features(layer, timestep)

    def adain_at(self, layer: LayerId, sigma: float, joint: bool = False) -> AdaINSettings | None:
        """This AdaIN stage's settings on `layer` now, or None; `joint` applies CB35's DiT rule to the selection."""
        if not self.active(sigma):
            return None
        graded_values = self.selection is not None and self.selection.graded_values
        return allowed_adain(self.settings, self._allowed(layer, sigma, joint), graded_values)

    def share_at(self, layer: LayerId, sigma: float, joint: bool = False) -> ShareSettings | None:
        """This sharing stage's settings on `layer` now, or None."""
        if not self.active(sigma):
            return None
        return allowed_share(self.settings, self._allowed(layer, sigma, joint))

    def _allowed(self, layer: LayerId, sigma: float, joint: bool) -> frozenset[str]:
        features = self.features(layer, sigma)
        return joint_features(features) if joint else features


def with_stage(patch: Any, kind: str, stage: Stage) -> Any:
    """`patch` (a StylePatch or JointStylePatch) with `stage` as its `kind` ("adain"/"share") part."""
    other = patch.share if kind == "adain" else patch.adain
    if other is not None and other.reference_index != stage.reference_index:
        raise InputError(stage.node, "reference_index",
                         f"{other.node} on this model uses reference_index {other.reference_index}",
                         "Give both nodes the same reference_index.")
    return replace(patch, **{kind: stage})


@dataclass(frozen=True)
class StylePatch:
    """attn1 replacement for one layer: AdaIN and/or shared attention, else the previous patch."""

    layer: LayerId
    adain: Stage | None = None
    share: Stage | None = None
    inner: Any = None

    def with_stage(self, kind: str, stage: Stage) -> StylePatch:
        return with_stage(self, kind, stage)

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
        return None if self.adain is None else self.adain.adain_at(self.layer, sigma)

    def _share_at(self, sigma: float) -> ShareSettings | None:
        return None if self.share is None else self.share.share_at(self.layer, sigma)

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


@dataclass(frozen=True)
class BlockTokens:
    """What a JointBlockStamp tells the override: the running joint block and its token counts."""

    index: int
    text: int
    image: int


@dataclass(frozen=True)
class JointBlockStamp:
    """`patches_replace["dit"]` patch of one SD3 joint block: runs it with its BlockTokens in transformer_options.

    The stamp goes into a copy: one transformer_options dict flows through every block (dit.md §2.2).
    """

    index: int
    inner: Any = None  # a dit patch that was on this block before; it runs the block

    def __call__(self, args: dict, extra: dict) -> dict:
        text = 0 if args.get("txt") is None else args["txt"].shape[1]
        options = {**args["transformer_options"], BLOCK_TOKENS: BlockTokens(self.index, text, args["img"].shape[1])}
        stamped = {**args, "transformer_options": options}
        return self.inner(stamped, extra) if self.inner is not None else extra["original_block"](stamped)


@dataclass(frozen=True)
class JointStylePatch:
    """`optimized_attention_override` for SD3/SD3.5: StyleAligned on the joint attention of the selected blocks.

    Sees q/k `[B, L, H·D]` and v `[B, L, H, D]` after qk-norm, text tokens first (dit.md §1.2); returns
    `[B, L, H·D]`. Every other call (the SD3.5-M image-only attn2, blocks or steps outside the stages)
    goes to the override that was there before, else to ComfyUI's own kernel. A patched call runs
    core's math with PyTorch attention, so an earlier override does not see it.
    """

    layout: DiTLayout
    adain: Stage | None = None
    share: Stage | None = None
    inner: Any = None

    def with_stage(self, kind: str, stage: Stage) -> JointStylePatch:
        return with_stage(self, kind, stage)

    def __call__(self, func: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        options = kwargs.get("transformer_options") or {}
        block: BlockTokens | None = options.get(BLOCK_TOKENS)
        q, k, v = args[:3]
        # The joint call holds text + image tokens; attn2 holds the image tokens only (dit.md §2.4). Without text
        # the two cannot be told apart, and the block stays plain.
        if block is None or block.text == 0 or q.ndim != 3 or q.shape[1] != block.text + block.image:
            return self._plain(func, *args, **kwargs)
        layer, sigma = LayerId("joint", block.index), current_sigma(options)
        adain = None if self.adain is None else self.adain.adain_at(layer, sigma, joint=True)
        share = None if self.share is None else self.share.share_at(layer, sigma, joint=True)
        if adain is None and share is None:
            return self._plain(func, *args, **kwargs)
        stage = self.share or self.adain
        rows = batch_layout(options["cond_or_uncond"], q.shape[0], stage.reference_index, stage.node)
        heads = kwargs["heads"] if "heads" in kwargs else args[3]
        image = self.layout.image_span("comfyui", q.shape[1], block.image)
        flat_v = v.reshape(q.shape)  # SD3 hands v as [B, L, H, D] (dit.md §1.2)
        # The reference renders as if alone (AlignedGen's constrain_first); CB35 lets it see its own keys twice.
        return joint_style_attention(q, k, flat_v, heads, image, rows, adain, share, isolate_reference=True).to(q.dtype)

    def _plain(self, func: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.inner(func, *args, **kwargs) if self.inner is not None else func(*args, **kwargs)


@dataclass(frozen=True)
class JointControlWrapper:
    """APPLY_MODEL wrapper for a DiT: the reference rows get no ControlNet residuals.

    SD3's forward runs no DIFFUSION_MODEL wrapper, so StyleBatchWrapper would never see its control.
    Conditional Balance's lambda_t is not applied: CB35 does not support ControlNets (dit.md §4.1.3).
    """

    reference_index: int
    node: str

    def __call__(self, executor: Any, x: torch.Tensor, t: torch.Tensor, c_concat: Any, c_crossattn: Any, control: Any,
                 transformer_options: dict, *args: Any, **kwargs: Any) -> torch.Tensor:
        if control:
            rows = batch_layout(transformer_options["cond_or_uncond"], x.shape[0], self.reference_index, self.node)
            control = zero_reference_control(control, rows)
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, *args, **kwargs)


def install_joint_stage(model: Any, kind: str, stage: Stage, layout: DiTLayout, selection: LayerSelection) -> Any:
    """A clone of an SD3/SD3.5 `model` with `stage` on the selected joint layers: the override and a stamp per block."""
    patched = model.clone()
    options = patched.model_options.setdefault("transformer_options", {})
    staged = replace(stage, selection=selection, flow=True)
    set_override(patched, lambda current: (current if isinstance(current, JointStylePatch)
                                           else JointStylePatch(layout, inner=current)).with_stage(kind, staged))
    slots = options.get("patches_replace", {}).get("dit", {})
    for layer in layout.layers:
        current_block = slots.get(("double_block", layer.number))  # SD3's joint blocks use Flux's double_block key
        if not isinstance(current_block, JointBlockStamp):
            patched.set_model_patch_replace(JointBlockStamp(layer.number, current_block), "dit", "double_block",
                                            layer.number)
    return patched


# ----------------------------------------------------------------------------------------------- Flux.1

@dataclass(frozen=True)
class FluxBlock:
    """What a FluxBlockStamp tells the override: the running block and its rotary table `pe` `[B, 1, L, D/2, 2, 2]`.

    `deferred`: the block was run without `pe`, so its attention gets q/k before RoPE and the override rotates them
    (after AdaIN, AlignedGen's order, with no un-rotation).
    """

    layer: LayerId
    pe: torch.Tensor | None
    deferred: bool = False


@dataclass(frozen=True)
class FluxCall:
    """What a FluxCallStamp tells the override: text tokens, the image token grid, the rotation by one grid width."""

    text: int
    rows: int
    columns: int
    shift: torch.Tensor  # R(Δ) for Δ = (0, 0, columns), `[1, 1, 1, D/2, 2, 2]`

    @property
    def image(self) -> ImageSpan:
        return (self.text, self.text + self.rows * self.columns)


@dataclass(frozen=True)
class FluxBlockStamp:
    """`patches_replace["dit"]` patch of one Flux double or single block: runs it with its FluxBlock in a copy
    of transformer_options (one dict flows through all blocks, dit.md §2.2)."""

    layer: LayerId
    inner: Any = None  # a dit patch that was on this block before; it runs the block

    def __call__(self, args: dict, extra: dict) -> dict:
        options = {**args["transformer_options"], FLUX_BLOCK: FluxBlock(self.layer, args.get("pe"))}
        stamped = {**args, "transformer_options": options}
        if defers_rope(stamped, self.layer):
            extra = {**extra, "original_block": self._without_rope(extra["original_block"])}
        return self.inner(stamped, extra) if self.inner is not None else extra["original_block"](stamped)

    def _without_rope(self, block: Any) -> Any:
        """The block run with `pe=None` (its attention then skips RoPE); the `pe` it would have used goes to the
        override, also when a dit patch that was here before changed it."""
        def run(args: dict) -> dict:
            options = {**args["transformer_options"], FLUX_BLOCK: FluxBlock(self.layer, args["pe"], deferred=True)}
            return block({**args, "pe": None, "transformer_options": options})
        return run


def defers_rope(args: dict, layer: LayerId) -> bool:
    """Whether a block can hand RoPE to our override: our patch is the override, it styles this block now, and
    nothing else in the block (an `attn1_patch`, a mask) needs the rotary table or post-RoPE q/k."""
    options = args["transformer_options"]
    patch = options.get(OVERRIDE)
    if not isinstance(patch, FluxStylePatch) or args.get("pe") is None or args.get("attn_mask") is not None:
        return False
    if FLUX_CALL not in options or "sigmas" not in options or options.get("patches", {}).get("attn1_patch"):
        return False
    return patch.settings_at(layer, current_sigma(options)) != (None, None)


def token_grid(model: Any, x: torch.Tensor) -> tuple[int, int]:
    """Flux's image token rows and columns of a latent: ComfyUI pads it to whole patches (dit.md §2.4)."""
    patch = model.patch_size
    return (x.shape[-2] + patch // 2) // patch, (x.shape[-1] + patch // 2) // patch


def width_rotation(model: Any, columns: int, device: torch.device) -> torch.Tensor:
    """R(Δ) of the pure position Δ = (0, 0, columns), from the model's own rotary embedder (`rope` per axis)."""
    delta = torch.zeros(1, 1, 3, device=device)
    delta[..., WIDTH_AXIS] = columns
    return model.pe_embedder(delta)


@dataclass(frozen=True)
class FluxCallStamp:
    """DIFFUSION_MODEL wrapper of a Flux model: the call's FluxCall in a copy of transformer_options."""

    def __call__(self, executor: Any, x: torch.Tensor, timestep: Any, context: torch.Tensor, y: Any, guidance: Any,
                 ref_latents: Any, control: Any, transformer_options: dict, *args: Any, **kwargs: Any) -> torch.Tensor:
        model = executor.class_obj
        rows, columns = token_grid(model, x)
        call = FluxCall(context.shape[1], rows, columns, width_rotation(model, columns, x.device))
        options = {**transformer_options, FLUX_CALL: call}
        return executor(x, timestep, context, y, guidance, ref_latents, control, options, *args, **kwargs)


def rotate_pairs(x: torch.Tensor, pe: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """ComfyUI's Flux RoPE as `[..., D/2, 2]` pairs in pe's dtype: each channel pair (2i, 2i+1) times pe's 2x2 matrix,
    one multiply and one fused multiply-add (C64 `flux/math.py` apply_rope1); `out` may have any memory layout."""
    pairs = x.to(pe.dtype).unflatten(-1, (-1, 1, 2))
    return torch.mul(pe[..., 0], pairs[..., 0], out=out).addcmul_(pe[..., 1], pairs[..., 1])


def rotate(x: torch.Tensor, pe: torch.Tensor) -> torch.Tensor:
    """`rotate_pairs` in `x`'s layout and dtype."""
    return rotate_pairs(x, pe).flatten(-2).to(x.dtype)


def unrotate(x: torch.Tensor, pe: torch.Tensor) -> torch.Tensor:
    """The inverse of `rotate`: rotations are orthogonal, so each pair times pe's transposed matrix (dit.md §4.1.5)."""
    return rotate(x, pe.transpose(-1, -2))


def flat(x: torch.Tensor) -> torch.Tensor:
    """`[B, H, L, D]` to core's `[B, L, H·D]`: a view when `x` lies in memory as `[B, L, H, D]` (`tokens_first`)."""
    return x.transpose(1, 2).flatten(2)


def tokens_first(like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """An empty tensor shaped as `[B, H, L, D]` `like` but laid out as `[B, L, H, D]`, so `flat` of it is a view."""
    batch, heads, tokens, width = like.shape
    empty = torch.empty(batch, tokens, heads, width, dtype=dtype or like.dtype, device=like.device)
    return empty.transpose(1, 2)


def rotate_spans(x: torch.Tensor, pe: torch.Tensor, image: ImageSpan, image_part: torch.Tensor) -> torch.Tensor:
    """RoPE of `[B, H, L, D]` pre-RoPE `x` whose image tokens are replaced by `image_part`, into a tokens-first
    tensor: one pass over each span, no spliced copy of `x`."""
    start, stop = image
    tokens = x.shape[2]
    pairs = tokens_first(x, dtype=pe.dtype).unflatten(-1, (-1, 2))  # [B, H, L, D/2, 2]
    for span, source in (((0, start), x[:, :, :start]), ((start, stop), image_part), ((stop, tokens), x[:, :, stop:])):
        if span[1] > span[0]:
            rotate_pairs(source, pe[:, :, span[0]:span[1]], out=pairs[:, :, span[0]:span[1]])
    return pairs.flatten(-2).to(x.dtype)


def replace_image(x: torch.Tensor, image: ImageSpan, image_part: torch.Tensor) -> torch.Tensor:
    """`[B, H, L, D]` `x` with its image tokens replaced by `image_part`, tokens-first (see `tokens_first`)."""
    start, stop = image
    out = tokens_first(x)
    out[:, :, :start], out[:, :, start:stop], out[:, :, stop:] = x[:, :, :start], image_part, x[:, :, stop:]
    return out


def styled_image(x: torch.Tensor, image: ImageSpan, rows: ChunkLayout, strength: float) -> torch.Tensor:
    """AdaIN of the image tokens of `[B, H, L, D]` `x`: per (head, channel) token statistics are core's per-channel
    ones of the flat layout; reference rows come back exact."""
    return adain_targets(x[:, :, image[0]:image[1]], rows, strength)


def adain_before_rope(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pe: torch.Tensor, image: ImageSpan,
                      rows: ChunkLayout, adain: AdaINSettings | None) -> tuple[torch.Tensor, ...]:
    """AdaIN of the image tokens' position-free q/k (and v) on `[B, H, L, D]` post-RoPE tensors (AlignedGen):
    un-rotated, AdaIN'd and rotated back; the fallback when the block could not hand RoPE over (`defers_rope`)."""
    if adain is None:
        return q, k, v
    start, stop = image
    image_pe = pe[:, :, start:stop]
    free = lambda x: unrotate(x[:, :, start:stop], image_pe)  # noqa: E731
    restyled = lambda x: rotate(styled_image(free(x), (0, stop - start), rows, adain.strength), image_pe)  # noqa: E731
    q = replace_image(q, image, restyled(q)) if adain.queries else q
    k = replace_image(k, image, restyled(k)) if adain.keys else k
    v = replace_image(v, image, styled_image(v, image, rows, adain.strength)) if adain.values else v
    return q, k, v


def adain_then_rope(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pe: torch.Tensor, image: ImageSpan,
                    rows: ChunkLayout, adain: AdaINSettings | None) -> tuple[torch.Tensor, ...]:
    """AdaIN of the image tokens of pre-RoPE q/k (and v), then RoPE (AlignedGen's order): one pass each."""
    start, stop = image
    styled = lambda x, on: styled_image(x, image, rows, adain.strength) if on else x[:, :, start:stop]  # noqa: E731
    on = adain or AdaINSettings(False, False, False)
    q = rotate_spans(q, pe, image, styled(q, on.queries))
    k = rotate_spans(k, pe, image, styled(k, on.keys))
    v = replace_image(v, image, styled_image(v, image, rows, on.strength)) if on.values else v
    return q, k, v


@dataclass(frozen=True)
class FluxStylePatch:
    """`optimized_attention_override` for Flux.1: StyleAligned with AlignedGen's positions on the selected blocks.

    Sees q/k/v `[B, H, L, D]` after qk-norm and RoPE, text first, then the image, then any Kontext tokens
    (dit.md §1.3); returns `[B, L, H·D]`. Other calls go to the override that was there before, else to
    ComfyUI's own kernel.
    """

    layout: DiTLayout
    adain: Stage | None = None
    share: Stage | None = None
    inner: Any = None

    def with_stage(self, kind: str, stage: Stage) -> FluxStylePatch:
        return with_stage(self, kind, stage)

    def __call__(self, func: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        options = kwargs.get("transformer_options") or {}
        block: FluxBlock | None = options.get(FLUX_BLOCK)
        call: FluxCall | None = options.get(FLUX_CALL)
        q, k, v = args[:3]
        if block is None or call is None or block.pe is None or q.ndim != 4 or q.shape[2] < call.image[1]:
            return self._plain(func, *args, **kwargs)
        adain, share = self.settings_at(block.layer, current_sigma(options))
        if adain is None and share is None:
            return self._plain(func, *args, **kwargs)
        stage = self.share or self.adain
        if kwargs.get("mask") is not None:
            raise InputError(stage.node, "model", "an attention mask reaches Flux's attention (e.g. Apply Style Model "
                             "with attn_bias), which StyleAligned does not combine with",
                             "Remove the masked conditioning, or bypass the StyleAligned nodes.")
        rows = batch_layout(options["cond_or_uncond"], q.shape[0], stage.reference_index, stage.node)
        return flux_style_attention(q, k, v, block, call, rows, adain, share).to(q.dtype)

    def settings_at(self, layer: LayerId, sigma: float) -> tuple[AdaINSettings | None, ShareSettings | None]:
        """The AdaIN and sharing settings on `layer` at this sigma (None where that node does not act)."""
        adain = None if self.adain is None else self.adain.adain_at(layer, sigma, joint=True)
        share = None if self.share is None else self.share.share_at(layer, sigma, joint=True)
        return adain, share

    def _plain(self, func: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        block: FluxBlock | None = (kwargs.get("transformer_options") or {}).get(FLUX_BLOCK)
        if block is not None and block.deferred:  # the block skipped RoPE for us: the host's own, as it would have
            args = (*comfy.ldm.flux.math.apply_rope(args[0], args[1], block.pe), *args[2:])
        return self.inner(func, *args, **kwargs) if self.inner is not None else func(*args, **kwargs)


def flux_style_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block: FluxBlock, call: FluxCall,
                         rows: ChunkLayout, adain: AdaINSettings | None, share: ShareSettings | None) -> torch.Tensor:
    """AdaIN before RoPE, then attention with the reference's image K/V appended at shifted positions.

    q/k come before RoPE when the block deferred it (`block.deferred`), else after it (un-rotated for AdaIN).
    """
    heads, (start, stop) = q.shape[1], call.image
    styled = adain_then_rope if block.deferred else adain_before_rope
    rotated = list(styled(q, k, v, block.pe, call.image, rows, adain))
    if share is None:
        return sdpa_attention(flat(rotated[0]), flat(rotated[1]), flat(rotated[2]), heads)
    # Reference rows are never AdaIN'd: their rotated keys, shifted by R(Δ) (R(p + Δ) = R(Δ) R(p), dit.md §4.1.5).
    rotated_keys = rotated[1] if block.deferred else k  # the host's rotation, not an un-rotate/rotate round trip
    rotated.append(flat(rotate(rotated_keys[rows.reference_rows, :, start:stop], call.shift)))
    del rotated_keys
    # The reference renders as if alone (AlignedGen's constrain_first). Popped, not kept in locals: core then holds
    # the only references and frees the keys once it has built the extended ones.
    return shared_joint_attention(flat(rotated.pop(0)), flat(rotated.pop(0)), flat(rotated.pop(0)), heads, call.image,
                                  rows, share, isolate_reference=True, reference_keys=rotated.pop())


def selected_layers(selection: LayerSelection) -> frozenset[LayerId]:
    """Every layer `selection` may act on at some timestep (its schedule's layers too)."""
    scheduled = (layer for features in (selection.schedule or {}).values() for layer in features)
    return selection.layers | frozenset(scheduled)


def install_flux_stage(model: Any, kind: str, stage: Stage, layout: DiTLayout, selection: LayerSelection) -> Any:
    """A clone of a Flux.1 `model` with `stage` on the selected blocks: override, block stamps, call stamp."""
    patched = model.clone()
    options = patched.model_options.setdefault("transformer_options", {})
    staged = replace(stage, selection=selection, flow=True)
    set_override(patched, lambda current: (current if isinstance(current, FluxStylePatch)
                                           else FluxStylePatch(layout, inner=current)).with_stage(kind, staged))
    slots = options.get("patches_replace", {}).get("dit", {})
    acting = selected_layers(selection)
    # Only the blocks the stage may act on: a dit patch costs memory (the host's loop keeps the last block's output).
    for layer in (layer for layer in layout.layers if layer in acting):
        key = f"{layer.block}_block"
        current_block = slots.get((key, layer.number))
        if not isinstance(current_block, FluxBlockStamp):
            patched.set_model_patch_replace(FluxBlockStamp(layer, current_block), "dit", key, layer.number)
    patched.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, FLUX_CALL_KEY)
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, FLUX_CALL_KEY, FluxCallStamp())
    return patched


def default_selection(layout: Any) -> LayerSelection:
    """Every layer, as the paper; on Flux AlignedGen's single-stream blocks."""
    if isinstance(layout, DiTLayout) and layout.architecture == "flux":
        return select_blocks(layout, FLUX_DEFAULT_BLOCKS)
    return select_all(layout)


def install_stage(model: Any, kind: str, stage: Stage, layers: LayerSelection | None) -> Any:
    """A clone of `model` with `stage` on every selected self-attention (UNet) or joint attention (SD3) layer."""
    layout = model_layout(model, stage.node, dit=True)
    selection = layers if layers is not None else default_selection(layout)
    if isinstance(layout, DiTLayout):
        selection.check(layout, stage.node)
        install = install_flux_stage if layout.architecture == "flux" else install_joint_stage
        return install(model, kind, stage, layout, selection)
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


def check_joint_share(label: str, share_attention: bool, full_attention_share: bool, group_norm: bool,
                      family: str = "SD3") -> None:
    """Shared Attention's inputs on SD3 or Flux: what has no joint-attention form is said, never silently dropped."""
    if group_norm:
        logging.warning("%s: no GroupNorm in %s: share_group_norm has no effect (turn it off to silence this)", label,
                        family)
    if full_attention_share:
        raise InputError(label, "full_attention_share", f"{family}'s joint attention has no full-batch form",
                         "Turn it off: share_attention shares the reference's image keys and values.")
    if not share_attention:
        raise InputError(label, "share_attention", f"it is off, and nothing else of this node acts on {family}: "
                         "the node would change nothing", "Turn it on, or bypass the node.")


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
                                          "Unconnected: every layer, as the paper; on Flux the single-stream "
                                          "blocks only, as AlignedGen."),
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
                        "shares one style. Add AdaIN Style for the paper's full method. On SD3/SD3.5 and Flux.1 it "
                        "acts in joint attention on image tokens only, and the reference renders as if alone; on "
                        "Flux the reference's keys sit one image width to the right (AlignedGen).",
            inputs=[
                io.Model.Input("model", tooltip="An SD1.x, SD2.x, SDXL, SD3/SD3.5 or Flux.1 (dev, schnell) model."),
                io.Boolean.Input("share_attention", default=True,
                                 tooltip="Append the reference's keys and values to every image's self-attention."),
                io.Float.Input("score_scale", default=1.0, min=0.0, max=4.0, step=0.01,
                               tooltip="Multiplies the reference keys seen by the other images (paper: 1; "
                                       "0.5 for very famous reference images; AlignedGen on Flux: 1.1)."),
                io.Float.Input("score_shift", default=0.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="Added to the attention logits of the reference keys: log w weights the "
                                       "reference by w (paper: 0; log 2 = 0.693 for a real reference image)."),
                io.Boolean.Input("full_attention_share", default=False,
                                 tooltip="Instead: all images of the batch attend to each other jointly (no AdaIN)."),
                io.Boolean.Input("share_group_norm", default=True,
                                 tooltip="GroupNorm statistics include the reference's features (paper default; "
                                         "its SDXL demo turns it off). With a Layer Balance selection, its group_norm "
                                         "input decides (from a grading: off, as Conditional Balance). SD3 and Flux "
                                         "have no GroupNorm: there it does nothing (a warning says so)."),
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
        layout = model_layout(model, label, dit=True)
        high, low = sigma_range(model, start_percent, end_percent, SHARED_ATTENTION)
        settings = ShareSettings(score_scale, score_shift, full_attention_share)
        stage = Stage(label, settings, high, low, reference_index)
        group_norm = share_group_norm if layers is None else layers.shares_group_norm(share_group_norm)
        if isinstance(layout, DiTLayout):
            family = "Flux" if layout.architecture == "flux" else "SD3"
            check_joint_share(label, share_attention, full_attention_share, group_norm, family)
            patched = install_stage(model, "share", stage, layers)
            patched.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, BATCH_WRAPPER_KEY)
            if zero_reference_control:
                patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, BATCH_WRAPPER_KEY,
                                             JointControlWrapper(reference_index, label))
            return io.NodeOutput(patched)
        patched = install_stage(model, "share", stage, layers) if share_attention or full_attention_share else model.clone()
        patched.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, BATCH_WRAPPER_KEY)
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
                        "either order. On Flux.1 it acts before RoPE, as AlignedGen.",
            inputs=[
                io.Model.Input("model", tooltip="An SD1.x, SD2.x, SDXL, SD3/SD3.5 or Flux.1 (dev, schnell) model."),
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
        model_layout(model, label, dit=True)  # an unsupported family is named even when the node does nothing
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
