"""StyleAligned on a diffusers SD3/SD3.5 transformer: a processor on the joint attentions.

`install_style_aligned_dit(transformer_or_pipeline, args)` replaces the processors of the joint
attentions (`transformer_blocks.{i}.attn`) a layer selection picks, leaves every other processor as
it was (the SD3.5-M image-only `attn2` stays plain), and returns a handle whose `remove()` restores
the original processor objects. The processor re-implements `JointAttnProcessor2_0` (image tokens
first, qk-norm per stream, `context_pre_only` on the last block) around core's joint StyleAligned math.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
from diffusers import SD3Transformer2DModel
from diffusers.models.attention_processor import Attention

from ..chunks import chunk_layout
from ..joint_style import JointStyle, joint_features, joint_style_attention
from ..layers import DiTLayout, LayerId, LayerSelection, select_all, select_evenly_spaced
from ..style import StyleAlignedArgs, allowed_adain, allowed_share
from .handle import ProcessorHandle
from .processor import call_argument
from .style_aligned import Observer

CFG_CHUNKS = 2  # diffusers runs classifier-free guidance as one batch [uncond, cond]
TIMESTEP_ARG = 3  # SD3Transformer2DModel.forward(hidden_states, encoder_hidden_states, pooled_projections, timestep)


def transformer_of(transformer_or_pipeline: Any, kind: type = SD3Transformer2DModel) -> Any:
    """The `kind` transformer itself, or the one of a pipeline; a TypeError names what was given."""
    transformer = getattr(transformer_or_pipeline, "transformer", transformer_or_pipeline)
    if not isinstance(transformer, kind):
        raise TypeError(f"StyleAligned here needs a {kind.__name__} or a pipeline with one, "
                        f"got {type(transformer).__name__}")
    return transformer


def install_processors(transformer: Any, processors: dict[str, Any]) -> JointStyleHandle:
    """Put each processor on its attention (by path); the handle keeps the ones it replaced."""
    handle = JointStyleHandle(transformer, {path: transformer.get_submodule(path).processor for path in processors},
                              layers=list(processors))
    for path, processor in processors.items():
        transformer.get_submodule(path).set_processor(processor)
    return handle


def check_install(transformer: Any, processor: type, args: Any, chunks: int, reference_index: int) -> None:
    """What every DiT install refuses: a second install, a bad batch layout, the original's full-share mode."""
    if any(isinstance(p, processor) for p in transformer.attn_processors.values()):
        raise RuntimeError("StyleAligned is already installed on this transformer; remove() the first handle first")
    if chunks < 1 or reference_index < 0:
        raise ValueError(f"chunks must be >= 1 and reference_index >= 0, got {chunks} and {reference_index}")
    if isinstance(args, StyleAlignedArgs) and args.full_attention_share:
        raise ValueError("full_attention_share has no joint-attention form; use share_attention")


def dit_layout(transformer: SD3Transformer2DModel) -> DiTLayout:
    """The joint attention layers of an SD3/SD3.5 transformer, checked against its own processors."""
    family = "sd35" if transformer.config.qk_norm else "sd3"
    layout = DiTLayout(family, joint=len(transformer.transformer_blocks))
    found = {name.removesuffix(".processor") for name in transformer.attn_processors}
    missing = [path for path in map(layout.diffusers_path, layout.layers) if path not in found]
    if missing:
        raise ValueError(f"this transformer's attention layers do not follow the SD3 pattern (no {missing[0]})")
    return layout


