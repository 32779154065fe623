"""StyleAligned on a diffusers Flux transformer (dev and schnell), with AlignedGen's choices as defaults.

`install_style_aligned_flux(transformer_or_pipeline)` replaces the processors of the Flux attentions a
layer selection picks (default: every single-stream block, AlignedGen's processor indices 19-56 of 57)
and returns a handle whose `remove()` restores the original processor objects. The processor
re-implements `FluxAttnProcessor` (text first, qk-norm per stream, RoPE over the joint sequence) around
core's joint StyleAligned math, at AlignedGen's points (dit.md §4.1.2, §4.1.4):

* AdaIN of the image q/k after qk-norm and **before** RoPE (`FluxPositions.adain_before_rope=False`:
  after RoPE, what a ComfyUI attention override sees);
* the appended reference keys re-rotated at positions shifted right by the token grid's width, a
  side-by-side canvas (`shift_reference=False`: the reference's own positions; `reference_shift`: another
  shift in tokens);
* the reference rows isolated (`constrain_first`) and the appended keys scaled by lambda = 1.1
  (`ALIGNEDGEN_STYLE`).

A forward pre-hook on the transformer reads, per call, the text length (single blocks get the joint
stream without `encoder_hidden_states`), the timestep (1000·σ, for per-timestep selections) and the
image ids, and builds the shifted rotary table once per call with the transformer's own `pos_embed`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from diffusers import FluxTransformer2DModel
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import FluxAttention, FluxAttnProcessor

from ..attention import sdpa_attention
from ..chunks import chunk_layout
from ..joint_style import ImageSpan, JointStyle, joint_adain, shared_joint_attention
from ..layers import DiTLayout, LayerSelection, select_blocks
from ..style import AdaINSettings, ShareSettings, StyleAlignedArgs
from .joint_style import (JointStyleHandle, JointStyleProcessor, _normed, check_install, install_processors,
                          transformer_of)
from .processor import call_argument

ALIGNEDGEN_SCORE_SCALE = 1.1  # AlignedGen's style_lambda_mode="fix" (dit.md §4.1.4)
ALIGNEDGEN_STYLE = JointStyle(AdaINSettings(), ShareSettings(ALIGNEDGEN_SCORE_SCALE), isolate_reference=True)
ALIGNEDGEN_BLOCKS = "single"  # AlignedGen shares on processor indices 19-56 of 57: the single-stream blocks
FLUX_CHUNKS = 1  # FluxPipeline runs without an uncond row; with true CFG it calls the transformer once per prompt set

# FluxTransformer2DModel.forward(hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids)
TEXT_ARG, TIMESTEP_ARG, IMAGE_IDS_ARG = 1, 3, 4
WIDTH_AXIS = 2  # Flux position ids are (index, row, column)

Rotary = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class FluxPositions:
    """Where AdaIN and the shared keys sit relative to Flux's RoPE (defaults: AlignedGen)."""

    adain_before_rope: bool = True
    shift_reference: bool = True
    reference_shift: int | None = None  # columns; None: the token grid's width (AlignedGen's `concat_img_ids`)


def flux_layout(transformer: FluxTransformer2DModel) -> DiTLayout:
    """The double- and single-block attentions of a Flux transformer, checked against its own processors."""
    layout = DiTLayout("flux", double=len(transformer.transformer_blocks),
                       single=len(transformer.single_transformer_blocks))
    found = {name.removesuffix(".processor") for name in transformer.attn_processors}
    missing = [path for path in map(layout.diffusers_path, layout.layers) if path not in found]
    if missing:
        raise ValueError(f"this transformer's attention layers do not follow the Flux pattern (no {missing[0]})")
    return layout


def shifted_ids(image_ids: torch.Tensor, shift: int | None) -> torch.Tensor:
    """Image ids with the column moved right by `shift` tokens (None: the grid's width, a side-by-side canvas)."""
    columns = image_ids[:, WIDTH_AXIS]
    if shift is None:
        shift = int(columns.max() - columns.min()) + 1
    moved = image_ids.clone()
    moved[:, WIDTH_AXIS] = columns + shift
    return moved


