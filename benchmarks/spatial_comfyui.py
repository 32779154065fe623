"""SpatialGuidance over vanilla in a real ComfyUI: per-step time and peak memory.

    COMFYUI_PATH=/path/to/ComfyUI /path/to/comfy/python benchmarks/spatial_comfyui.py
    COMFYUI_PATH=/path/to/ComfyUI /path/to/comfy/python benchmarks/spatial_comfyui.py --dit  # SD3.5, Flux

Models built inside inference_mode as ComfyUI loads them (weights are inference tensors), one
image with CFG, euler, every step guided. "SD1.5-shaped" has SD1.5's four levels, two res blocks
per level and attention on the first three at 32 channels, so the guided decoder layers sit at
1/4 and 1/2 of the latent as in SD1.5 and the full-resolution decoder is off the gradient's path;
the test pack's SD1.5 (two levels) and SDXL models are timed too. The floor is about 2x: the
conditional rows' forward with autograd and its backward (input gradients only; attention's
backward costs about three forwards on a CPU), plus the unconditional forward.

--dit: the tiny SD3.5-L-like model (2 joint blocks, benchmarks/comfy_setup.py's, with the test pack's
SD3.5 CLIP-L) with CFG, and the test pack's tiny Flux-dev-like model (2 double + 2 single blocks, its T5
CLIP) at CFG 1 (no uncond rows), 32x32 and 64x64 latents (256 and 1024 image tokens), euler, every step
guided. With 2 joint blocks the measured block is block 0 at every step, so the backward runs through the
embedders and that block only; FLOPs are counted too (benchmarks/measure.py, math attention, backward included).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import benchmarks.comfy_setup  # noqa: E402,F401 - ComfyUI first, then the pack

import torch  # noqa: E402

from benchmarks.comfy_setup import DIT_SIZES, dit_sample, tiny_sd35l  # noqa: E402
from benchmarks.measure import alternate, family_main, math_flops, peak_mib  # noqa: E402
from multicond.nodes.spatial import FROM_PROMPT, SpatialGuidance  # noqa: E402
from tests.comfyui import tiny  # noqa: E402
from tests.comfyui.tiny_pack import FLUX_DEV, SD35, TinyCheckpoint  # noqa: E402

STEPS = 4
PROMPT = "a photo of a cat to the left of a dog"
GUIDED = "SpatialGuidance"


def sd15_shaped(clip_source: str = "sd15"):
    """An SD1.5-shaped tiny UNet and the test pack's tiny SD1.5 CLIP, loaded inside inference_mode."""
    with torch.inference_mode():
        model = tiny.build("sd15_shaped")
        _, clip, _ = TinyCheckpoint().load(clip_source, 0)
        return model, clip


def guide(model, clip):
    """The node at its defaults (every step guided): the guided model and its positive."""
    return SpatialGuidance.execute(model, clip, PROMPT, "", FROM_PROMPT, "", 1000.0, 0.0, 1.0, "gelu", 0.75, 0.25, 1.0,
                                   1.0, 1.0).args


def compare(name: str, model, guided, sample, sizes, repeats: int, flops: bool = False) -> None:
    """Vanilla and guided sampling alternated at each latent side; `sample(model, size)` runs one sampling."""
    for size in sizes:
        runs = {name: (lambda m=m: sample(m, size)) for name, m in (("vanilla", model), (GUIDED, guided))}
        seconds = alternate(runs, repeats=repeats)
        memory = {name: peak_mib(run) for name, run in runs.items()}
        line = (f"  {name} {size}x{size} latent: vanilla {seconds['vanilla'] / STEPS * 1000:6.1f} ms/step, guided "
                f"x{seconds[GUIDED] / seconds['vanilla']:.2f} time; peak tensors {memory['vanilla']:.1f} -> "
                f"{memory[GUIDED]:.1f} MiB (x{memory[GUIDED] / memory['vanilla']:.2f})")
        if flops:
            counted = {name: math_flops(run) for name, run in runs.items()}
            line += (f"; {counted['vanilla'] / STEPS / 1e9:.2f} GFLOP/step, guided "
                     f"x{counted[GUIDED] / counted['vanilla']:.2f} FLOPs")
        print(line)


def unets(repeats: int) -> None:
    import comfyui_version

    print(f"ComfyUI {comfyui_version.__version__}, 1 image with CFG, {STEPS} euler steps (all guided), PyTorch SDPA, 1 thread")
    for name, kind in (("SD1.5-shaped", "sd15"), ("test pack sd15", "sd15"), ("test pack sdxl", "sdxl")):
        with torch.inference_mode():
            model, clip = sd15_shaped() if name == "SD1.5-shaped" else TinyCheckpoint().load(kind, 0)[:2]
            negative = clip.encode_from_tokens_scheduled(clip.tokenize(""))
        guided, positive = guide(model, clip)
        compare(name, model, guided,
                lambda m, size: tiny.sample(m, kind, positive=positive, negative=negative,
                                            latent=torch.zeros(1, 4, size, size), steps=STEPS),
                (32, 64), repeats)


def dits(repeats: int) -> None:
    import comfyui_version

    print(f"ComfyUI {comfyui_version.__version__}, tiny DiTs, 1 image, {STEPS} euler steps (all guided), PyTorch SDPA, "
          "1 thread; 32x32 / 64x64 latents = 256 / 1024 image tokens")
    for name, family, cfg in (("SD3.5-L-like, CFG 4", SD35, 4.0), ("Flux-dev-like, CFG 1", FLUX_DEV, 1.0)):
        with torch.inference_mode():  # as ComfyUI's loaders run: the weights are inference tensors
            model, clip, _ = TinyCheckpoint().load(family, 0)
            if family == SD35:
                model = tiny_sd35l()  # the same weights with a position table that fits a 64x64 latent
            negative = clip.encode_from_tokens_scheduled(clip.tokenize(""))
        guided, positive = guide(model, clip)
        compare(name, model, guided, lambda m, size: dit_sample(m, positive, negative, cfg, size, STEPS), DIT_SIZES,
                repeats, flops=True)


def main() -> None:
    family_main("SpatialGuidance over vanilla in a real ComfyUI.", unets, dits, 5)


if __name__ == "__main__":
    main()
