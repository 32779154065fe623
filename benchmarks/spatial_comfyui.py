"""SpatialGuidance over vanilla in a real ComfyUI: per-step time and peak memory.

    COMFYUI_PATH=/path/to/ComfyUI /path/to/comfy/python benchmarks/spatial_comfyui.py

Models built inside inference_mode as ComfyUI loads them (weights are inference tensors), one
image with CFG, euler, every step guided. "SD1.5-shaped" has SD1.5's four levels, two res blocks
per level and attention on the first three at 32 channels, so the guided decoder layers sit at
1/4 and 1/2 of the latent as in SD1.5 and the full-resolution decoder is off the gradient's path;
the test pack's SD1.5 (two levels) and SDXL models are timed too. The floor is about 2x: the
conditional rows' forward with autograd and its backward (input gradients only; attention's
backward costs about three forwards on a CPU), plus the unconditional forward.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import benchmarks.comfy_setup  # noqa: E402,F401 - ComfyUI first, then the pack

import torch  # noqa: E402

from benchmarks.measure import alternate, peak_mib  # noqa: E402
from multicond.nodes.spatial import FROM_PROMPT, SpatialGuidance  # noqa: E402
from tests.comfyui import tiny  # noqa: E402
from tests.comfyui.tiny_pack import TinyCheckpoint  # noqa: E402

STEPS = 4
PROMPT = "a photo of a cat to the left of a dog"


def sd15_shaped(clip_source: str = "sd15"):
    """An SD1.5-shaped tiny UNet and the test pack's tiny SD1.5 CLIP, loaded inside inference_mode."""
    with torch.inference_mode():
        model = tiny.build("sd15_shaped")
        _, clip, _ = TinyCheckpoint().load(clip_source, 0)
        return model, clip


def main() -> None:
    torch.set_num_threads(1)  # steady timings on a shared machine
    import comfyui_version

    print(f"ComfyUI {comfyui_version.__version__}, 1 image with CFG, {STEPS} euler steps (all guided), PyTorch SDPA, 1 thread")
    for name, kind in (("SD1.5-shaped", "sd15"), ("test pack sd15", "sd15"), ("test pack sdxl", "sdxl")):
        with torch.inference_mode():
            model, clip = sd15_shaped() if name == "SD1.5-shaped" else TinyCheckpoint().load(kind, 0)[:2]
            negative = clip.encode_from_tokens_scheduled(clip.tokenize(""))
        guided, positive = SpatialGuidance.execute(model, clip, PROMPT, "", FROM_PROMPT, "", 1000.0, 0.0, 1.0, "gelu", 0.75,
                                                   0.25, 1.0, 1.0, 1.0).args
        for size in (32, 64):
            latent = torch.zeros(1, 4, size, size)
            runs = {name: (lambda m=m: tiny.sample(m, kind, positive=positive, negative=negative, latent=latent, steps=STEPS))
                    for name, m in (("vanilla", model), ("SpatialGuidance", guided))}
            seconds = alternate(runs, repeats=5)
            memory = {name: peak_mib(run) for name, run in runs.items()}
            print(f"  {name} {size}x{size} latent: vanilla {seconds['vanilla'] / STEPS * 1000:6.1f} ms/step, guided "
                  f"x{seconds['SpatialGuidance'] / seconds['vanilla']:.2f} time; peak tensors {memory['vanilla']:.0f} -> "
                  f"{memory['SpatialGuidance']:.0f} MiB (x{memory['SpatialGuidance'] / memory['vanilla']:.2f})")


if __name__ == "__main__":
    main()