@dataclass
class FluxCall:
    """One transformer call as the processors need it, written by a forward pre-hook on the transformer.

    `timestep` is 1000·σ (the model's own scaling), the key of per-timestep selections; `text_tokens`
    splits the single blocks' joint stream; `reference_rotary` is the (cos, sin) of the image ids at the
    shifted positions, or None where the reference keys keep their own positions.
    """

    positions: FluxPositions = FluxPositions()
    timestep: float = 0.0
    text_tokens: int | None = None
    reference_rotary: Rotary | None = None

    def hook(self, module: FluxTransformer2DModel, args: tuple, kwargs: dict) -> None:
        text = call_argument(args, kwargs, TEXT_ARG, "encoder_hidden_states")
        timestep = call_argument(args, kwargs, TIMESTEP_ARG, "timestep")
        image_ids = call_argument(args, kwargs, IMAGE_IDS_ARG, "img_ids")
        self.text_tokens = None if text is None else text.shape[1]
        sigma = float(timestep.max()) if isinstance(timestep, torch.Tensor) else float(timestep or 0.0)
        self.timestep = 1000.0 * sigma
        self.reference_rotary = None
        if self.positions.shift_reference and image_ids is not None:
            ids = image_ids[0] if image_ids.ndim == 3 else image_ids  # the model accepts deprecated 3-D ids too
            self.reference_rotary = module.pos_embed(shifted_ids(ids, self.positions.reference_shift))


def rotated(x: torch.Tensor, rotary: Rotary | None, heads: int) -> torch.Tensor:
    """diffusers' Flux RoPE on a flat `(B, L, heads*head_dim)` tensor whose tokens match `rotary`'s rows."""
    if rotary is None:
        return x
    return apply_rotary_emb(x.unflatten(-1, (heads, -1)), rotary, sequence_dim=1).flatten(2)


