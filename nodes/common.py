"""ComfyUI helpers the node modules share: model family, layers, timestep ranges, replace slots."""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import comfy.ldm.flux.model
import comfy.ldm.modules.attention as comfy_attention
import comfy.model_base
import comfy.supported_models as supported
import torch
from comfy.ldm.modules.diffusionmodules.mmdit import MMDiT
from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
from comfy.patcher_extension import WrappersMP
from comfy_api.latest import io

from ..core.chunks import ChunkLayout, chunk_layout
from ..core.errors import InputError
from ..core.layers import DiTLayout, LayerId, LayerSelection, UNetLayout, layout_from_layers

CATEGORY = "MultiCond"
LAYERS_TYPE = "MULTICOND_LAYERS"
# transformer_options set by CrossAttnBlend, read by any attn2 patch that must tell its prompt from the second one:
SECOND_TOKENS = "multicond_second_tokens"  # how many appended context tokens are the second prompt's
SECOND_CONTEXT = "multicond_second_context"  # set on the call of a delegated patch that attends to the second prompt

HIDDEN = [io.Hidden.unique_id, io.Hidden.prompt]  # what node_label reads: every node's schema asks for them


def search_aliases(*terms: str) -> dict[str, list[str]]:
    """The schema keyword for what users type to find a node; hosts older than search aliases take none."""
    return {"search_aliases": list(terms)} if "search_aliases" in getattr(io.Schema, "__dataclass_fields__", {}) else {}


def node_label(node: type[io.ComfyNode], node_id: str) -> str:
    """How errors name a node: its id, and its title and number in the graph when the host passes them."""
    hidden = getattr(node, "hidden", None)
    number = getattr(hidden, "unique_id", None)
    if number is None:
        return node_id
    title = ((getattr(hidden, "prompt", None) or {}).get(str(number), {}).get("_meta", {})).get("title")
    return f"{node_id} '{title}' (#{number})" if title else f"{node_id} (#{number})"


def checked_label(node: type[io.ComfyNode], values: dict[str, Any]) -> str:
    """The node's label for errors, once every widget value is as its schema allows: an option of its
    list, a finite number within range.

    ComfyUI 0.3.64 does not check V3 option lists, and no host refuses NaN (it fails no comparison).
    """
    schema = node.define_schema()
    label = node_label(node, schema.node_id)
    for spec in schema.inputs:
        value = values.get(spec.id)
        if value is None:
            continue
        options = getattr(spec, "options", None)
        if isinstance(spec, io.Combo.Input) and options and value not in options:  # an empty list: files the user has none of
            raise InputError(label, spec.id, f"{value!r} is not an option", f"Choose one of {list(options)}.")
        if isinstance(spec, (io.Float.Input, io.Int.Input)):
            low, high = getattr(spec, "min", None), getattr(spec, "max", None)
            if not math.isfinite(value) or (low is not None and value < low) or (high is not None and value > high):
                raise InputError(label, spec.id, f"{value!r} is not a finite number within {low}..{high}",
                                 f"Set a value from {low} to {high}.")
    return label


# Checked in this order: SDXL derivatives subclass SDXL, SD2.x models subclass SD20.
_FAMILIES: tuple[tuple[type, str], ...] = ((supported.SDXL, "sdxl"), (supported.SD20, "sd2"), (supported.SD15, "sd1"))


