"""LayerBalance: which self-attention layers carry the style (Conditional Balance, Cohen et al. 2025).

Produces the layer selection that Shared Attention and AdaIN Style take: from a grading (at each
timestep the lambda_s lowest-graded, i.e. most style-sensitive, layers), from a preset, or from a
block list typed by the user. SD1.x/2.x/SDXL UNets and SD3/SD3.5 (its joint blocks; CB35's
gradingSd35L, keyed by 1000·σ, dit.md §4.2).
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from typing import Any

import folder_paths
from comfy_api.latest import io

from ..core.balance import check_grading, graded_selection, load_grading, style_layer_count
from ..core.errors import InputError
from ..core.inversion import ddim_timesteps
from ..core.layers import (UNET_BLOCKS, DiTLayout, LayerSelection, ModelLayout, select_all, select_blocks,
                           select_evenly_spaced, selection_chart)
from .common import CATEGORY, HIDDEN, checked_label, model_layout, search_aliases
from .style import LayerSelectionInput

LAYER_BALANCE = "MultiCond_LayerBalance"
GRADINGS = "multicond_gradings"  # models/multicond_gradings/: where users put grading files
NO_GRADING = "none"
SOURCES = ("grading", "preset", "blocks")
GROUP_NORM = {"as the method": None, "shared": True, "not shared": False}  # None: a grading off, others as Shared Attention
ALL_LAYERS, IPADAPTER_STYLE, IPADAPTER_COMPOSITION, EVENLY_SPACED, FAMILY_STYLE = (
    "all layers", "style blocks (IPAdapter)", "composition blocks (IPAdapter)", "evenly spaced (only_self_level)",
    "style blocks (family default)")
PRESETS = (ALL_LAYERS, IPADAPTER_STYLE, IPADAPTER_COMPOSITION, EVENLY_SPACED, FAMILY_STYLE)  # appended: saved names keep
# The family default: IPAdapter's style blocks on UNets, AlignedGen's single-stream blocks on Flux, every joint block on
# SD3/SD3.5 (no published fixed subset there: Conditional Balance SD3.5 chooses per step from its grading).
FAMILY_STYLE_BLOCKS = {"flux": "single", "sd3": "joint", "sd35": "joint"}
# IPAdapter's "style transfer" / "composition" weight types (InstantStyle's blocks), in ComfyUI block numbers;
# SD1.5's composition weights input.7 at a quarter and input.8 fully: both are selected here.
STYLE_BLOCKS = {"sdxl": "output.1", "sd1": "input.1, input.2, input.4, input.5, output.5, output.6, output.7, "
                "output.8, output.9, output.10, output.11"}
COMPOSITION_BLOCKS = {"sdxl": "input.8", "sd1": "input.7, input.8"}
DIT_BLOCKS_HINT = "'joint' (every joint block) or 'joint.3, joint.10'"

if GRADINGS not in folder_paths.folder_names_and_paths:
    folder_paths.add_model_folder_path(GRADINGS, os.path.join(folder_paths.models_dir, GRADINGS))


def preset_selection(layout: ModelLayout, preset: str, only_self_level: float,
                     node: str = LAYER_BALANCE) -> LayerSelection:
    if preset == ALL_LAYERS:
        return select_all(layout)
    if preset == EVENLY_SPACED:
        return select_evenly_spaced(layout, only_self_level)
    if preset == FAMILY_STYLE and isinstance(layout, DiTLayout):
        return select_blocks(layout, FAMILY_STYLE_BLOCKS[layout.family], node, "preset")
    if isinstance(layout, DiTLayout):  # InstantStyle's blocks are UNet blocks: no DiT counterpart is known
        raise InputError(node, "preset", f"{preset!r} names UNet blocks, and this is an {layout.family} model",
                         f"On a DiT use the preset '{FAMILY_STYLE}', '{ALL_LAYERS}' or '{EVENLY_SPACED}', source "
                         "'grading' with "
                         f"gradingSd35L, or source 'blocks' with {DIT_BLOCKS_HINT}.")
    blocks = (COMPOSITION_BLOCKS if preset == IPADAPTER_COMPOSITION else STYLE_BLOCKS)[layout.family.replace("sd2", "sd1")]
    return select_blocks(layout, blocks, node, "preset")


def block_selection(layout: ModelLayout, blocks: str, node: str = LAYER_BALANCE) -> LayerSelection:
    """The typed block list; on a DiT a UNet block name (the default 'output') gets the DiT spelling as its fix."""
    terms = [term.strip() for term in blocks.split(",") if term.strip()]
    unet_terms = [term for term in terms if term.split(":")[0].split(".")[0] in UNET_BLOCKS]
    if isinstance(layout, DiTLayout) and unet_terms:
        raise InputError(node, "blocks", f"{', '.join(map(repr, unet_terms))} names UNet blocks, and this is an "
                         f"{layout.family} model", f"On SD3/SD3.5 name joint blocks: {DIT_BLOCKS_HINT} "
                         f"(this model has joint.0-joint.{len(layout.layers) - 1}).")
    return select_blocks(layout, blocks, node, "blocks")


def grading_selection(layout: ModelLayout, grading: str, lambda_s: float, node: str = LAYER_BALANCE) -> LayerSelection:
    path = folder_paths.get_full_path(GRADINGS, grading) if grading != NO_GRADING else None
    if path is None:
        raise InputError(node, "grading", f"no grading file chosen ({grading!r})",
                         f"Put a grading file in models/{GRADINGS}/ (see the README), refresh, and pick it.")
    loaded = load_grading(path, node, "grading")
    check_grading(loaded, layout, node)
    # CB35 takes `argsort(grades)[:λs]` of its 38 joint layers per step (Handler.__init__, :302-307): a count.
    count = style_layer_count(lambda_s, len(layout.layers), node)
    if count == 0:  # allowed, as the original; said, since the style nodes then change nothing
        logging.warning("%s: lambda_s %s selects no layer of %d: no layer carries the style", node, lambda_s,
                        len(layout.layers))
    return graded_selection(loaded, count)


class LayerBalance(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            hidden=HIDDEN,
            node_id=LAYER_BALANCE,
            **search_aliases("conditional balance", "style strength", "style blocks", "block weights",
                             "layer selection"),
            display_name="Layer Balance (Conditional Balance)",
            category=f"{CATEGORY}/style",
            description="Chooses the self-attention layers that Shared Attention and AdaIN Style act on. From a "
                        "grading, at every step the lambda_s most style-sensitive layers get AdaIN on q/k(/v) and "
                        "share attention where q or k is chosen (Cohen et al. 2025; on SD3.5 where both are, as "
                        "its SD3.5 code); or a preset; or a block list. SD1.x, SD2.x, SDXL and SD3/SD3.5.",
            inputs=[
                io.Model.Input("model", tooltip="The model the selection is for (its architecture and layers): an "
                                                "SD1.x, SD2.x, SDXL or SD3/SD3.5 model."),
                io.Combo.Input("source", options=list(SOURCES), default="preset",
                               tooltip="grading: Conditional Balance's per-step choice from a grading file (put one "
                                       f"in models/{GRADINGS}/); preset: a fixed set; blocks: the block list below. "
                                       "The inputs the chosen source does not use are hidden."),
                io.Combo.Input("grading", options=[NO_GRADING, *folder_paths.get_filename_list(GRADINGS)],
                               tooltip=f"A grading file from models/{GRADINGS}/ (the published SDXL gradings "
                                       "style_layer_grading / style_balance_grading_v, SD3.5-Large's gradingSd35L, "
                                       "or one this pack computed)."),
                io.Float.Input("lambda_s", default=0.43, min=0.0, max=1000.0, step=0.01,
                               tooltip="How many layers carry the style: a fraction of the model's self-attention "
                                       "layers in [0, 1] (paper: 0.43; 0.57 with a ControlNet; 0: none) or a whole "
                                       "count. SD3.5: CB35 uses 28 (a count, of 38 joint layers)."),
                io.Combo.Input("preset", options=list(PRESETS), default=FAMILY_STYLE,
                               tooltip="With source 'preset': every layer, IPAdapter's style or composition blocks "
                                       "(UNet only), StyleAligned's evenly spaced only_self_level choice, or the "
                                       "family default: IPAdapter's style blocks on UNets, the single-stream blocks "
                                       "on Flux (AlignedGen), every joint block on SD3/SD3.5."),
                io.Float.Input("only_self_level", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="For the evenly spaced preset: the fraction of layers left unshared "
                                       "(StyleAligned's only_self_level)."),
                io.String.Input("blocks", default="output", multiline=False,
                                tooltip="With source 'blocks': e.g. 'output' (every output block), 'output.1, "
                                        "input.8:0-3, middle' (':a-b' picks transformer depths); on SD3/SD3.5 "
                                        "'joint' (every joint block) or 'joint.3, joint.10'."),
                io.Float.Input("lambda_t", default=0.85, min=0.0, max=1.0, step=0.01,
                               tooltip="With a ControlNet: below timestep lambda_t*1000 its down-block residuals are "
                                       "dropped (the mid-block one kept), freeing the geometry late in sampling "
                                       "(paper: 0.85; 0 keeps the ControlNet throughout). Needs Shared Attention. "
                                       "UNet ControlNets only: no effect on SD3/SD3.5 (CB35 has no ControlNet)."),
                io.Combo.Input("group_norm", options=list(GROUP_NORM), default="as the method",
                               tooltip="Shared GroupNorm with this selection. 'as the method': from a grading off "
                                       "(Conditional Balance never shares it), with a preset or blocks as Shared "
                                       "Attention's share_group_norm says; 'shared' / 'not shared' decide. SD3/SD3.5 "
                                       "has no GroupNorm: no effect there."),
            ],
            outputs=[LayerSelectionInput.Output(display_name="layers",
                                                tooltip="The layer selection, for the layers input of Shared "
                                                        "Attention and AdaIN Style."),
                     io.Image.Output(display_name="preview",
                                     tooltip="The selection as an image: a row per self-attention (SD3: joint) layer, "
                                             "a column per timestep (noisiest left: 981 to 1, or a grading's own "
                                             "timesteps); red = AdaIN q, blue = k, green = v.")],
        )

    @classmethod
    def execute(cls, model: Any, source: str, grading: str, lambda_s: float, preset: str, only_self_level: float,
                blocks: str, lambda_t: float = 0.85, group_norm: str = "as the method") -> io.NodeOutput:
        label = checked_label(cls, locals())
        layout = model_layout(model, label, dit=True)
        if source == "grading":
            selection = grading_selection(layout, grading, lambda_s, label)
        elif source == "preset":
            selection = preset_selection(layout, preset, only_self_level, label)
        else:
            selection = block_selection(layout, blocks, label)
        columns = sorted(selection.schedule, reverse=True) if selection.per_timestep else ddim_timesteps(50)
        preview = selection_chart(selection, layout.layers, columns).unsqueeze(0)
        chosen = GROUP_NORM[group_norm]
        group_norm_choice = selection.group_norm if chosen is None else chosen
        return io.NodeOutput(replace(selection, lambda_t=lambda_t, group_norm=group_norm_choice), preview)
