"""Cost of one InfSplign guided step over a plain CFG step, per image.

    .venv/bin/python benchmarks/spatial_diffusers.py
    .venv/bin/python benchmarks/spatial_diffusers.py --dit  # tiny SD3.5 and Flux-dev pipelines

Tiny SD1.5-shaped (four levels, as SD1.5), three-level SD1.5 (its full-resolution decoder
guided) and SDXL-shaped pipelines (core.diffusers_binding.tiny), one image with CFG,
one thread; calls alternate between the variants so drift hits all alike. A plain step is one
2-row [uncond, cond] UNet call. A guided step (`SpatialGuidance.guided`) runs the uncond row
without gradients and the cond row with them, then the backward to the latent: about 2x a plain
step is its floor for a UNet whose backward costs twice its forward. The original's step (one
2-row call with gradients, the backward through both rows) is timed too.

--dit: the pipelines of benchmarks/dual_style_diffusers.py --dit (SD3.5-L-like, 2 joint blocks, CFG 4; Flux-dev-like,
2 double + 2 single blocks, 1 row), 32x32 and 64x64 latents (256 and 1024 image tokens), the prompt encoded with
max_sequence_length 64. A plain step is the pipeline's transformer call (SD3 [uncond, cond], Flux 1 row); a guided
step is `FlowGuidance.guide` (spatial_flow.py: the cond rows once more with autograd up to the measured block, its
maps recorded by `install_flow_spatial_maps`'s processors, the loss and its backward to the latent) followed by that
call, as the pipeline's pre-hook runs it (block 0 measured at a 2-block depth, as in the ComfyUI --dit benchmark).
FLOPs are counted with the backward (benchmarks/measure.py). The log-sum-exp share: the guided step once more with
the maps' softmax normaliser (core/spatial.py `_row_logsumexp`: the q·kᵀ of each image query over all keys and its
log-sum-exp, recomputed by its checkpoint in the backward) replaced by a near-free stand-in; (guided - that) / guided,
the median over the alternated rounds (and the share of the guided step's counted FLOPs it removes).
"""

from __future__ import annotations

import statistics
import sys
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import tests.conftest  # noqa: E402,F401 - registers the pack as `multicond`
from benchmarks.measure import alternate, alternate_rounds, family_main, math_flops, paired_cost, peak_mib  # noqa: E402
from multicond.core.diffusers_binding import SpatialGuidance, install_spatial_maps, tiny_pipeline  # noqa: E402
from multicond.core.diffusers_binding.tiny import tiny_sd1_four_level_unet  # noqa: E402
from multicond.core.diffusers_binding.cli import SPATIAL_PROMPT  # noqa: E402
from multicond.core.diffusers_binding.spatial import frozen_weights  # noqa: E402
from multicond.core.spatial import SpatialSettings, guidance_loss, parse_relation  # noqa: E402


def unets(repeats: int) -> None:
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
            seconds = alternate(runs, repeats=repeats)
            memory = {name: peak_mib(run) for name, run in runs.items()}
            base = seconds["plain"]
            print(f"  {label} {size}x{size} latent: plain {base * 1000:6.1f} ms/step, peak tensors {memory['plain']:.0f} MiB; "
                  + "; ".join(f"{name} x{seconds[name] / base:.2f} time, x{memory[name] / memory['plain']:.1f} memory "
                              f"({memory[name]:.0f} MiB)" for name in ("guided", "original 2-row grad")))
        handle.remove()


# ---------------------------------------------------------------- --dit


@contextmanager
def cheap_normaliser():
    """core.spatial's per-chunk log-sum-exp over all keys replaced by a stand-in of the same shape that keeps a
    gradient path to q (so the checkpoint and the rest of the graph run as before) and costs next to nothing."""
    import multicond.core.spatial as core_spatial

    original = core_spatial._row_logsumexp
    core_spatial._row_logsumexp = lambda q, k, scale: q[..., 0] * 0.0
    try:
        yield
    finally:
        core_spatial._row_logsumexp = original