@dataclass
class FlowClock:
    """The transformer call's timestep as 1000·σ, written by a forward pre-hook; `scale` 1000 for a transformer
    that takes σ itself (Flux), 1 for one that takes 1000·σ (SD3)."""

    timestep: float = 0.0
    scale: float = 1.0

    def hook(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        timestep = call_argument(args, kwargs, TIMESTEP_ARG, "timestep")
        value = float(timestep.max()) if isinstance(timestep, torch.Tensor) else float(timestep)
        self.timestep = self.scale * value


def _normed(norm: torch.nn.Module | None, x: torch.Tensor, heads: int) -> torch.Tensor:
    """A per-head qk-norm on a flat `(B, L, heads*head_dim)` tensor (it normalises the last dim only)."""
    if norm is None:
        return x
    batch, tokens, width = x.shape
    return norm(x.view(batch, tokens, heads, width // heads)).reshape(batch, tokens, width)


@dataclass
class JointStyleProcessor:
    """diffusers processor for one SD3 joint attention with StyleAligned (image tokens first).

    Batches are `chunks` equal chunks (2 for diffusers' CFG); each chunk's reference is its row
    `reference_index`. A per-timestep `selection` is read through `clock` and narrowed by CB35's rule
    (share only where q and k are both chosen). Not an `nn.Module`: the state dict is untouched.
    """

    style: JointStyle
    chunks: int = CFG_CHUNKS
    reference_index: int = 0
    layer: LayerId | None = None
    selection: LayerSelection | None = None
    clock: FlowClock | None = None
    observe: Observer | None = None  # sees the image tokens' q, k (after qk-norm), v before AdaIN (the analysis)

    def settings(self) -> JointStyle:
        if self.selection is None or not self.selection.per_timestep:
            return self.style
        allowed = joint_features(self.selection.features(self.layer, self.clock.timestep if self.clock else 0.0))
        return JointStyle(allowed_adain(self.style.adain, allowed, self.selection.graded_values),
                          allowed_share(self.style.share, allowed), self.style.isolate_reference)

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, *args: Any, **kwargs: Any) -> Any:
        if encoder_hidden_states is None:
            raise ValueError("the joint StyleAligned processor is for joint attention (attn), not the image-only attn2")
        # JointAttnProcessor2_0 accepts and ignores attention_mask; so does this processor.
        heads, image_tokens = attn.heads, hidden_states.shape[1]
        query, key, value = sd3_joint_qkv(attn, hidden_states, encoder_hidden_states)
        style = self.settings()
        layout = chunk_layout(self.chunks, query.shape[0], self.reference_index)
        if self.observe is not None:
            image = slice(0, image_tokens)
            self.observe(self.layer, layout, query[:, image], key[:, image], value[:, image])
        out = joint_style_attention(query, key, value, heads, (0, image_tokens), layout, style.adain, style.share,
                                    style.isolate_reference).to(query.dtype)
        return sd3_joint_output(attn, out, image_tokens)


def sd3_joint_qkv(attn: Attention, hidden_states: torch.Tensor,
                  encoder_hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k (after qk-norm) and v of an SD3 joint attention, flat `(B, L, heads*head_dim)`, image tokens first
    (diffusers' SD3 order), as `JointAttnProcessor2_0` computes them."""
    heads = attn.heads
    query = _normed(attn.norm_q, attn.to_q(hidden_states), heads)
    key = _normed(attn.norm_k, attn.to_k(hidden_states), heads)
    text_query = _normed(attn.norm_added_q, attn.add_q_proj(encoder_hidden_states), heads)
    text_key = _normed(attn.norm_added_k, attn.add_k_proj(encoder_hidden_states), heads)
    value = torch.cat([attn.to_v(hidden_states), attn.add_v_proj(encoder_hidden_states)], dim=1)
    return torch.cat([query, text_query], dim=1), torch.cat([key, text_key], dim=1), value


def sd3_joint_output(attn: Attention, out: torch.Tensor, image_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The joint attention's output split as `JointAttnProcessor2_0` returns it: the image and text streams projected."""
    image, text = out[:, :image_tokens], out[:, image_tokens:]
    if not attn.context_pre_only:
        text = attn.to_add_out(text)
    return attn.to_out[1](attn.to_out[0](image)), text


@dataclass
class JointStyleHandle(ProcessorHandle):
    """What `install_style_aligned_dit` / `install_style_aligned_flux` changed; `remove()` puts it back (also on
    leaving a `with`)."""

    layers: list[str] = field(default_factory=list)

    @property
    def transformer(self) -> torch.nn.Module:
        return self.model


def default_dit_layers(layout: DiTLayout, args: StyleAlignedArgs | JointStyle | None) -> LayerSelection:
    """The joint layers that share when no `layers` are given: the original's `only_self_level` rule for its
    `StyleAlignedArgs` (None: level 0), every joint layer for a `JointStyle`."""
    if isinstance(args, JointStyle):
        return select_all(layout)
    return select_evenly_spaced(layout, args.only_self_level if args is not None else 0.0)


def install_style_aligned_dit(transformer_or_pipeline: Any, args: StyleAlignedArgs | JointStyle = StyleAlignedArgs(),
                              reference_index: int = 0, layers: LayerSelection | None = None,
                              isolate_reference: bool | None = None, chunks: int = CFG_CHUNKS) -> JointStyleHandle:
    """Turn StyleAligned on for an SD3/SD3.5 transformer (or a pipeline's `.transformer`); returns the handle.

    `args` is the original's `StyleAlignedArgs` (its `only_self_level` picks layers when `layers` is None;
    GroupNorm and LayerNorm sharing do not apply: the DiT has no GroupNorm and its LayerNorms
    normalise per token) or a `JointStyle` (all joint layers unless `layers`). `isolate_reference`
    (default: True, or the `JointStyle`'s own) keeps the reference rows rendering as if alone
    (AlignedGen's `constrain_first`); False is CB35's behaviour.
    `chunks` equal chunks make up each batch (2: diffusers' [uncond, cond]); the reference is row
    `reference_index` of each. A per-timestep `layers` (Conditional Balance) is followed by the
    transformer's `timestep` argument, 1000·σ.
    """
    transformer = transformer_of(transformer_or_pipeline)
    check_install(transformer, JointStyleProcessor, args, chunks, reference_index)
    layout = dit_layout(transformer)
    if isinstance(args, StyleAlignedArgs):
        style = JointStyle(args.adain, args.share, True if isolate_reference is None else isolate_reference)
    else:
        style = args if isolate_reference is None else replace(args, isolate_reference=isolate_reference)
    chosen = layers if layers is not None else default_dit_layers(layout, args)
    chosen.check(layout, "install_style_aligned_dit")
    clock = FlowClock() if chosen.per_timestep else None
    handle = install_processors(transformer, {
        layout.diffusers_path(layer): JointStyleProcessor(style, chunks, reference_index, layer, chosen, clock)
        for layer in layout.layers if layer in chosen.layers})
    if clock is not None:
        handle.hooks.append(transformer.register_forward_pre_hook(clock.hook, with_kwargs=True))
    return handle
