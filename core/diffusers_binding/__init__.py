"""The diffusers binding: the only code of the pack that imports diffusers or transformers.

StyleAligned on any SD1.x/SD2/SDXL-shaped `UNet2DConditionModel` (`install_style_aligned`),
DDIM inversion of a reference image and pinned sampling (`invert_image`, `pin_reference`,
`generate`), dual-style blending of two prompts in one image (`install_epsilon_blend`,
`install_cross_attention_blend`, `generate_dual_style`), InfSplign spatial guidance
(`generate_spatial`, `install_spatial_maps`, `object_tokens`; on SD3/SD3.5 and Flux
`generate_spatial_flow`), the Conditional Balance analysis that grades layers from an image series
(`analyze_shard`, `merge_shards`, `grade_series`), StyleAligned on SD3/SD3.5 and Flux transformers
(`install_style_aligned_dit`, `install_style_aligned_flux`) with flow inversion and pinned sampling on their
pipelines (`invert_flow_image`, `pin_flow_reference`, `generate_flow`),
tiny random pipelines for tests and demos (`tiny_pipeline`, `tiny_dit_pipeline`), offline checkpoint loading (`load_checkpoint`)
and the command line (`cli.main`, run as `python -m multicond`).

The names below are imported from their modules on first use (PEP 562), so importing a submodule
such as `cli` (`python -m multicond --help`) does not pay seconds for diffusers.
"""

from __future__ import annotations

import importlib
from typing import Any

# Each public name and the module that defines it.
_EXPORTS: dict[str, str] = {
    **dict.fromkeys(("Series", "SeriesStats", "analyze_jobs", "analyze_shard", "grade_series", "grading_heatmap",
                     "load_series", "load_stats", "merge_shards", "save_stats"), "analysis"),
    **dict.fromkeys(("DualContextProcessor", "DualStyleHandle", "generate_dual_style", "install_cross_attention_blend",
                     "install_epsilon_blend"), "dual_style"),
    **dict.fromkeys(("JointStyleHandle", "JointStyleProcessor", "dit_layout", "install_style_aligned_dit"),
                    "joint_style"),
    **dict.fromkeys(("ALIGNEDGEN_STYLE", "FluxCall", "FluxPositions", "FluxStyleProcessor", "flux_layout",
                     "install_style_aligned_flux"), "joint_style_flux"),
    **dict.fromkeys(("install_flow_epsilon_blend",), "dual_style_flow"),
    **dict.fromkeys(("FAMILY_DEFAULT", "encode_flow_image", "flow_sigmas", "flow_velocity", "generate_flow",
                     "invert_flow_image", "invert_flow_latent", "pin_flow_reference"), "flow_pipeline"),
    **dict.fromkeys(("install_masked_controlnet",), "masked_control"),
    **dict.fromkeys(("PinnedReference", "encode_image", "generate", "initial_latents", "invert_image", "invert_latent",
                     "load_checkpoint", "pin_reference"), "pipeline"),
    **dict.fromkeys(("SpatialGuidance", "SpatialHandle", "SpatialMapProcessor", "SpatialResult", "generate_spatial",
                     "infsplign_scheduler", "install_spatial_maps", "object_tokens"), "spatial"),
    **dict.fromkeys(("FlowSpatialHandle", "flow_object_tokens", "generate_spatial_flow", "install_flow_spatial_maps"),
                    "spatial_flow"),
    **dict.fromkeys(("StyleAlignedHandle", "StyleAlignedProcessor", "install_style_aligned", "shared_layers",
                     "unet_layout"), "style_aligned"),
    **dict.fromkeys(("load_pipeline", "tiny_dit_pipeline", "tiny_pipeline", "tiny_unet"), "tiny"),
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # the next access is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})

