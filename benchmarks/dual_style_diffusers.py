"""Cost of one dual-style blend step over a plain CFG step, per UNet (or, with --dit, transformer) call.

    .venv/bin/python benchmarks/dual_style_diffusers.py
    .venv/bin/python benchmarks/dual_style_diffusers.py --dit  # tiny SD3.5 and Flux-dev pipelines

Tiny SDXL-shaped pipeline (core.diffusers_binding.tiny), one image with CFG (2 rows), one
thread; calls alternate between the variants so drift hits all alike. The epsilon blend runs 3
rows [uncond, cond_first, cond_second] in one call, so 1.5x is its floor for a UNet whose cost is
linear in rows (a plain 3-row call shows it); the original's 4-row call [uc, uc, c_L, c_R] is
timed as a plain 4-row call.

--dit: tiny_dit_pipeline's SD3.5 with benchmarks/style_aligned_dit.py's SD3.5-L-like transformer (2 joint blocks,
a 32x32 position table) under CFG 4 ([uncond, cond]), and its Flux-dev (2 double + 2 single blocks) with guidance
embedded (1 row, no uncond), 32x32 and 64x64 latents (256 and 1024 image tokens), prompts encoded by the pipeline
with max_sequence_length 64 (SD3: 77 CLIP + 64 T5 = 141 text tokens, Flux: 64). One transformer call, its forward
hooks included. Epsilon blend (`install_flow_epsilon_blend`): 3 (SD3) or 2 (Flux) rows in one call, the floor a
plain call of as many rows (timed: the second prompt's cond row appended, unblended). Cross-attention blend
(`install_flow_cross_attention_blend`): every joint attention runs twice, once without each prompt's text; its FLOP
floor, as benchmarks/dual_style_comfyui.py's, is the plain call plus the image queries' second pass of the cond row
(q·kᵀ and p·v over the image and the second text's keys) in every joint attention. FLOPs are counted with math
attention (benchmarks/measure.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import tests.conftest  # noqa: E402,F401 - registers the pack as `multicond`
from benchmarks.measure import alternate, family_main, math_flops, peak_mib  # noqa: E402
from multicond.core.diffusers_binding import (install_cross_attention_blend, install_epsilon_blend,  # noqa: E402
                                              tiny_pipeline)
from multicond.core.diffusers_binding.cli import DUAL_STYLE_PROMPTS  # noqa: E402
from multicond.core.diffusers_binding.pipeline import cfg_unet_inputs  # noqa: E402

FIRST, SECOND = DUAL_STYLE_PROMPTS
DIT_SIZES = (32, 64)  # latent sides: 256 and 1024 image tokens (patch 2), as the ComfyUI --dit benchmarks
T5_TOKENS = 64  # max_sequence_length (core.diffusers_binding.tiny.TINY_T5_TOKENS, the CLI's for the tiny DiTs)
SD3_CFG, FLUX_GUIDANCE = 4.0, 3.5
BATCHED = ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "guidance")  # per-row inputs


def unets(repeats: int) -> None:
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
            seconds = alternate(runs, repeats=repeats)
            memory = {name: peak_mib(run) for name, run in runs.items()}
        base = seconds["plain"]
        print(f"  {size}x{size} latent: plain {base * 1000:6.1f} ms/step, peak tensors {memory['plain']:.0f} MiB; "
              + "; ".join(f"{name} x{seconds[name] / base:.2f} ({memory[name]:.0f} MiB)"
                          for name in ("epsilon", "plain 3 rows", "cross-attention", "original 4 rows")))


# ---------------------------------------------------------------- --dit


def dit_pipeline(family: str):
    """tiny_dit_pipeline(family); SD3 with the SD3.5-L-like transformer whose position table fits a 64x64 latent,
    and its CFG on (the blends and the spatial guidance read [uncond, cond] from the pipeline's CFG flag)."""
    from multicond.core.diffusers_binding import tiny_dit_pipeline

    pipe = tiny_dit_pipeline(family)
    if family == "sd3":
        from benchmarks.style_aligned_dit import sd3_transformer

        pipe.transformer = sd3_transformer()
        pipe._guidance_scale = SD3_CFG
    return pipe


@torch.no_grad()
def dit_call(pipe, prompt: str, size: int) -> dict[str, torch.Tensor]:
    """The keyword inputs of the pipeline's transformer call for one image of `prompt` on a `size`² latent at σ 0.7:
    SD3 [uncond (the empty prompt), cond], Flux-dev one row with its guidance embedded."""
    noise = torch.randn(1, 16, size, size, generator=torch.Generator().manual_seed(0))
    if type(pipe).__name__ != "FluxPipeline":
        cond, uncond, pooled, uncond_pooled = pipe.encode_prompt(prompt, None, None, do_classifier_free_guidance=True,
                                                                 max_sequence_length=T5_TOKENS)
        return {"hidden_states": torch.cat([noise, noise]), "encoder_hidden_states": torch.cat([uncond, cond]),
                "pooled_projections": torch.cat([uncond_pooled, pooled]), "timestep": torch.full((2,), 700.0)}
    from multicond.core.diffusers_binding.flow_pipeline import pack

    context, pooled, text_ids = pipe.encode_prompt(prompt, None, max_sequence_length=T5_TOKENS)
    return {"hidden_states": pack(noise), "encoder_hidden_states": context, "pooled_projections": pooled,
            "timestep": torch.full((1,), 0.7), "guidance": torch.full((1,), FLUX_GUIDANCE), "txt_ids": text_ids,
            "img_ids": pipe._prepare_latent_image_ids(1, size // 2, size // 2, "cpu", torch.float32)}


def with_second_row(first: dict, second: dict) -> dict:
    """The plain call grown by the second prompt's cond row (the last), unblended: the epsilon blend's rows."""
    return {key: torch.cat([value, second[key][-1:]]) if key in BATCHED else value for key, value in first.items()}


def step(pipe, inputs: dict):
    """One transformer call as a sampling step makes it. Each call is a new scheduler step: at a step it has seen,
    a Flux blend takes the call for true CFG's negative one and leaves it alone."""
    def run() -> torch.Tensor:
        pipe.scheduler._step_index = (pipe.scheduler._step_index or 0) + 1
        return pipe.transformer(**inputs, return_dict=False)[0]
    return run


def blend_floor(transformer, flops: int, size: int, second_tokens: int) -> float:
    """(plain FLOPs + the cond row's image queries attending again to the image and second-text keys) / plain."""
    config = transformer.config
    layers = config.num_layers + getattr(config, "num_single_layers", 0)  # Flux's single blocks attend jointly too
    image = (size // 2) ** 2
    extra = layers * config.num_attention_heads * 2 * 2 * image * (image + second_tokens) * config.attention_head_dim
    return (flops + extra) / flops


def dit_family(family: str, label: str, repeats: int) -> None:
    from multicond.core.diffusers_binding.dual_style_flow import (install_flow_cross_attention_blend,
                                                                   install_flow_epsilon_blend)

    plain, epsilon, cross = (dit_pipeline(family) for _ in range(3))
    install_flow_epsilon_blend(epsilon, SECOND, max_sequence_length=T5_TOKENS)
    install_flow_cross_attention_blend(cross, SECOND, max_sequence_length=T5_TOKENS)
    print(f" {label}")
    for size in DIT_SIZES:
        inputs, second = dit_call(plain, FIRST, size), dit_call(plain, SECOND, size)
        rows = inputs["hidden_states"].shape[0]
        runs = {f"plain ({rows} rows)": step(plain, inputs), f"epsilon blend ({rows + 1} rows)": step(epsilon, inputs),
                f"plain {rows + 1}-row call (the floor)": step(plain, with_second_row(inputs, second)),
                "cross-attention blend": step(cross, inputs)}
        with torch.no_grad():
            seconds = alternate(runs, repeats)
            memory = {name: peak_mib(run) for name, run in runs.items()}
        flops = {name: math_flops(run) for name, run in runs.items()}
        base = next(iter(runs))
        text = inputs["encoder_hidden_states"].shape[1]
        print(f"  {size}x{size} latent ({(size // 2) ** 2} image, {text} text tokens): plain "
              f"{seconds[base] * 1000:.1f} ms/step, peak tensors {memory[base]:.1f} MiB, "
              f"{flops[base] / 1e9:.2f} GFLOP")
        for name in list(runs)[1:]:
            line = (f"    {name:32s} time x{seconds[name] / seconds[base]:.2f}  peak tensors x"
                    f"{memory[name] / memory[base]:.2f} ({memory[name]:.1f} MiB)  "
                    f"FLOPs x{flops[name] / flops[base]:.3f}")
            if name == "cross-attention blend":
                line += f" (floor x{blend_floor(plain.transformer, flops[base], size, text):.3f})"
            print(line)


def dits(repeats: int) -> None:
    print("diffusers, tiny DiT pipelines, 1 image, one transformer call per step, 1 thread; ratios over a plain step")
    dit_family("sd3", "SD3.5-L-like, CFG 4 [uncond, cond]", repeats)
    dit_family("flux", "Flux-dev-like, guidance embedded (1 row)", repeats)


def main() -> None:
    family_main("Dual-style blends over a plain step, diffusers.", unets, dits, 9)


if __name__ == "__main__":
    main()
