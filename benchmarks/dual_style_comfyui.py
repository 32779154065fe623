"""EpsilonBlend and CrossAttnBlend over vanilla in a real ComfyUI: per-step time and peak memory.

    COMFYUI_PATH=/path/to/ComfyUI /path/to/comfy/python benchmarks/dual_style_comfyui.py

Tiny SDXL-shaped UNet (tests/comfyui/tiny.py), one image with CFG, euler. EpsilonBlend runs 3 rows
(negative, first, second) where plain CFG runs 2: its floor is 1.5x. The original's step runs
4 rows ([uc, uc, c_left, c_right]); it is emulated with the negative given twice.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import benchmarks.comfy_setup  # noqa: E402,F401 - ComfyUI first, then the pack

import torch  # noqa: E402

from benchmarks.measure import alternate, peak_mib  # noqa: E402
from multicond.nodes.blend import CrossAttnBlend, EpsilonBlend  # noqa: E402
from tests.comfyui import tiny  # noqa: E402

STEPS = 4
PROFILE = dict(profile="sigmoid", direction="left to right", angle=0.0, center=0.5, ramp_width=1.0, mask=None)


def main() -> None:
    torch.set_num_threads(1)  # steady timings on a shared machine
    model = tiny.build("sdxl")
    first, second, negative = (tiny.conditioning("sdxl", seed) for seed in (1, 3, 2))
    epsilon_model, epsilon_positive = EpsilonBlend.execute(model, first, second, sharpness=20.0, weighting="complementary",
                                                           **PROFILE).args
    cross_model = CrossAttnBlend.execute(model, second, sharpness=30.0, **PROFILE).args[0]
    variants = {
        "vanilla (2 rows)": (model, first, negative),
        "EpsilonBlend (3 rows)": (epsilon_model, epsilon_positive, negative),
        "original epsilon step (4 rows)": (model, first + second, negative + negative),
        "CrossAttnBlend": (cross_model, first, negative),
    }
    import comfyui_version

    print(f"ComfyUI {comfyui_version.__version__}, tiny SDXL-shaped UNet, 1 image with CFG, {STEPS} euler steps, "
          "PyTorch SDPA attention, 1 thread")
    for height, width in ((32, 32), (64, 64), (64, 96)):
        latent = torch.zeros(1, 4, height, width)
        runs = {name: (lambda m=m, p=p, n=n: tiny.sample(m, "sdxl", positive=p, negative=n, latent=latent, steps=STEPS))
                for name, (m, p, n) in variants.items()}
        seconds = alternate(runs, repeats=7)
        memory = {name: peak_mib(run) for name, run in runs.items()}
        vanilla = next(iter(variants))
        for name in variants:
            print(f"  {height}x{width} latent  {name:32s} {seconds[name] / STEPS * 1000:8.1f} ms/step  "
                  f"x{seconds[name] / seconds[vanilla]:.2f} time  peak tensors {memory[name]:.0f} MiB "
                  f"(x{memory[name] / memory[vanilla]:.2f})")


if __name__ == "__main__":
    main()