def model_layout(model: Any, node: str, dit: bool = False) -> UNetLayout | DiTLayout:
    """The self-attention layers of a MODEL, or an error naming its family.

    UNets always; SD3/SD3.5 (joint attention layers) and Flux.1 (double and single blocks) only for a
    node that asks with `dit`, so a node written for UNets keeps refusing them by name.
    """
    if dit:
        joint = dit_layout(model, node)
        if joint is not None:
            return joint
    supported_models = "an SD1.x, SD2.x, SDXL, SD3/SD3.5 or Flux.1" if dit else "an SD1.x, SD2.x or SDXL"
    config = model.model.model_config
    family = next((name for cls, name in _FAMILIES if isinstance(config, cls)), None)
    unet = model.get_model_object("diffusion_model")
    if family is None or not isinstance(unet, UNetModel):
        raise InputError(node, "model", f"model family {type(config).__name__} is not supported",
                         f"Use {supported_models} checkpoint.")
    try:
        return layout_from_layers(family, enumerate_layers(unet), unet.num_res_blocks)
    except ValueError as error:
        raise InputError(node, "model", f"{type(config).__name__}: {error}",
                         f"Use {supported_models} checkpoint.") from error


def dit_layout(model: Any, node: str) -> DiTLayout | None:
    """An SD3/SD3.5 or Flux.1 model's attention layers; None for a model that is no DiT; an error for Flux's kin."""
    base = model.model
    diffusion_model = model.get_model_object("diffusion_model")
    if isinstance(base, comfy.model_base.Flux):
        return flux_layout(base, diffusion_model, node)
    if not isinstance(base, comfy.model_base.SD3) or not isinstance(diffusion_model, MMDiT):
        return None
    # ComfyUI marks SD3.5 (Medium and Large) by its RMS qk-norm; SD3-medium has none (dit.md §2.7).
    family = "sd35" if base.model_config.unet_config.get("qk_norm") == "rms" else "sd3"
    return DiTLayout(family, joint=len(diffusion_model.joint_blocks))


def flux_layout(base: Any, diffusion_model: Any, node: str) -> DiTLayout:
    """Flux.1 dev/schnell (and Kontext, Fill: the same classes); Chroma, Flux2 and other kin by name."""
    # Chroma, Flux2 and LongCat derive from model_base.Flux; Flux2 shares the network class (dit.md §2.7).
    is_flux1 = (type(base) is comfy.model_base.Flux and type(diffusion_model) is comfy.ldm.flux.model.Flux
                and not getattr(diffusion_model.params, "global_modulation", False))
    if not is_flux1:
        raise InputError(node, "model", f"{type(base).__name__} models are not supported",
                         "Use an SD1.x, SD2.x, SDXL, SD3/SD3.5 or Flux.1 (dev, schnell) checkpoint.")
    return DiTLayout("flux", double=len(diffusion_model.double_blocks), single=len(diffusion_model.single_blocks))


def enumerate_layers(unet: UNetModel) -> list[LayerId]:
    def scan(seq: torch.nn.Module, block: str, number: int) -> list[LayerId]:
        return [LayerId(block, number, depth) for layer in seq
                if isinstance(layer, comfy_attention.SpatialTransformer)
                for depth in range(len(layer.transformer_blocks))]

    layers = [layer for n, seq in enumerate(unet.input_blocks) for layer in scan(seq, "input", n)]
    layers += scan(unet.middle_block, "middle", 0)
    layers += [layer for n, seq in enumerate(unet.output_blocks) for layer in scan(seq, "output", n)]
    return layers


def sigma_range(model: Any, start_percent: float, end_percent: float, node: str) -> tuple[float, float]:
    """(high, low) sigmas of a start/end percent of the sampling, as ComfyUI's ControlNet range."""
    if not 0.0 <= start_percent <= end_percent <= 1.0:
        raise InputError(node, "start_percent", f"the range {start_percent}..{end_percent} is not within 0..1 in order",
                         "Set 0 <= start_percent <= end_percent <= 1.")
    sampling = model.get_model_object("model_sampling")
    return float(sampling.percent_to_sigma(start_percent)), float(sampling.percent_to_sigma(end_percent))


def current_sigma(extra_options: dict) -> float:
    return float(extra_options["sigmas"].max())


def sigma_timestep(log_sigmas: torch.Tensor, sigma: float) -> float:
    """ComfyUI's ModelSamplingDiscrete.timestep: the index of the nearest log-sigma."""
    return float((log_sigmas - math.log(max(sigma, 1e-10))).abs().argmin())


