"""EpsilonBlend and CrossAttnBlend over vanilla in a real ComfyUI: per-step time and peak memory.

    COMFYUI_PATH=/path/to/ComfyUI /path/to/comfy/python benchmarks/dual_style_comfyui.py
    COMFYUI_PATH=/path/to/ComfyUI /path/to/comfy/python benchmarks/dual_style_comfyui.py --dit  # SD3.5, Flux

Tiny SDXL-shaped UNet (tests/comfyui/tiny.py), one image with CFG, euler. EpsilonBlend runs 3 rows
(negative, first, second) where plain CFG runs 2: its floor is 1.5x. The original's step runs
4 rows ([uc, uc, c_left, c_right]); it is emulated with the negative given twice.

--dit: the tiny SD3.5-L-like model (2 joint blocks, benchmarks/comfy_setup.py's) with CFG 4, and the tiny
Flux-dev-like model (2 double + 2 single blocks, tests/comfyui/tiny_dit.py) at CFG 1 (no uncond rows, as Flux-dev
runs), 32x32 and 64x64 latents (256 and 1024 image tokens), 10 / 7 text tokens per prompt. EpsilonBlend: 3 rows
(SD3.5) or 2 rows (Flux) in one call, the floor a plain call of as many rows (timed too: first + second unblended).
CrossAttnBlend: each joint attention runs twice, once without each prompt's text (a split softmax); its FLOP
floor is vanilla plus the image queries' second pass (1 cond row per call: q·kᵀ and p·v over the image and the
second text's keys, in every joint attention). FLOPs are counted with math attention (benchmarks/measure.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import benchmarks.comfy_setup  # noqa: E402,F401 - ComfyUI first, then the pack

import torch  # noqa: E402

from benchmarks.comfy_setup import DIT_SIZES, dit_sample, tiny_sd35l  # noqa: E402
from benchmarks.measure import alternate, family_main, math_flops, peak_mib  # noqa: E402
from multicond.nodes.blend import CrossAttnBlend, EpsilonBlend  # noqa: E402
from tests.comfyui import tiny  # noqa: E402

STEPS = 4
PROFILE = dict(profile="sigmoid", direction="left to right", angle=0.0, center=0.5, ramp_width=1.0, mask=None)


def blended(model, first: list, second: list) -> tuple:
    """(EpsilonBlend's model and positive, CrossAttnBlend's model): the nodes at their defaults."""
    epsilon_model, epsilon_positive = EpsilonBlend.execute(model, first, second, sharpness=20.0,
                                                           weighting="complementary", **PROFILE).args
    return epsilon_model, epsilon_positive, CrossAttnBlend.execute(model, second, sharpness=30.0, **PROFILE).args[0]


def report(label: str, seconds: dict, memory: dict, flops: dict | None = None, floor: float | None = None) -> None:
    vanilla = next(iter(seconds))
    for name in seconds:
        line = (f"  {label}  {name:34s} {seconds[name] / STEPS * 1000:8.1f} ms/step  "
                f"x{seconds[name] / seconds[vanilla]:.2f} time  peak tensors {memory[name]:.1f} MiB "
                f"(x{memory[name] / memory[vanilla]:.2f})")
        if flops is not None:
            line += f"  FLOPs x{flops[name] / flops[vanilla]:.3f}"
            if name == "CrossAttnBlend":
                line += f" (floor x{floor:.3f})"
        print(line)


def unets(repeats: int) -> None:
    model = tiny.build("sdxl")
    first, second, negative = (tiny.conditioning("sdxl", seed) for seed in (1, 3, 2))
    epsilon_model, epsilon_positive, cross_model = blended(model, first, second)
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
        seconds = alternate(runs, repeats=repeats)
        memory = {name: peak_mib(run) for name, run in runs.items()}
        report(f"{height}x{width} latent", seconds, memory)


def dits(repeats: int) -> None:
    import comfyui_version

    from tests.comfyui import tiny_dit

    print(f"ComfyUI {comfyui_version.__version__}, tiny DiTs, 1 image, {STEPS} euler steps, PyTorch SDPA attention, "
          "1 thread; per step, ratios over vanilla")
    sd3 = tiny_sd35l()
    flux = tiny_dit.build_flux_weighted("dev")
    flux_config = tiny_dit.flux_transformer("dev").config
    families = (  # name, model, cfg, conditioning, text tokens, joint attentions, heads, head width
        ("SD3.5-L-like, CFG 4", sd3, 4.0, tiny_dit.conditioning, 10, 2, 2, 64),
        ("Flux-dev-like, CFG 1", flux, 1.0, tiny_dit.flux_conditioning, 7,
         flux_config.num_layers + flux_config.num_single_layers, flux_config.num_attention_heads,
         flux_config.attention_head_dim))
    for name, model, cfg, conditioning, text, layers, heads, head_dim in families:
        first, second, negative = (conditioning(seed, text) for seed in (1, 3, 2))
        epsilon_model, epsilon_positive, cross_model = blended(model, first, second)
        rows = 2 if cfg != 1.0 else 1  # at CFG 1 ComfyUI runs no uncond rows
        variants = {
            f"vanilla ({rows} rows)": (model, first),
            f"EpsilonBlend ({rows + 1} rows)": (epsilon_model, epsilon_positive),
            f"plain {rows + 1}-row call (the floor)": (model, first + second),
            "CrossAttnBlend": (cross_model, first),
        }
        print(f" {name}")
        for size in DIT_SIZES:
            runs = {label: (lambda m=m, p=p: dit_sample(m, p, negative, cfg, size, STEPS))
                    for label, (m, p) in variants.items()}
            seconds = alternate(runs, repeats=repeats)
            memory = {label: peak_mib(run) for label, run in runs.items()}
            flops = {label: math_flops(run) for label, run in runs.items()}
            image = (size // 2) ** 2
            # the image queries of the one cond row attend again, to the image and the second text's keys
            extra = STEPS * layers * heads * 2 * 2 * image * (image + text) * head_dim
            vanilla = next(iter(flops))
            report(f"{size}x{size} ({image} image tokens)", seconds, memory, flops,
                   (flops[vanilla] + extra) / flops[vanilla])


def main() -> None:
    family_main("EpsilonBlend and CrossAttnBlend over vanilla in a real ComfyUI.", unets, dits, 7)


if __name__ == "__main__":
    main()
