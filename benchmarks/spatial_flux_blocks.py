"""Which Flux double blocks Spatial Guidance should read: each block measured alone.

    .venv/bin/python benchmarks/spatial_flux_blocks.py                      # a random Flux.1-dev-deep tiny model
    .venv/bin/python benchmarks/spatial_flux_blocks.py --checkpoint FLUX.1-dev/ --device cuda   # real weights

The seed publishes blocks for SD3 only. For each double block b the prompt's images are sampled twice from the
same noise, unguided and guided (the seed's first 30 % of steps) with b's maps alone (`generate_spatial_flow`'s
`blocks`), and three ratios are printed:

- `drop`: the guided run's final-step loss on b's maps over the unguided run's, minus one, averaged over images
  (how far guiding through b moves b's own layout; more negative is better);
- `holds`: the share of images whose relation holds in b's final maps, guided;
- `flops`: one guided pass through b (the forward with autograd up to b, the backward to the latent) over a plain
  transformer call of the same rows, in FLOPs (the tiny model's time is Python's per-op overhead).

The tiny model (no checkpoint) has Flux.1-dev's 19 double and 38 single blocks at a tiny width, with random
weights: its maps carry no meaning, so only `flops` speaks for a real model there; `drop` and `holds` show whether
any block stands out at random. A real checkpoint gives the measurement the pack's choice would rest on.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import tests.conftest  # noqa: E402,F401 - registers the pack as `multicond`
from benchmarks.measure import math_flops  # noqa: E402
from multicond.core.diffusers_binding import tiny_dit_pipeline  # noqa: E402
from multicond.core.diffusers_binding.cli import SPATIAL_PROMPT  # noqa: E402
from multicond.core.diffusers_binding.pipeline import load_checkpoint  # noqa: E402
from multicond.core.diffusers_binding.spatial_flow import (FlowGuidance, flow_object_tokens,  # noqa: E402
                                                           generate_spatial_flow, install_flow_spatial_maps)
from multicond.core.diffusers_binding.tiny import TINY_T5_TOKENS  # noqa: E402
from multicond.core.diffusers_binding.tiny_dit import tiny_flux_transformer  # noqa: E402
from multicond.core.spatial import SpatialSettings, joint_guidance_blocks, parse_relation  # noqa: E402

FLUX_DEV_DOUBLE, FLUX_DEV_SINGLE = 19, 38


def tiny_deep_flux(seed: int = 0):
    """The tiny Flux pipeline with a transformer as deep as Flux.1-dev's."""
    pipe = tiny_dit_pipeline("flux", seed)
    pipe.transformer = tiny_flux_transformer("dev", seed, FLUX_DEV_DOUBLE, FLUX_DEV_SINGLE)
    return pipe


def sample(pipe, block: int, weight: float, options: dict):
    words = parse_relation(SPATIAL_PROMPT)
    return generate_spatial_flow(pipe, SPATIAL_PROMPT, words.object_a, words.relation, words.object_b,
                                 SpatialSettings(relation=words.relation, weight=weight), blocks=([block], [block]),
                                 output_type="latent", **options)


def first_call(pipe, options: dict) -> dict:
    """The keyword inputs of the pipeline's first transformer call for these options."""
    seen: list[dict] = []
    hook = pipe.transformer.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs),
                                                      with_kwargs=True)
    try:
        sample(pipe, 0, 0.0, {**options, "steps": 1})
    finally:
        hook.remove()
    return seen[0]


def step_ratio(pipe, block: int, call: dict, tokens: tuple[list[int], list[int]]) -> float:
    """FLOPs of one guided pass through `block` (the forward, with autograd up to it, and the backward to the
    latent) over a plain call's: a timing of the tiny model would measure Python's per-op overhead."""
    transformer = pipe.transformer
    with install_flow_spatial_maps(transformer, True, ([block], [block])) as handle:
        guidance = FlowGuidance(pipe, handle, *tokens, SpatialSettings(), 1, {0}, True, losses=[None])
        guidance.grid = guidance.token_grid(call)
        with torch.no_grad():
            plain = math_flops(lambda: transformer(**call))
            guided = math_flops(lambda: guidance.guide(transformer, call, slice(None)))
    return guided / plain


def measure(pipe, block: int, options: dict, call: dict, tokens: tuple[list[int], list[int]]) -> tuple[float, ...]:
    """(drop, its standard error over the images, holds, flops) of block `block` alone, as the module's text says."""
    plain, guided = sample(pipe, block, 0.0, options), sample(pipe, block, 1000.0, options)
    drops = torch.tensor([after / before - 1 for after, before in zip(guided.losses[-1], plain.losses[-1])])
    error = float(drops.std() / len(drops) ** 0.5)
    return float(drops.mean()), error, sum(guided.holds) / len(guided.holds), step_ratio(pipe, block, call, tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="a diffusers Flux.1 folder (default: the tiny random model)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--size", type=int, default=128, help="image side in pixels")
    ns = parser.parse_args()
    if ns.checkpoint is None:
        torch.set_num_threads(1)
        pipe, text = tiny_deep_flux(), {"max_sequence_length": TINY_T5_TOKENS}
    else:
        dtype = torch.bfloat16 if ns.device.startswith("cuda") else torch.float32
        pipe, text = load_checkpoint(ns.checkpoint, "flux", ns.device, dtype), {}
    options = dict(steps=ns.steps, images=ns.images, height=ns.size, width=ns.size, **text)
    depth = pipe.transformer.config.num_layers
    early, late = joint_guidance_blocks(depth)
    print(f"{ns.checkpoint or 'tiny random Flux.1-dev-deep'}: {depth} double blocks, {ns.images} images, "
          f"{ns.steps} steps, {ns.size}px; the pack's blocks: early {list(early)}, late {list(late)}")
    call = first_call(pipe, options)
    words = parse_relation(SPATIAL_PROMPT)
    tokens_a = flow_object_tokens(pipe, SPATIAL_PROMPT, words.object_a, **text)
    tokens = (tokens_a, flow_object_tokens(pipe, SPATIAL_PROMPT, words.object_b, exclude=tokens_a, **text))
    print("block   drop (± s.e.)  holds  flops")
    drops, errors = [], []
    for block in range(depth):
        drop, error, holds, ratio = measure(pipe, block, options, call, tokens)
        drops.append(drop)
        errors.append(error)
        mark = " <- pack" if block in early + late else ""
        print(f"{block:5d} {drop:+6.3f} ± {error:5.3f}  {holds:5.2f}  x{ratio:.2f}{mark}")
    print(f"drop across blocks: {min(drops):+.3f} to {max(drops):+.3f}, spread {max(drops) - min(drops):.3f}; "
          f"median standard error {sorted(errors)[len(errors) // 2]:.3f}")

if __name__ == "__main__":
    main()
