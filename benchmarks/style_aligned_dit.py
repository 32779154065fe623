"""StyleAligned on the DiTs (SD3.5, Flux) over vanilla: per-step time, peak tensor memory and the FLOP floor.

    .venv/bin/python benchmarks/style_aligned_dit.py  # diffusers
    COMFYUI_PATH=/path/to/ComfyUI /path/to/comfy/python benchmarks/style_aligned_dit.py --comfyui  # the nodes

diffusers: the tiny SD3.5-Large-like transformer (2 joint blocks, core.diffusers_binding.tiny_dit, with a
position table wide enough for a 64x64 latent) on CB35's batch [uncond ref, uncond target, cond ref, cond
target], ours (reference isolated, and CB35's layout) against the re-statement of CB35's processor
(tests/paper_cb35.py) on every joint layer; the tiny Flux-dev-like transformer (2 double + 2 single blocks)
on 1 reference + 3 targets without CFG rows (FluxPipeline's call), ours with AlignedGen's defaults against
its re-statement (tests/paper_alignedgen.py) on the single blocks. One process, one thread, the variants
alternated so drift hits all alike.

ComfyUI (--comfyui, a ComfyUI Python with COMFYUI_PATH): the same SD3.5 weights loaded by ComfyUI, Shared
Attention + AdaIN Style (defaults) and with Layer Balance (a random CB35-format grading, lambda_s 1 of the 2
layers per step: its FLOP floor is half the extra) over vanilla, 1 reference + 1 target with CFG, euler; the
same Flux-dev weights loaded by ComfyUI (tests/comfyui/tiny_dit.py), Shared Attention + AdaIN Style (defaults:
the single blocks) over vanilla, 1 reference + 3 targets at CFG 1 (no uncond rows, as Flux-dev is run), euler.

FLOPs are counted by PyTorch's FlopCounterMode with math attention. FLOP floor: vanilla's FLOPs plus the least
that sharing needs: every query of a target row (image and text tokens) against the reference's image keys, in
each styled layer; the reference rows need no extra keys. AdaIN's statistics are O(tokens) and left out.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

SIZES = (32, 64)  # latent sides: 256 and 1024 image tokens (patch 2)
SD3_TEXT, FLUX_TEXT = 10, 7  # text tokens of the tiny inputs
REPEATS = 9


def sd3_transformer():
    """The tiny SD3.5-L-like transformer with a 32x32 position table (a 64x64 latent; tests use 16)."""
    from diffusers import SD3Transformer2DModel

    from multicond.core.diffusers_binding.tiny_dit import _randomized, tiny_sd3_config

    return _randomized(SD3Transformer2DModel(**dict(tiny_sd3_config("sd35l"), pos_embed_max_size=32)), 0)


def counted_flops(run) -> int:
    """FLOPs of `run` as PyTorch's counter sees them, attention through its math kernel (matmuls it can count)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad():
        run()
    return counter.get_total_flops()


def floor(vanilla: int, layers: int, heads: int, head_dim: int, image: int, text: int, targets: int,
          calls: int = 1) -> float:
    """(vanilla + the extra scores and weighted values of the target rows in `calls` model calls) / vanilla."""
    extra = layers * targets * heads * 2 * 2 * (image + text) * image * head_dim  # q·kᵀ and p·v, 2 FLOPs a MAC
    return (vanilla + calls * extra) / vanilla


def timed(runs: dict, repeats: int = REPEATS) -> tuple[dict[str, float], dict[str, float], dict[str, int]]:
    """Median seconds (alternated), peak tensor MiB and counted FLOPs of each run."""
    from benchmarks.measure import alternate, peak_mib

    with torch.no_grad():
        seconds = alternate(runs, repeats)
        memory = {name: peak_mib(run) for name, run in runs.items()}
    flops = {name: counted_flops(run) for name, run in runs.items()}
    return seconds, memory, flops


def report(label: str, seconds: dict[str, float], memory: dict[str, float], flops: dict[str, int],
           flop_floor: float) -> None:
    base_s, base_m, base_f = seconds["vanilla"], memory["vanilla"], flops["vanilla"]
    print(f"  {label}: vanilla {base_s * 1000:7.2f} ms/step, peak tensors {base_m:6.2f} MiB, "
          f"{base_f / 1e9:.2f} GFLOP; FLOP floor x{flop_floor:.3f}")
    for name in seconds:
        if name != "vanilla":
            print(f"    {name:36s} time x{seconds[name] / base_s:.2f}  peak tensors x{memory[name] / base_m:.2f}  "
                  f"FLOPs x{flops[name] / base_f:.3f}")


