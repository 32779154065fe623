"""Conditional Balance analysis on diffusers: a grading from a StyleAligned image series (methods.md §2.2–2.3).

Each job (style, sample) generates [reference + style, content + style] with StyleAligned as the
paper's analysis sets it (no shared norms, AdaIN on q, k and optionally v). In every shared attn1
layer and at every UNet timestep, `ProjectionRecorder` stores the target image's token mean and std
of the projected q, k, v before AdaIN, the reference rows of both CFG halves dropped and the
halves concatenated (the original's `save_mean_std`). Statistics are per image, so shards of the
series (`analyze_shard`) merge by union (`merge_shards`) and grade exactly as one run (`grade_series`).

SD3/SD3.5 and Flux pipelines are graded the same way over every joint attention (Flux: double and single
blocks), from the image tokens only (text is not styled): q and k after qk-norm (Flux: before RoPE, where
AlignedGen's AdaIN acts) and v, keyed by int(1000·σ) as CB35's SD3.5-Large grading is (dit.md §4.2).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DiffusionPipeline
from PIL import Image

from ..balance import FEATURES, Grading, grade, token_statistics
from ..chunks import ChunkLayout
from ..layers import LayerId
from ..style import StyleAlignedArgs
from ..layers import select_all
from .flow_pipeline import flow_family, generate_flow, install_flow_style
from .joint_style import FlowClock, dit_layout
from .joint_style_flux import flux_layout
from .pipeline import generate
from .style_aligned import StepClock, install_style_aligned, unet_family, unet_layout

STATS_FORMAT = "multicond.series-stats"
# The paper's analysis settings: shared attention, AdaIN on q and k (v for texture), no shared norms.
ANALYSIS_ARGS = StyleAlignedArgs(share_group_norm=False, share_layer_norm=False, adain_values=True)
Sink = Callable[[LayerId, str, torch.Tensor, torch.Tensor], None]


# ---------------------------------------------------------------- the series

@dataclass(frozen=True)
class Series:
    """styles × samples_per_style images; image index = style * samples_per_style + sample (as `image_pairs`)."""

    reference_prompt: str
    content_prompt: str
    styles: tuple[str, ...]
    samples_per_style: int

    @property
    def jobs(self) -> list[tuple[int, int]]:
        return [(style, sample) for style in range(len(self.styles)) for sample in range(self.samples_per_style)]

    def image_index(self, style: int, sample: int) -> int:
        return style * self.samples_per_style + sample

    def prompts(self, style: int) -> list[str]:
        return [f"{self.reference_prompt}, {self.styles[style]}", f"{self.content_prompt}, {self.styles[style]}"]


def job_seed(seed: int, style: int, sample: int) -> int:
    """Seed of a job from (style, sample) alone, so any shard reproduces it.

    Sample j of every style gets the same noise (the original resets its seed per style), so images
    differ across styles by the style only; 2 per sample since `generate` seeds row i with seed + i.
    """
    del style  # the same noise for every style, on purpose
    return seed + 2 * sample


def series_from_json(doc: Any) -> Series:
    """A `Series` from parsed JSON; ValueError naming the bad field otherwise (user files never run code)."""
    if not isinstance(doc, dict):
        raise ValueError("the file must hold a JSON object")
    missing = [k for k in ("reference_prompt", "content_prompt", "styles", "samples_per_style") if k not in doc]
    if missing:
        raise ValueError(f"missing field(s) {', '.join(missing)}")
    if not all(isinstance(doc[k], str) and doc[k] for k in ("reference_prompt", "content_prompt")):
        raise ValueError("reference_prompt and content_prompt must be non-empty strings")
    styles = doc["styles"]
    if not isinstance(styles, list) or len(styles) < 2 or not all(isinstance(s, str) and s for s in styles):
        raise ValueError("styles must be a list of at least 2 non-empty strings")
    samples = doc["samples_per_style"]
    if not isinstance(samples, int) or isinstance(samples, bool) or samples < 2:
        raise ValueError("samples_per_style must be a whole number >= 2 (grading compares samples of a style)")
    return Series(doc["reference_prompt"], doc["content_prompt"], tuple(styles), samples)


def load_series(path: str | Path) -> Series:
    path = Path(path)
    try:
        doc = json.loads(path.read_text("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"cannot read JSON ({type(error).__name__}: {error})") from None
    return series_from_json(doc)


# ---------------------------------------------------------------- recording

def target_statistics(x: torch.Tensor, target_rows: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token mean and std of the target rows of (batch, tokens, channels), flattened over rows → (rows·channels,)."""
    mean, std = token_statistics(x[list(target_rows)].float())  # float32: fp16 stats would round the grades
    return mean.flatten(), std.flatten()