def flow_guidance(pipe, flux: bool, inputs: dict):
    """A `FlowGuidance` on the pipeline's transformer (its map processors installed), at a guided early step."""
    from benchmarks.dual_style_diffusers import T5_TOKENS
    from multicond.core.diffusers_binding.spatial_flow import (FlowGuidance, flow_object_tokens,
                                                               install_flow_spatial_maps)

    words = parse_relation(SPATIAL_PROMPT)
    tokens_a = flow_object_tokens(pipe, SPATIAL_PROMPT, words.object_a, max_sequence_length=T5_TOKENS)
    tokens_b = flow_object_tokens(pipe, SPATIAL_PROMPT, words.object_b, tokens_a, max_sequence_length=T5_TOKENS)
    handle = install_flow_spatial_maps(pipe.transformer, flux)
    steps = 28  # the pipelines' default; step 0 is guided and measures the early blocks
    guidance = FlowGuidance(pipe, handle, tokens_a, tokens_b, SpatialSettings(relation=words.relation), steps, {0},
                            flux, losses=[None] * steps)
    guidance.grid = guidance.token_grid(inputs)
    return guidance


def dit_family(family: str, label: str, repeats: int) -> None:
    from benchmarks.dual_style_diffusers import DIT_SIZES, dit_call, dit_pipeline

    pipe = dit_pipeline(family)
    transformer, flux = pipe.transformer, family == "flux"
    print(f" {label}")
    for size in DIT_SIZES:
        inputs = dit_call(pipe, SPATIAL_PROMPT, size)
        guidance = flow_guidance(pipe, flux, inputs)
        rows = guidance.cond_rows(inputs["hidden_states"].shape[0])

        def plain() -> torch.Tensor:
            return transformer(**inputs, return_dict=False)[0]

        def guided() -> torch.Tensor:
            guidance.guide(transformer, inputs, rows)
            return plain()

        def guided_cheap_normaliser() -> torch.Tensor:
            with cheap_normaliser():
                return guided()

        runs = {"plain": plain, "guided": guided, "guided, log-sum-exp stand-in": guided_cheap_normaliser}
        with torch.no_grad():
            rounds = alternate_rounds(runs, repeats)
            memory = {name: peak_mib(run) for name, run in runs.items()}
        seconds = {name: statistics.median(values) for name, values in rounds.items()}
        flops = {name: math_flops(run) for name, run in runs.items()}
        guidance.handle.remove()
        text = inputs["encoder_hidden_states"].shape[1]
        share = paired_cost(rounds, "guided", "guided, log-sum-exp stand-in", "guided")  # median of paired rounds
        print(f"  {size}x{size} latent ({(size // 2) ** 2} image, {text} text tokens): plain "
              f"{seconds['plain'] * 1000:.1f} ms/step, {flops['plain'] / 1e9:.2f} GFLOP; guided "
              f"x{seconds['guided'] / seconds['plain']:.2f} time, x{flops['guided'] / flops['plain']:.2f} FLOPs; "
              f"peak tensors {memory['plain']:.1f} -> {memory['guided']:.1f} MiB "
              f"(x{memory['guided'] / memory['plain']:.2f})")
        cheap = "guided, log-sum-exp stand-in"
        print(f"    maps' log-sum-exp: {share:.2f} of the guided step's time, {1 - flops[cheap] / flops['guided']:.2f} "
              f"of its FLOPs (with the stand-in x{seconds[cheap] / seconds['plain']:.2f} time, peak tensors "
              f"{memory[cheap]:.1f} MiB)")


def dits(repeats: int) -> None:
    print("diffusers, tiny DiT pipelines, 1 image, every step guided, 1 thread; a guided step over a plain step")
    dit_family("sd3", "SD3.5-L-like, CFG 4 [uncond, cond]", repeats)
    dit_family("flux", "Flux-dev-like, guidance embedded (1 row)", repeats)


def main() -> None:
    family_main("InfSplign guided step over a plain step, diffusers.", unets, dits, 7)


if __name__ == "__main__":
    main()