def _projections(attn: FluxAttention, x: torch.Tensor, text: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """q, k, v of the image (or joint) stream and, with `text`, of the text stream; fused or not."""
    if attn.fused_projections:
        q, k, v = attn.to_qkv(x).chunk(3, dim=-1)
        tq, tk, tv = attn.to_added_qkv(text).chunk(3, dim=-1) if text is not None else (None, None, None)
    else:
        q, k, v = attn.to_q(x), attn.to_k(x), attn.to_v(x)
        tq, tk, tv = (attn.add_q_proj(text), attn.add_k_proj(text), attn.add_v_proj(text)) if text is not None \
            else (None, None, None)
    return q, k, v, tq, tk, tv


def joint_qkv(attn: FluxAttention, x: torch.Tensor, text: torch.Tensor | None) -> list[torch.Tensor]:
    """Post-qk-norm q, k, v of the joint sequence (diffusers' Flux order: text, then image), as a list to pop."""
    heads = attn.heads
    q, k, v, tq, tk, tv = _projections(attn, x, text)
    q, k = _normed(attn.norm_q, q, heads), _normed(attn.norm_k, k, heads)
    if text is None:
        return [q, k, v]
    return [torch.cat([_normed(attn.norm_added_q, tq, heads), q], dim=1),
            torch.cat([_normed(attn.norm_added_k, tk, heads), k], dim=1), torch.cat([tv, v], dim=1)]


@dataclass
class FluxStyleProcessor(JointStyleProcessor):
    """diffusers processor for one Flux attention (double or single block) with StyleAligned.

    Batches are `chunks` equal chunks (1 for FluxPipeline); each chunk's reference is its row
    `reference_index`. `clock` is the installing handle's `FluxCall` (text length, timestep, shifted
    rotary); without one, a single block cannot tell its text from its image tokens.
    """

    chunks: int = FLUX_CHUNKS
    clock: FluxCall | None = None
    positions: FluxPositions = FluxPositions()

    def __call__(self, attn: FluxAttention, hidden_states: torch.Tensor,  # type: ignore[override]
                 encoder_hidden_states: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                 image_rotary_emb: Rotary | None = None) -> Any:
        style = self.settings()
        if style.adain is None and style.share is None:
            return FluxAttnProcessor()(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        if attention_mask is not None:
            raise ValueError("StyleAligned on Flux does not take an attention mask (FluxPipeline passes none)")
        heads = attn.heads
        qkv = joint_qkv(attn, hidden_states, encoder_hidden_states)
        image = (self.text_tokens(encoder_hidden_states), qkv[0].shape[1])
        dtype = qkv[0].dtype
        # Popped, not unpacked: this frame keeps no reference, so each stage below frees the one before.
        out = self.styled_attention(qkv.pop(0), qkv.pop(0), qkv.pop(0), heads, image, image_rotary_emb,
                                    style).to(dtype)
        if encoder_hidden_states is None:
            return out
        text, image_out = out[:, :image[0]], out[:, image[0]:]
        return attn.to_out[1](attn.to_out[0](image_out.contiguous())), attn.to_add_out(text.contiguous())

    def text_tokens(self, encoder_hidden_states: torch.Tensor | None) -> int:
        if encoder_hidden_states is not None:
            return encoder_hidden_states.shape[1]
        if self.clock is None or self.clock.text_tokens is None:
            raise RuntimeError("a Flux single block's processor needs the text length: install it with "
                               "install_style_aligned_flux, whose transformer hook reads it")
        return self.clock.text_tokens

    def styled_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, image: ImageSpan,
                         rotary: Rotary | None, style: JointStyle) -> torch.Tensor:
        """AdaIN before or after RoPE, then attention with the reference's image K/V appended."""
        layout = chunk_layout(self.chunks, q.shape[0], self.reference_index)
        if self.observe is not None:  # the analysis: image tokens, q/k after qk-norm and before RoPE
            self.observe(self.layer, layout, q[:, image[0]:image[1]], k[:, image[0]:image[1]], v[:, image[0]:image[1]])
        if self.positions.adain_before_rope:
            q, k, v = joint_adain(q, k, v, image, layout, style.adain)
        # Reference rows are never AdaIN'd, so their pre-RoPE keys are the ones to re-rotate either way; taken
        # before k is rotated, so no pre-RoPE copy of the whole batch outlives the rotation.
        reference_keys = None
        if style.share is not None and rotary is not None:
            reference_keys = self.reference_keys(k[layout.reference_rows], image, heads)
        q = rotated(q, rotary, heads)  # one at a time: each pre-RoPE tensor is freed as its rotation lands
        k = rotated(k, rotary, heads)
        if not self.positions.adain_before_rope:
            q, k, v = joint_adain(q, k, v, image, layout, style.adain)
        if style.share is None:
            return sdpa_attention(q, k, v, heads)
        return shared_joint_attention(q, k, v, heads, image, layout, style.share, style.isolate_reference,
                                      reference_keys)

    def reference_keys(self, k: torch.Tensor, image: ImageSpan, heads: int) -> torch.Tensor | None:
        """The references' image keys (`k` holds their rows only) rotated at the shifted positions; None keeps
        their own (same positions)."""
        if not self.positions.shift_reference:
            return None
        table = self.clock.reference_rotary if self.clock is not None else None
        if table is None or table[0].shape[0] != image[1] - image[0]:
            raise RuntimeError("shifted reference positions need the image ids of this call: install the processor "
                               "with install_style_aligned_flux and call the transformer with img_ids")
        return rotated(k[:, image[0]:image[1]], table, heads)


def default_flux_layers(layout: DiTLayout) -> LayerSelection:
    """The layers that share when no `layers` are given: AlignedGen's single-stream blocks."""
    return select_blocks(layout, ALIGNEDGEN_BLOCKS)


def install_style_aligned_flux(transformer_or_pipeline: Any, args: StyleAlignedArgs | JointStyle = ALIGNEDGEN_STYLE,
                               reference_index: int = 0, layers: LayerSelection | None = None,
                               isolate_reference: bool | None = None, chunks: int = FLUX_CHUNKS,
                               positions: FluxPositions = FluxPositions()) -> JointStyleHandle:
    """Turn StyleAligned on for a Flux transformer (or a pipeline's `.transformer`); returns the handle.

    Defaults are AlignedGen's (dit.md §4.1.4): AdaIN of image q/k before RoPE, the reference's image K/V
    appended at shifted positions with the scores scaled by 1.1, the reference isolated, single-stream
    blocks only. `layers` picks other blocks (`select_blocks(flux_layout(t), "double.3, single")`,
    `select_all`); a per-timestep selection is keyed by 1000·σ. `args` may be the original's
    `StyleAlignedArgs` (its `only_self_level` must stay 0: pass `layers` instead). `chunks` equal chunks
    make up each batch: 1 for FluxPipeline (true CFG calls the transformer once per prompt set), 2 when
    one call carries [uncond, cond]; the reference is row `reference_index` of each.
    """
    transformer = transformer_of(transformer_or_pipeline, FluxTransformer2DModel)
    check_install(transformer, FluxStyleProcessor, args, chunks, reference_index)
    layout = flux_layout(transformer)
    if isinstance(args, StyleAlignedArgs):
        if args.only_self_level:
            raise ValueError("only_self_level does not pick Flux layers; pass layers=select_evenly_spaced(...)")
        style = JointStyle(args.adain, args.share, True if isolate_reference is None else isolate_reference)
    else:
        style = args if isolate_reference is None else replace(args, isolate_reference=isolate_reference)
    chosen = layers if layers is not None else default_flux_layers(layout)
    chosen.check(layout, "install_style_aligned_flux")
    call = FluxCall(positions)
    handle = install_processors(transformer, {
        layout.diffusers_path(layer): FluxStyleProcessor(style, chunks, reference_index, layer, chosen, call,
                                                           positions=positions)
        for layer in layout.layers if layer in chosen.layers})
    handle.hooks.append(transformer.register_forward_pre_hook(call.hook, with_kwargs=True))
    return handle
