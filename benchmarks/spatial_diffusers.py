"""Cost of one InfSplign guided step over a plain CFG step, per image.

    .venv/bin/python benchmarks/spatial_diffusers.py

Tiny SD1.5-shaped (four levels, as SD1.5), three-level SD1.5 (its full-resolution decoder
guided) and SDXL-shaped pipelines (core.diffusers_binding.tiny), one image with CFG,
one thread; calls alternate between the variants so drift hits all alike. A plain step is one
2-row [uncond, cond] UNet call. A guided step (`SpatialGuidance.guided`) runs the uncond row
without gradients and the cond row with them, then the backward to the latent: about 2x a plain
step is its floor for a UNet whose backward costs twice its forward. The original's step (one
2-row call with gradients, the backward through both rows) is timed too.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import tests.conftest  # noqa: E402,F401 - registers the pack as `multicond`
from benchmarks.measure import alternate, peak_mib  # noqa: E402
from multicond.core.diffusers_binding import SpatialGuidance, install_spatial_maps, tiny_pipeline  # noqa: E402
from multicond.core.diffusers_binding.tiny import tiny_sd1_four_level_unet  # noqa: E402
from multicond.core.diffusers_binding.cli import SPATIAL_PROMPT  # noqa: E402
from multicond.core.diffusers_binding.spatial import frozen_weights  # noqa: E402
from multicond.core.spatial import SpatialSettings, guidance_loss, parse_relation  # noqa: E402


def main() -> None:
    torch.set_num_threads(1)
    print("diffusers, 1 image with CFG, 1 thread; time and peak tensor memory over a plain CFG step (2-row UNet call)")
    words = parse_relation(SPATIAL_PROMPT)
    settings = SpatialSettings(relation=words.relation)
    for family, label in (("sd1", "SD1.5-shaped (four levels)"), ("sd1", "three-level SD1.5"), ("sdxl", "SDXL-shaped")):
        pipe = tiny_pipeline(family)
        if label.startswith("SD1.5-shaped"):  # the guided decoder layers at 1/4 and 1/2 of the latent, as SD1.5
            pipe.unet = tiny_sd1_four_level_unet()
        pipe.scheduler.set_timesteps(50)
        t = pipe.scheduler.timesteps[10]
        handle = install_spatial_maps(pipe)
        for size in (32, 64):
            guidance = SpatialGuidance.build(pipe, handle, SPATIAL_PROMPT, words.object_a, words.object_b, settings,
                                             images=1, height=size * 8, width=size * 8)
            latents = torch.randn(1, 4, size, size, generator=torch.Generator().manual_seed(0))

            def original() -> torch.Tensor:
                """The original's step: [uncond, cond] in one call with gradients, maps of the cond row."""
                with frozen_weights(pipe.unet), torch.enable_grad():
                    x = latents.detach().requires_grad_()
                    with handle.recorder.recording(slice(1, 2)) as maps:
                        noise = pipe.unet(torch.cat([x] * 2), t, **guidance.both, return_dict=False)[0]
                    loss = guidance_loss(handle.layers(maps), guidance.tokens_a, guidance.tokens_b, settings)
                    (grad,) = torch.autograd.grad(loss.sum(), x)
                return guidance.cfg(*noise.detach().chunk(2)) + settings.weight * grad

            runs = {"plain": lambda: guidance.plain(latents, t)[0], "guided": lambda: guidance.guided(latents, t)[0],
                    "original 2-row grad": original}
            seconds = alternate(runs, repeats=7)
            memory = {name: peak_mib(run) for name, run in runs.items()}
            base = seconds["plain"]
            print(f"  {label} {size}x{size} latent: plain {base * 1000:6.1f} ms/step, peak tensors {memory['plain']:.0f} MiB; "
                  + "; ".join(f"{name} x{seconds[name] / base:.2f} time, x{memory[name] / memory['plain']:.1f} memory "
                              f"({memory[name]:.0f} MiB)" for name in ("guided", "original 2-row grad")))
        handle.remove()


if __name__ == "__main__":
    main()
