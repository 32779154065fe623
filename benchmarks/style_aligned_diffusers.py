"""StyleAligned on diffusers: ours and the paper's formulation over vanilla, per UNet step.

    .venv/bin/python benchmarks/style_aligned_diffusers.py

Tiny SDXL-shaped UNet (core.diffusers_binding.tiny), batch 1 reference + 3 targets with CFG
(8 rows), one thread; calls alternate between the variants so drift hits all alike.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import tests.conftest  # noqa: E402,F401 - registers the pack as `multicond`
from benchmarks.measure import alternate, alternate_rounds, paired_cost, peak_mib  # noqa: E402
from multicond.core.diffusers_binding import install_style_aligned, tiny_unet  # noqa: E402
from multicond.core.style import StyleAlignedArgs  # noqa: E402
from tests.paper_style_aligned import paper_unet  # noqa: E402

ROWS = 8


def inputs(unet, size: int) -> tuple[torch.Tensor, dict]:
    g = torch.Generator().manual_seed(0)
    config = unet.config
    kwargs = {"encoder_hidden_states": torch.randn(ROWS, 77, config.cross_attention_dim, generator=g)}
    if config.addition_embed_type == "text_time":
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(ROWS, pooled, generator=g),
                                       "time_ids": torch.tensor([[size * 8, size * 8, 0, 0, size * 8, size * 8]] * ROWS, dtype=torch.float32)}
    return torch.randn(ROWS, 4, size, size, generator=g), kwargs


def main() -> None:
    torch.set_num_threads(1)
    print("diffusers, tiny SDXL-shaped UNet, batch 1+3 with CFG (8 rows), 1 thread; ratios over vanilla")
    for args_name, args in (("paper defaults", StyleAlignedArgs()), ("SDXL demo (no shared GroupNorm)", StyleAlignedArgs(share_group_norm=False))):
        for size in (32, 64):
            vanilla = tiny_unet("sdxl")
            ours = tiny_unet("sdxl")
            install_style_aligned(ours, args)
            paper = paper_unet(tiny_unet("sdxl"), args)
            latents, kwargs = inputs(vanilla, size)
            with torch.no_grad():
                runs = {name: (lambda u=u: u(latents, 500, **kwargs)) for name, u in
                        (("vanilla", vanilla), ("ours", ours), ("paper", paper))}
                seconds = alternate(runs, repeats=9)
                memory = {name: peak_mib(run) for name, run in runs.items()}
            print(f"  {args_name:32s} {size}x{size}: vanilla {seconds['vanilla'] * 1000:6.1f} ms/step; "
                  f"ours x{seconds['ours'] / seconds['vanilla']:.2f}, paper x{seconds['paper'] / seconds['vanilla']:.2f}, "
                  f"ours/paper x{seconds['ours'] / seconds['paper']:.2f}; peak tensors {memory['vanilla']:.0f} MiB, "
                  f"ours {memory['ours']:.0f} MiB, paper {memory['paper']:.0f} MiB")

    print("shared GroupNorm's own cost: ours with and without it, alternated in one group (median of paired rounds)")
    for size in (32, 64):
        models = {"vanilla": tiny_unet("sdxl"), "with": tiny_unet("sdxl"), "without": tiny_unet("sdxl")}
        install_style_aligned(models["with"], StyleAlignedArgs())
        install_style_aligned(models["without"], StyleAlignedArgs(share_group_norm=False))
        latents, kwargs = inputs(models["vanilla"], size)
        with torch.no_grad():
            rounds = alternate_rounds({name: (lambda u=u: u(latents, 500, **kwargs)) for name, u in models.items()},
                                      repeats=15)
        print(f"  {size}x{size}: shared GroupNorm adds {paired_cost(rounds, 'with', 'without', 'vanilla'):+.3f}x of a "
              "vanilla step")


if __name__ == "__main__":
    main()
