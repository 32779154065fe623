"""SharedAttention + AdaINStyle (and with LayerBalance at lambda_s 0.43) over vanilla in a real ComfyUI:
per-step time and peak memory.

    COMFYUI_PATH=/path/to/ComfyUI /path/to/comfy/python benchmarks/style_aligned_comfyui.py

Tiny SDXL-shaped UNet (tests/comfyui/tiny.py), batch 1 reference + 3 targets with CFG, euler.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import benchmarks.comfy_setup  # noqa: E402,F401 - ComfyUI first, then the pack

import torch  # noqa: E402

from benchmarks.measure import alternate_rounds, paired_cost, peak_mib  # noqa: E402
from multicond.core.balance import Grading, save_grading  # noqa: E402
from multicond.core.inversion import ddim_timesteps  # noqa: E402
from multicond.nodes.balance import GRADINGS, LayerBalance  # noqa: E402
from multicond.nodes.common import model_layout  # noqa: E402
from multicond.nodes.style import AdaINStyle, SharedAttention  # noqa: E402
from tests.comfyui import tiny  # noqa: E402

STEPS = 4


def style_aligned(model, share_group_norm: bool, layers=None):
    shared = SharedAttention.execute(model, True, 1.0, 0.0, False, share_group_norm, True, 0, 0.0, 1.0, layers).args[0]
    return AdaINStyle.execute(shared, True, True, False, 1.0, 0, 0.0, 1.0, layers).args[0]


def balanced_layers(model, folder: Path):
    """LayerBalance at the paper's lambda_s 0.43 from a random grading of this model's layers."""
    import folder_paths

    layers = model_layout(model, "benchmark").layers
    timesteps = tuple(ddim_timesteps(50))
    grades = {f: torch.rand(len(timesteps), len(layers), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
              for f in "qk"}
    save_grading(Grading("sdxl", layers, timesteps, grades, "random"), folder / "random.json")
    folder_paths.add_model_folder_path(GRADINGS, str(folder))
    return LayerBalance.execute(model, "grading", "random.json", 0.43, "all layers", 0.0, "output.1", 0.0).args[0]


def main() -> None:
    parser = argparse.ArgumentParser(description="StyleAligned nodes over vanilla in a real ComfyUI.")
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64], help="latent sizes (default: 32 64)")
    parser.add_argument("--repeats", type=int, default=12, help="alternated rounds per size (default: 12)")
    options = parser.parse_args()
    torch.set_num_threads(1)  # steady timings on a shared machine
    model = tiny.build("sdxl")
    with tempfile.TemporaryDirectory() as folder:
        balanced = style_aligned(model, False, balanced_layers(model, Path(folder)))
    variants = {"vanilla": model, "paper defaults": style_aligned(model, True),
                "without shared GroupNorm": style_aligned(model, False), "LayerBalance lambda_s 0.43": balanced}
    import comfyui_version

    print(f"ComfyUI {comfyui_version.__version__}, tiny SDXL-shaped UNet, batch 1+3 with CFG, {STEPS} euler steps, PyTorch SDPA attention, 1 thread")
    for size in options.sizes:
        runs = {name: (lambda m=m: tiny.sample(m, "sdxl", batch=4, size=size, steps=STEPS)) for name, m in variants.items()}
        rounds = alternate_rounds(runs, repeats=options.repeats)
        seconds = {name: statistics.median(values) for name, values in rounds.items()}
        memory = {name: peak_mib(run) for name, run in runs.items()}
        for name in variants:
            print(f"  {size}x{size} latent  {name:28s} {seconds[name] / STEPS * 1000:8.1f} ms/step  "
                  f"x{seconds[name] / seconds['vanilla']:.2f} time  peak tensors {memory[name]:.0f} MiB (x{memory[name] / memory['vanilla']:.2f})")
        cost = paired_cost(rounds, "paper defaults", "without shared GroupNorm", "vanilla")
        print(f"  {size}x{size} latent  shared GroupNorm adds {cost:+.3f}x of a vanilla step (median of paired rounds)")


if __name__ == "__main__":
    main()
