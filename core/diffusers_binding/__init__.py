"""The diffusers binding: the only code of the pack that imports diffusers or transformers.

StyleAligned on any SD1.x/SD2/SDXL-shaped `UNet2DConditionModel` (`install_style_aligned`),
DDIM inversion of a reference image and pinned sampling (`invert_image`, `pin_reference`,
`generate`), dual-style blending of two prompts in one image (`install_epsilon_blend`,
`install_cross_attention_blend`, `generate_dual_style`), InfSplign spatial guidance
(`generate_spatial`, `install_spatial_maps`, `object_tokens`), the Conditional Balance analysis that
grades layers from an image series (`analyze_shard`, `merge_shards`, `grade_series`), tiny
random pipelines for tests and demos (`tiny_pipeline`), and the command line (`cli.main`, run as `python -m multicond`).
"""

from __future__ import annotations

from .analysis import (Series, SeriesStats, analyze_jobs, analyze_shard, grade_series, grading_heatmap, load_series,
                       load_stats, merge_shards, save_stats)
from .dual_style import (DualContextProcessor, DualStyleHandle, generate_dual_style, install_cross_attention_blend,
                         install_epsilon_blend)
from .pipeline import (PinnedReference, encode_image, generate, initial_latents, invert_image, invert_latent,
                       pin_reference)
from .spatial import (SpatialGuidance, SpatialHandle, SpatialMapProcessor, SpatialResult, generate_spatial,
                      infsplign_scheduler, install_spatial_maps, object_tokens)
from .style_aligned import (StyleAlignedHandle, StyleAlignedProcessor, install_style_aligned, shared_layers,
                            unet_layout)
from .tiny import load_pipeline, tiny_pipeline, tiny_unet

__all__ = [
    "Series", "SeriesStats", "analyze_jobs", "analyze_shard", "grade_series", "grading_heatmap", "load_series",
    "load_stats", "merge_shards", "save_stats",
    "DualContextProcessor", "DualStyleHandle", "generate_dual_style", "install_cross_attention_blend",
    "install_epsilon_blend",
    "PinnedReference", "StyleAlignedHandle", "StyleAlignedProcessor", "encode_image", "generate", "initial_latents",
    "install_style_aligned", "invert_image", "invert_latent", "load_pipeline", "pin_reference", "shared_layers",
    "tiny_pipeline", "tiny_unet", "unet_layout",
    "SpatialGuidance", "SpatialHandle", "SpatialMapProcessor", "SpatialResult", "generate_spatial",
    "infsplign_scheduler", "install_spatial_maps", "object_tokens",
]