@dataclass
class ProjectionRecorder:
    """A `StyleAlignedProcessor` observer: the target rows' q, k, v statistics (before AdaIN) go to `sink`."""

    sink: Sink

    def __call__(self, layer: LayerId, layout: ChunkLayout, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        with torch.no_grad():
            for feature, projected in zip(FEATURES, (q, k, v)):
                self.sink(layer, feature, *target_statistics(projected, layout.target_rows))


def timestep_key(timestep: float) -> int:
    """int(t), as the gradings are keyed (CB35: int of 1000·σ); a Flux σ = t/1000 in float32 times 1000 lands a
    hair under t, hence the slack."""
    return int(timestep + 1e-3)


@dataclass
class StatsRecorder:
    """Per UNet timestep (from the clock), per (layer, feature): one image's mean and std."""

    clock: StepClock | FlowClock
    steps: dict[int, dict[tuple[LayerId, str], tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)

    def __call__(self, layer: LayerId, feature: str, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.steps.setdefault(timestep_key(self.clock.timestep), {})[(layer, feature)] = (mean.cpu(), std.cpu())

    def take(self, layers: Sequence[LayerId]) -> tuple[tuple[int, ...], dict[str, torch.Tensor]]:
        """The recorded timesteps (call order) and tensors `<layer>/<feature>/<mean|std>` of shape (T, D); resets."""
        timesteps = tuple(self.steps)
        table = {}
        for layer in layers:
            for feature in FEATURES:
                pairs = [self.steps[t][(layer, feature)] for t in timesteps]
                table[f"{layer}/{feature}/mean"] = torch.stack([m for m, _ in pairs])
                table[f"{layer}/{feature}/std"] = torch.stack([s for _, s in pairs])
        self.steps = {}
        return timesteps, table


# ---------------------------------------------------------------- running a shard

@dataclass
class SeriesStats:
    """Raw per-image statistics: images[index]['<layer>/<feature>/<mean|std>'] = (timesteps, D)."""

    family: str
    layers: tuple[LayerId, ...]
    timesteps: tuple[int, ...]
    series: Series
    images: dict[int, dict[str, torch.Tensor]]


def shard_jobs(jobs: Sequence[tuple[int, int]], index: int, count: int) -> list[tuple[int, int]]:
    """Shard `index` of `count`: contiguous, as accelerate's `split_between_processes` splits a list."""
    if not 0 <= index < count:
        raise ValueError(f"shard index {index} is outside 0..{count - 1}")
    base, extra = divmod(len(jobs), count)
    start = index * base + min(index, extra)
    return list(jobs[start:start + base + (index < extra)])


@dataclass
class Recording:
    """StyleAligned installed for the analysis: the model, its family, the handle, the clock and the sampler."""

    model: torch.nn.Module
    family: str
    layout: Any
    handle: Any
    clock: StepClock | FlowClock
    sample: Callable[[list[str], int], Any]


def _record_unet(pipe: DiffusionPipeline, args: StyleAlignedArgs, steps: int, guidance_scale: float,
                 size: int | None, pipeline_kwargs: dict[str, Any]) -> Recording:
    if guidance_scale <= 1:
        raise ValueError("the analysis needs classifier-free guidance (guidance_scale > 1): rows are CFG halves")
    clock = StepClock()
    handle = install_style_aligned(pipe, args)
    handle.hooks.append(pipe.unet.register_forward_pre_hook(clock.hook, with_kwargs=True))

    def sample(prompts: list[str], seed: int) -> Any:  # args=None: StyleAligned is installed; generate only samples
        return generate(pipe, prompts, None, steps=steps, guidance_scale=guidance_scale, seed=seed, height=size,
                        width=size, output_type="latent", **pipeline_kwargs)

    return Recording(pipe.unet, unet_family(pipe.unet), unet_layout(pipe.unet), handle, clock, sample)


def _record_flow(pipe: DiffusionPipeline, args: StyleAlignedArgs, steps: int, guidance_scale: float,
                 size: int | None, pipeline_kwargs: dict[str, Any]) -> Recording:
    transformer = pipe.transformer
    flux = flow_family(pipe) == "flux"
    layout = flux_layout(transformer) if flux else dit_layout(transformer)
    clock = FlowClock(scale=1000.0 if flux else 1.0)  # Flux's transformer takes σ, SD3's 1000·σ
    handle = install_flow_style(pipe, args, guidance_scale, select_all(layout))
    handle.hooks.append(transformer.register_forward_pre_hook(clock.hook, with_kwargs=True))

    def sample(prompts: list[str], seed: int) -> Any:
        return generate_flow(pipe, prompts, None, steps=steps, guidance_scale=guidance_scale, seed=seed, height=size,
                             width=size, output_type="latent", **pipeline_kwargs)

    return Recording(transformer, layout.family, layout, handle, clock, sample)


def analyze_jobs(pipe: DiffusionPipeline, series: Series, jobs: Iterable[tuple[int, int]], *, steps: int = 50,
                 guidance_scale: float = 5.0, seed: int = 10, size: int | None = None,
                 args: StyleAlignedArgs = ANALYSIS_ARGS, progress: Callable[[], None] | None = None,
                 **pipeline_kwargs: Any) -> SeriesStats:
    """Generate the given (style, sample) jobs with StyleAligned and record their statistics.

    UNet pipelines record every shared attn1 layer and need CFG (> 1); SD3/SD3.5 and Flux pipelines every joint
    attention (SD3 under CFG or not; Flux-dev's `guidance_scale` is its distilled guidance).
    """
    record = _record_flow if flow_family(pipe) is not None else _record_unet
    recording = record(pipe, args, steps, guidance_scale, size, pipeline_kwargs)
    recorder = StatsRecorder(recording.clock)
    images: dict[int, dict[str, torch.Tensor]] = {}
    timesteps: tuple[int, ...] = ()
    with recording.handle as handle:
        paths = {recording.layout.diffusers_path(layer): layer for layer in recording.layout.layers}
        for path in handle.layers:  # each installed StyleAligned processor reports its projections
            module = recording.model.get_submodule(path)
            module.set_processor(replace(module.processor, layer=paths[path], observe=ProjectionRecorder(recorder)))
        shared = tuple(paths[path] for path in handle.layers)
        for style, sample in jobs:
            recording.sample(series.prompts(style), job_seed(seed, style, sample))
            timesteps, images[series.image_index(style, sample)] = recorder.take(shared)
            if progress is not None:
                progress()
    return SeriesStats(recording.family, shared, timesteps, series, images)


def analyze_shard(pipe: DiffusionPipeline, series: Series, index: int = 0, count: int = 1,
                  **options: Any) -> SeriesStats:
    """Shard `index` of `count` of the series (no accelerate needed: for tests and manual splits)."""
    return analyze_jobs(pipe, series, shard_jobs(series.jobs, index, count), **options)


# ---------------------------------------------------------------- saving and merging shards

def save_stats(stats: SeriesStats, path: str | Path) -> Path:
    """One shard's raw statistics as .safetensors: tensors `<image>/<layer>/<feature>/<mean|std>`."""
    from safetensors.torch import save_file

    meta = {"format": STATS_FORMAT, "family": stats.family, "layers": [str(x) for x in stats.layers],
            "timesteps": list(stats.timesteps), "series": stats.series.__dict__ | {"styles": list(stats.series.styles)}}
    tensors = {f"{image}/{key}": t.contiguous() for image, table in stats.images.items() for key, t in table.items()}
    save_file(tensors, str(path), metadata={"stats": json.dumps(meta)})
    return Path(path)


def load_stats(path: str | Path) -> SeriesStats:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as file:
        meta = json.loads((file.metadata() or {}).get("stats", "{}"))
        if meta.get("format") != STATS_FORMAT:
            raise ValueError(f"{Path(path).name}: not a {STATS_FORMAT} file")
        images: dict[int, dict[str, torch.Tensor]] = {}
        for key in file.keys():
            image, _, rest = key.partition("/")
            images.setdefault(int(image), {})[rest] = file.get_tensor(key)
    layers = tuple(LayerId.parse(x) for x in meta["layers"])
    return SeriesStats(meta["family"], layers, tuple(meta["timesteps"]), series_from_json(meta["series"]), images)


def merge_shards(shards: Sequence[SeriesStats]) -> SeriesStats:
    """Union of shards' images; they must agree on model, layers, timesteps and series and not overlap."""
    if not shards:
        raise ValueError("no shards to merge")
    base = shards[0]
    images: dict[int, dict[str, torch.Tensor]] = {}
    for shard in shards:
        if (shard.family, shard.layers, shard.series) != (base.family, base.layers, base.series):
            raise ValueError("shards differ in model, layers or series")
        if shard.images and base.images and shard.timesteps != base.timesteps:
            raise ValueError("shards differ in timesteps (run every shard with the same --steps)")
        overlap = images.keys() & shard.images.keys()
        if overlap:
            raise ValueError(f"images {sorted(overlap)} appear in more than one shard")
        images.update(shard.images)
    timesteps = next((s.timesteps for s in shards if s.images), base.timesteps)
    return SeriesStats(base.family, base.layers, timesteps, base.series, images)


# ---------------------------------------------------------------- grading

def grade_series(stats: SeriesStats, name: str = "") -> Grading:
    """Grades per (timestep, layer, feature) from every image's statistics; timesteps batched in `grade`."""
    series = stats.series
    expected = set(range(len(series.styles) * series.samples_per_style))
    if set(stats.images) != expected:
        raise ValueError(f"statistics for images {sorted(expected - set(stats.images))} are missing")
    order = sorted(expected)
    grades = {}
    for feature in FEATURES:
        columns = []
        for layer in stats.layers:  # one layer at a time: D differs by level, and memory stays per layer
            means = torch.stack([stats.images[i][f"{layer}/{feature}/mean"] for i in order]).double()
            stds = torch.stack([stats.images[i][f"{layer}/{feature}/std"] for i in order]).double()
            columns.append(grade(means, stds, len(series.styles), series.samples_per_style))
        grades[feature] = torch.stack(columns, dim=1)
    return Grading(stats.family, stats.layers, stats.timesteps, grades, name)


def grading_heatmap(grading: Grading, feature: str = "q", cell: int = 8) -> Image.Image:
    """Layers (rows) × timesteps (columns, noisiest left) of one feature's grades; lower = brighter."""
    table = grading.grades[feature].T.numpy()
    span = float(table.max() - table.min()) or 1.0
    levels = (255 * (table.max() - table) / span).astype(np.uint8)  # invert: style-sensitive layers stand out
    return Image.fromarray(levels).resize((levels.shape[1] * cell, levels.shape[0] * cell), Image.NEAREST)
