"""LayerBalance: which self-attention layers carry the style (Conditional Balance, Cohen et al. 2025).

Produces the layer selection that Shared Attention and AdaIN Style take: from a grading (at each
timestep the lambda_s lowest-graded, i.e. most style-sensitive, layers), from a preset, or from a
block list typed by the user.
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
from ..core.layers import (LayerSelection, UNetLayout, select_all, select_blocks, select_evenly_spaced,
                           selection_chart)
from .common import CATEGORY, HIDDEN, checked_label, model_layout, search_aliases
from .style import LayerSelectionInput

LAYER_BALANCE = "MultiCond_LayerBalance"
GRADINGS = "multicond_gradings"  # models/multicond_gradings/: where users put grading files
NO_GRADING = "none"
SOURCES = ("grading", "preset", "blocks")
GROUP_NORM = {"as the method": None, "shared": True, "not shared": False}  # None: a grading off, others as Shared Attention
PRESETS = ("all layers", "style blocks (IPAdapter)", "composition blocks (IPAdapter)", "evenly spaced (only_self_level)")
# IPAdapter's "style transfer" / "composition" weight types (InstantStyle's blocks), in ComfyUI block numbers;
# SD1.5's composition weights input.7 at a quarter and input.8 fully: both are selected here.
STYLE_BLOCKS = {"sdxl": "output.1", "sd1": "input.1, input.2, input.4, input.5, output.5, output.6, output.7, "
                "output.8, output.9, output.10, output.11"}
COMPOSITION_BLOCKS = {"sdxl": "input.8", "sd1": "input.7, input.8"}

if GRADINGS not in folder_paths.folder_names_and_paths:
    folder_paths.add_model_folder_path(GRADINGS, os.path.join(folder_paths.models_dir, GRADINGS))


def preset_selection(layout: UNetLayout, preset: str, only_self_level: float) -> LayerSelection:
    if preset == PRESETS[0]:
        return select_all(layout)
    if preset == PRESETS[3]:
        return select_evenly_spaced(layout, only_self_level)
    blocks = (STYLE_BLOCKS if preset == PRESETS[1] else COMPOSITION_BLOCKS)[layout.family.replace("sd2", "sd1")]
    return select_blocks(layout, blocks, LAYER_BALANCE, "preset")


def grading_selection(layout: UNetLayout, grading: str, lambda_s: float) -> LayerSelection:
    path = folder_paths.get_full_path(GRADINGS, grading) if grading != NO_GRADING else None
    if path is None:
        raise InputError(LAYER_BALANCE, "grading", f"no grading file chosen ({grading!r})",
                         f"Put a grading file in models/{GRADINGS}/ (see the README), refresh, and pick it.")
    loaded = load_grading(path, LAYER_BALANCE, "grading")
    check_grading(loaded, layout, LAYER_BALANCE)
    count = style_layer_count(lambda_s, len(layout.layers), LAYER_BALANCE)
    if count == 0:  # allowed, as the original; said, since the style nodes then change nothing
        logging.warning("%s: lambda_s %s selects no layer of %d: no layer carries the style", LAYER_BALANCE, lambda_s,
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
                        "share attention where q or k is chosen (Cohen et al. 2025); or a preset; or a block list.",
            inputs=[
                io.Model.Input("model", tooltip="The model the selection is for (its architecture and layers)."),
                io.Combo.Input("source", options=list(SOURCES), default="preset",
                               tooltip="grading: Conditional Balance's per-step choice from a grading file (put one "
                                       f"in models/{GRADINGS}/); preset: a fixed set; blocks: the block list below. "
                                       "The inputs the chosen source does not use are hidden."),
                io.Combo.Input("grading", options=[NO_GRADING, *folder_paths.get_filename_list(GRADINGS)],
                               tooltip=f"A grading file from models/{GRADINGS}/ (the published SDXL gradings "
                                       "style_layer_grading / style_balance_grading_v, or one this pack computed)."),
                io.Float.Input("lambda_s", default=0.43, min=0.0, max=1000.0, step=0.01,
                               tooltip="How many layers carry the style: a fraction of the model's self-attention "
                                       "layers in [0, 1] (paper: 0.43; 0.57 with a ControlNet; 0: none) or a whole count."),
                io.Combo.Input("preset", options=list(PRESETS), default=PRESETS[1],
                               tooltip="With source 'preset': every layer, IPAdapter's style or composition blocks, "
                                       "or StyleAligned's evenly spaced only_self_level choice."),
                io.Float.Input("only_self_level", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="For the evenly spaced preset: the fraction of layers left unshared "
                                       "(StyleAligned's only_self_level)."),
                io.String.Input("blocks", default="output", multiline=False,
                                tooltip="With source 'blocks': e.g. 'output' (every output block), 'output.1, "
                                        "input.8:0-3, middle' (':a-b' picks transformer depths)."),
                io.Float.Input("lambda_t", default=0.85, min=0.0, max=1.0, step=0.01,
                               tooltip="With a ControlNet: below timestep lambda_t*1000 its down-block residuals are "
                                       "dropped (the mid-block one kept), freeing the geometry late in sampling "
                                       "(paper: 0.85; 0 keeps the ControlNet throughout). Needs Shared Attention."),
                io.Combo.Input("group_norm", options=list(GROUP_NORM), default="as the method",
                               tooltip="Shared GroupNorm with this selection. 'as the method': from a grading off "
                                       "(Conditional Balance never shares it), with a preset or blocks as Shared "
                                       "Attention's share_group_norm says; 'shared' / 'not shared' decide."),
            ],
            outputs=[LayerSelectionInput.Output(display_name="layers",
                                                tooltip="The layer selection, for the layers input of Shared "
                                                        "Attention and AdaIN Style."),
                     io.Image.Output(display_name="preview",
                                     tooltip="The selection as an image: a row per self-attention layer, a column per "
                                             "timestep (981 left to 1 right); red = AdaIN q, blue = k, green = v.")],
        )

    @classmethod
    def execute(cls, model: Any, source: str, grading: str, lambda_s: float, preset: str, only_self_level: float,
                blocks: str, lambda_t: float = 0.85, group_norm: str = "as the method") -> io.NodeOutput:
        label = checked_label(cls, locals())
        layout = model_layout(model, label)
        if source == "grading":
            selection = grading_selection(layout, grading, lambda_s)
        elif source == "preset":
            selection = preset_selection(layout, preset, only_self_level)
        else:
            selection = select_blocks(layout, blocks, LAYER_BALANCE, "blocks")
        columns = sorted(selection.schedule, reverse=True) if selection.per_timestep else ddim_timesteps(50)
        preview = selection_chart(selection, layout.layers, columns).unsqueeze(0)
        chosen = GROUP_NORM[group_norm]
        group_norm_choice = selection.group_norm if chosen is None else chosen
        return io.NodeOutput(replace(selection, lambda_t=lambda_t, group_norm=group_norm_choice), preview)