def selection_allows(selection: LayerSelection | None, layer: LayerId, extra_options: dict,
                     log_sigmas: torch.Tensor | None) -> bool:
    """Whether a layer selection includes `layer` at this call's step (no selection: every layer)."""
    if selection is None:
        return True
    if not selection.per_timestep:
        return layer in selection.layers
    return bool(selection.features(layer, sigma_timestep(log_sigmas, current_sigma(extra_options))))


def batch_layout(cond_or_uncond: list[int], batch: int, reference_index: int, node: str) -> ChunkLayout:
    """The chunks of a model call, with errors a user can act on."""
    rows = batch // max(len(cond_or_uncond), 1)
    if rows < 2:
        raise InputError(node, "latent batch", f"the batch holds {rows} image, with no target besides the reference",
                         "Set the latent batch_size to 2 or more: image reference_index is the style reference.")
    if reference_index >= rows:
        raise InputError(node, "reference_index", f"{reference_index} is outside the batch of {rows} images",
                         f"Set reference_index between 0 and {rows - 1}.")
    return chunk_layout(len(cond_or_uncond), batch, reference_index)


def existing_replace(model: Any, kind: str, layer: LayerId) -> Any:
    """The replace patch ComfyUI would run on this layer now (3-part key first, then 2-part)."""
    slots = model.model_options.get("transformer_options", {}).get("patches_replace", {}).get(kind, {})
    return slots.get(layer.comfy_key, slots.get(layer.comfy_key[:2]))


PACK = __name__.split(".")[0]  # the pack's top package, whatever its folder is called
WRAPPER_PREFIX = "multicond."  # every wrapper key of the pack starts with it


OVERRIDE = "optimized_attention_override"  # ComfyUI's one attention-override slot in transformer_options (dit.md §2.1)
OVERRIDE_GUARD_KEY = f"{WRAPPER_PREFIX}override_guard"


def is_pack_patch(patch: Any) -> bool:
    return type(patch).__module__.split(".")[0] == PACK


def set_override(patched: Any, build: Callable[[Any], Any]) -> None:
    """Install `build(current)` as the attention override of `patched` below the pack's patches that stay outermost,
    and the `OverrideGuard` that keeps it on top of an override a later node sets.

    Those (`keeps_outside`: the DiT text blend) must see each model call's whole sequence and hand narrowed calls
    down, so a node applied after them goes inside them; their order is kept. `build` receives what is below them
    (it may reuse an existing patch of its own kind).
    """
    options = restored_override(patched)
    current = options.get(OVERRIDE)
    outer = []
    while current is not None and getattr(current, "keeps_outside", False):
        outer.append(current)
        current = current.inner
    patch = build(current)
    for wrapper in reversed(outer):
        patch = dataclasses.replace(wrapper, inner=patch)
    options[OVERRIDE] = patch
    patched.remove_wrappers_with_key(WrappersMP.APPLY_MODEL, OVERRIDE_GUARD_KEY)
    patched.add_wrapper_with_key(WrappersMP.APPLY_MODEL, OVERRIDE_GUARD_KEY, OverrideGuard(patch))


def restored_override(patched: Any) -> dict:
    """`patched`'s transformer_options, with the pack's last override chain put back on top of the override when a
    node applied since replaced it (see `OverrideGuard`)."""
    options = patched.model_options.setdefault("transformer_options", {})
    guards = patched.get_wrappers(WrappersMP.APPLY_MODEL, OVERRIDE_GUARD_KEY)
    if guards:
        options[OVERRIDE] = guards[-1].kept_on(options.get(OVERRIDE))
    return options


