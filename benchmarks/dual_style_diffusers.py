"""Cost of one dual-style blend step over a plain CFG step, per UNet call.

    .venv/bin/python benchmarks/dual_style_diffusers.py

Tiny SDXL-shaped pipeline (core.diffusers_binding.tiny), one image with CFG (2 rows), one
thread; calls alternate between the variants so drift hits all alike. The epsilon blend runs 3
rows [uncond, cond_first, cond_second] in one call, so 1.5x is its floor for a UNet whose cost is
linear in rows (a plain 3-row call shows it); the original's 4-row call [uc, uc, c_L, c_R] is
timed as a plain 4-row call.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import tests.conftest  # noqa: E402,F401 - registers the pack as `multicond`
from benchmarks.measure import alternate, peak_mib  # noqa: E402
from multicond.core.diffusers_binding import (install_cross_attention_blend, install_epsilon_blend,  # noqa: E402
                                              tiny_pipeline)
from multicond.core.diffusers_binding.cli import DUAL_STYLE_PROMPTS  # noqa: E402
from multicond.core.diffusers_binding.pipeline import cfg_unet_inputs  # noqa: E402

FIRST, SECOND = DUAL_STYLE_PROMPTS


def main() -> None:
    torch.set_num_threads(1)
    print("diffusers, tiny SDXL-shaped UNet, 1 image with CFG (2 rows), 1 thread; ratios over a plain CFG step")
    plain, epsilon, cross = (tiny_pipeline("sdxl") for _ in range(3))
    install_epsilon_blend(epsilon, SECOND)
    install_cross_attention_blend(cross, SECOND)
    for size in (32, 64):
        inputs = cfg_unet_inputs(plain, FIRST, size * 8, size * 8)
        latents = torch.randn(2, 4, size, size, generator=torch.Generator().manual_seed(0))
        # Plain 3- and 4-row calls: [uncond, cond, cond(, cond)], the shapes of the blend and of the original.
        rows = {}
        for count in (3, 4):
            pick = [0, 1, 1, 1][:count]
            rows[count] = (latents[pick], {"encoder_hidden_states": inputs["encoder_hidden_states"][pick],
                                           "added_cond_kwargs": {key: value[pick] for key, value
                                                                 in inputs["added_cond_kwargs"].items()}})
        with torch.no_grad():
            runs = {"plain": lambda: plain.unet(latents, 500, **inputs),
                    "epsilon": lambda: epsilon.unet(latents, 500, **inputs),
                    "cross-attention": lambda: cross.unet(latents, 500, **inputs),
                    "plain 3 rows": lambda: plain.unet(rows[3][0], 500, **rows[3][1]),
                    "original 4 rows": lambda: plain.unet(rows[4][0], 500, **rows[4][1])}
            seconds = alternate(runs, repeats=9)
            memory = {name: peak_mib(run) for name, run in runs.items()}
        base = seconds["plain"]
        print(f"  {size}x{size} latent: plain {base * 1000:6.1f} ms/step, peak tensors {memory['plain']:.0f} MiB; "
              + "; ".join(f"{name} x{seconds[name] / base:.2f} ({memory[name]:.0f} MiB)"
                          for name in ("epsilon", "plain 3 rows", "cross-attention", "original 4 rows")))


if __name__ == "__main__":
    main()