def sd3_diffusers() -> None:
    from multicond.core.diffusers_binding import install_style_aligned_dit
    from multicond.core.joint_style import JointStyle
    from tests.paper_cb35 import PaperCB35Processor

    transformer = sd3_transformer()
    heads, head_dim, layers = transformer.config.num_attention_heads, transformer.config.attention_head_dim, 2
    print("diffusers, tiny SD3.5-L-like (2 joint blocks), CB35's batch [uncond ref, uncond target, cond ref, cond "
          "target], 1 thread; ratios over vanilla")
    for size in SIZES:
        g = torch.Generator().manual_seed(0)
        inputs = {"hidden_states": torch.randn(4, 16, size, size, generator=g),
                  "encoder_hidden_states": torch.randn(4, SD3_TEXT, 64, generator=g),
                  "pooled_projections": torch.randn(4, 32, generator=g), "timestep": torch.full((4,), 700.0)}
        plain = dict(transformer.attn_processors)
        cb35 = {**plain, **{f"transformer_blocks.{i}.attn.processor": PaperCB35Processor() for i in range(layers)}}

        def call(setup):
            def run():
                with setup():
                    return transformer(**inputs).sample
            return run

        def processors(table):
            class Swap:
                def __enter__(self):
                    transformer.set_attn_processor(dict(table))

                def __exit__(self, *exc):
                    transformer.set_attn_processor(dict(plain))
            return Swap

        runs = {"vanilla": call(processors(plain)),
                "ours (reference isolated)": call(lambda: install_style_aligned_dit(transformer, JointStyle())),
                "ours, CB35's layout (not isolated)": call(lambda: install_style_aligned_dit(
                    transformer, JointStyle(), isolate_reference=False)),
                "CB35 re-statement": call(processors(cb35))}
        seconds, memory, flops = timed(runs)
        image = (size // 2) ** 2
        report(f"{size}x{size} latent ({image} image tokens)", seconds, memory, flops,
               floor(flops["vanilla"], layers, heads, head_dim, image, SD3_TEXT, targets=2))
        print(f"    ours/CB35 time x{seconds['ours (reference isolated)'] / seconds['CB35 re-statement']:.2f}")


def flux_diffusers() -> None:
    from multicond.core.diffusers_binding.joint_style_flux import install_style_aligned_flux
    from multicond.core.diffusers_binding.tiny_dit import tiny_flux_inputs, tiny_flux_transformer
    from tests.paper_alignedgen import PaperAlignedGenProcessor

    transformer = tiny_flux_transformer("dev", seed=0)
    heads, head_dim = transformer.config.num_attention_heads, transformer.config.attention_head_dim
    singles = len(transformer.single_transformer_blocks)
    print("diffusers, tiny Flux-dev-like (2 double + 2 single blocks), 1 reference + 3 targets (no CFG rows), "
          "1 thread; AlignedGen's defaults (single blocks); ratios over vanilla")
    for size in SIZES:
        inputs = tiny_flux_inputs(4, seed=0, height=size, width=size)
        plain = dict(transformer.attn_processors)
        names = list(plain)
        ids = inputs["img_ids"].clone()
        ids[:, 2] += size // 2  # AlignedGen: the reference's keys shifted right by the grid width
        rotary = transformer.pos_embed(ids)
        doubles = len(transformer.transformer_blocks)
        paper = {name: PaperAlignedGenProcessor(i, range(doubles, len(names)), rotary, FLUX_TEXT)
                 for i, name in enumerate(names)}

        def with_processors(table):
            def run():
                transformer.set_attn_processor(dict(table))
                try:
                    return transformer(**inputs).sample
                finally:
                    transformer.set_attn_processor(dict(plain))
            return run

        def ours():
            with install_style_aligned_flux(transformer):
                return transformer(**inputs).sample

        runs = {"vanilla": with_processors(plain), "ours (AlignedGen's defaults)": ours,
                "AlignedGen re-statement": with_processors(paper)}
        seconds, memory, flops = timed(runs)
        image = (size // 2) ** 2
        report(f"{size}x{size} latent ({image} image tokens)", seconds, memory, flops,
               floor(flops["vanilla"], singles, heads, head_dim, image, FLUX_TEXT, targets=3))
        ratio = seconds["ours (AlignedGen's defaults)"] / seconds["AlignedGen re-statement"]
        print(f"    ours/AlignedGen time x{ratio:.2f}")


def styled_nodes(model, selection=None):
    """Shared Attention (no GroupNorm: none in a DiT) then AdaIN Style, both at their defaults otherwise."""
    from multicond.nodes.style import AdaINStyle, SharedAttention

    shared = SharedAttention.execute(model, True, 1.0, 0.0, False, False, True, 0, 0.0, 1.0, selection).args[0]
    return AdaINStyle.execute(shared, True, True, False, 1.0, 0, 0.0, 1.0, selection).args[0]


def comfyui_rows(variants: dict, batch: int, steps: int, cfg: float, positive: list, negative: list, layers: int,
                 heads: int, head_dim: int, text: int, targets: int) -> None:
    """Per-step time, peak tensors and FLOPs of sampling `batch` images with each variant, at both latent sizes.

    `targets`: target rows in each model call (CFG puts a reference and its targets in both halves).
    """
    import comfy.sample

    for size in SIZES:
        latent = torch.zeros(batch, 16, size, size)

        def sample(m):
            def run():
                with torch.inference_mode():
                    noise = comfy.sample.prepare_noise(latent, 0)
                    return comfy.sample.sample(m, noise, steps, cfg, "euler", "normal", positive, negative, latent,
                                               seed=0, disable_pbar=True)
            return run

        runs = {name: sample(m) for name, m in variants.items()}
        seconds, memory, flops = timed(runs, repeats=7)
        seconds = {name: value / steps for name, value in seconds.items()}
        image = (size // 2) ** 2  # one model call of all the rows per step
        report(f"{size}x{size} latent ({image} image tokens)", seconds, memory, flops,
               floor(flops["vanilla"], layers, heads, head_dim, image, text, targets, calls=steps))


def sd3_comfyui() -> None:
    import comfy.sd
    import comfyui_version
    import folder_paths

    from multicond.nodes.balance import GRADINGS, LayerBalance

    transformer = sd3_transformer()
    state = {key: value.clone() for key, value in transformer.state_dict().items()}
    model = comfy.sd.load_diffusion_model_state_dict(state, model_options={"dtype": torch.float32})
    heads, head_dim, layers = transformer.config.num_attention_heads, transformer.config.attention_head_dim, 2

    with tempfile.TemporaryDirectory() as folder:
        g = torch.Generator().manual_seed(3)
        keys = (1000, 987, 974, 960, 945, 929, 913, 895, 877, 857, 836, 814, 790, 764, 737, 707, 675, 640, 602, 560,
                515, 464, 409, 347, 278, 199, 110, 8)
        # q and k graded alike: the chosen layer gets both, so attention is shared there (CB35 shares where both are)
        grades = {t: (torch.rand(layers, generator=g).tolist(), torch.rand(layers, generator=g).tolist()) for t in keys}
        torch.save({"layer_names": [f"transformer_blocks.{i}.attn.processor" for i in range(layers)],
                    "stats": {t: {"q": qk, "k": qk, "v": v} for t, (qk, v) in grades.items()}},
                   Path(folder) / "gradingTiny")
        folder_paths.add_model_folder_path(GRADINGS, folder)
        selection = LayerBalance.execute(model, "grading", "gradingTiny", 0.5, "all layers", 0.0, "joint", 0.85,
                                         "as the method").args[0]
    variants = {"vanilla": model, "Shared Attention + AdaIN Style": styled_nodes(model),
                "with Layer Balance (1 of 2 per step)": styled_nodes(model, selection)}
    g = torch.Generator().manual_seed(1)
    positive = [[torch.randn(1, SD3_TEXT, 64, generator=g), {"pooled_output": torch.randn(1, 32, generator=g)}]]
    negative = [[torch.randn(1, SD3_TEXT, 64, generator=g), {"pooled_output": torch.randn(1, 32, generator=g)}]]
    steps = 4
    print(f"ComfyUI {comfyui_version.__version__}, the same tiny SD3.5-L-like weights, 1 reference + 1 target with "
          f"CFG, {steps} euler steps, PyTorch SDPA attention, 1 thread; per step, ratios over vanilla")
    comfyui_rows(variants, 2, steps, 3.5, positive, negative, layers, heads, head_dim, SD3_TEXT, targets=2)


def flux_comfyui() -> None:
    import comfyui_version

    from tests.comfyui.tiny_dit import build_flux_weighted, flux_conditioning, flux_transformer

    model = build_flux_weighted("dev")  # the diffusers tiny Flux-dev weights, converted by ComfyUI
    config = flux_transformer("dev").config
    heads, head_dim, singles = config.num_attention_heads, config.attention_head_dim, config.num_single_layers
    variants = {"vanilla": model, "Shared Attention + AdaIN Style": styled_nodes(model)}
    steps = 4
    print(f"ComfyUI {comfyui_version.__version__}, the same tiny Flux-dev-like weights (2 double + 2 single blocks), "
          f"1 reference + 3 targets at CFG 1 (Flux-dev: no uncond rows), {steps} euler steps, PyTorch SDPA attention, "
          f"1 thread; nodes on the single blocks (default); per step, ratios over vanilla")
    # At CFG 1 ComfyUI runs the positive chunk only: the negative is never evaluated.
    comfyui_rows(variants, 4, steps, 1.0, flux_conditioning(1, FLUX_TEXT), flux_conditioning(2, FLUX_TEXT), singles,
                 heads, head_dim, FLUX_TEXT, targets=3)


def main() -> None:
    parser = argparse.ArgumentParser(description="StyleAligned on SD3.5 and Flux over vanilla.")
    parser.add_argument("--comfyui", action="store_true", help="instead: the SD3.5 and Flux nodes in the ComfyUI "
                                                               "of COMFYUI_PATH, run with its Python")
    options = parser.parse_args()
    torch.set_num_threads(1)  # steady timings on a shared machine
    if options.comfyui:
        import benchmarks.comfy_setup  # noqa: F401 - ComfyUI first, then the pack

        sd3_comfyui()
        flux_comfyui()
        return
    import tests.conftest  # noqa: F401 - registers the pack as `multicond`

    sd3_diffusers()
    flux_diffusers()


if __name__ == "__main__":
    main()