def reaches_pack_patch(caller: Any, depth: int = 6) -> bool:
    """Whether `caller` is or may call one of the pack's patches: as the pack's `inner`, in a closure cell, as a bound
    method's object or in a `functools.partial` (how attention overrides wrap the one they found). By kind, not
    identity: ComfyUI 0.3.64 deep-copies model_options on every clone."""
    if caller is None or depth < 0:
        return False
    if is_pack_patch(caller):
        return True
    held = [getattr(caller, "inner", None), getattr(caller, "__self__", None), getattr(caller, "func", None),
            *(caller.args if isinstance(caller, functools.partial) else ()),
            *(cell.cell_contents for cell in getattr(caller, "__closure__", None) or () if _filled(cell))]
    return any(reaches_pack_patch(item, depth - 1) for item in held if item is not None)


def _filled(cell: Any) -> bool:
    try:
        cell.cell_contents
    except ValueError:  # an empty cell
        return False
    return True


def rebased(patch: Any, base: Any) -> Any:
    """The pack's patches of an override chain over `base` instead of what they wrapped."""
    if patch is None or not is_pack_patch(patch):
        return base
    return dataclasses.replace(patch, inner=rebased(patch.inner, base))


@dataclasses.dataclass(frozen=True)
class OverrideGuard:
    """APPLY_MODEL wrapper: ComfyUI has one attention-override slot, and a node applied after the pack's DiT nodes may
    set its own there (0.33.0's Model Attention Backend does), which would silently drop theirs. When the override a
    call gets reaches none of the pack's patches, the pack's last chain runs on top of it, as if that node had come
    first."""

    chain: Any  # the override the pack's last DiT node installed

    def kept_on(self, current: Any) -> Any:
        """`current` when it reaches the pack's patches, else the pack's chain over it."""
        return current if reaches_pack_patch(current) else rebased(self.chain, current)

    def __call__(self, executor: Any, x: torch.Tensor, t: torch.Tensor, c_concat: Any, c_crossattn: Any, control: Any,
                 transformer_options: dict, **kwargs: Any) -> torch.Tensor:
        current = transformer_options.get(OVERRIDE)
        kept = self.kept_on(current)
        if kept is not current:
            transformer_options = {**transformer_options, OVERRIDE: kept}
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)


def effective_override(transformer_options: dict) -> Any:
    """The attention override a model call's attention will run: the one in `transformer_options`, or, when it
    reaches none of the pack's patches, what the call's `OverrideGuard` makes of it (for wrappers that run before it)."""
    current = transformer_options.get(OVERRIDE)
    guards = transformer_options.get("wrappers", {}).get(WrappersMP.APPLY_MODEL, {}).get(OVERRIDE_GUARD_KEY, [])
    return guards[-1].kept_on(current) if guards else current


def first_foreign(patch: Any) -> Any:
    """What a patch of the pack replaced (every one delegates to its `inner`), down to a foreign patch or None."""
    while patch is not None and is_pack_patch(patch):
        patch = patch.inner
    return patch


def without_pack_patches(model: Any) -> Any:
    """A clone of `model` with none of this pack's patches and wrappers; other nodes' patches stay."""
    plain = model.clone()
    options = plain.model_options.get("transformer_options", {})
    replaces = options.get("patches_replace", {})
    for kind in ("attn1", "attn2", "dit"):
        slots = replaces.get(kind, {})
        for key, patch in list(slots.items()):
            patch = first_foreign(patch)
            if patch is None:
                del slots[key]
            else:
                slots[key] = patch
    override = first_foreign(options.get(OVERRIDE))
    if override is None:
        options.pop(OVERRIDE, None)
    else:
        options[OVERRIDE] = override
    for kind, wrappers in list(plain.wrappers.items()):
        for key in [key for key in wrappers if isinstance(key, str) and key.startswith(WRAPPER_PREFIX)]:
            plain.remove_wrappers_with_key(kind, key)
    return plain


def plain_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict) -> torch.Tensor:
    """What ComfyUI's CrossAttention computes when no replace patch is set."""
    return comfy_attention.optimized_attention(q, k, v, extra_options["n_heads"],
                                               attn_precision=extra_options.get("attn_precision"),
                                               transformer_options=extra_options)
