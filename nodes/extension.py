"""The pack's ComfyUI extension: the list of nodes."""

from __future__ import annotations

from typing_extensions import override

from comfy_api.latest import ComfyExtension, io

from .adapter import MaskedAdapter
from .assets import prepare_user_folders
from .balance import LayerBalance
from .blend import CrossAttnBlend, EpsilonBlend
from .prompts import BatchPrompts
from .reference import StyleReference
from .spatial import SpatialGuidance
from .style import AdaINStyle, SharedAttention


class MultiCondExtension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        prepare_user_folders()  # here, not in on_load: ComfyUI 0.3.64 never calls on_load
        return [SharedAttention, AdaINStyle, StyleReference, BatchPrompts, LayerBalance, EpsilonBlend, CrossAttnBlend,
                SpatialGuidance, MaskedAdapter]
