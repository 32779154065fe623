"""MaskedAdapter over the same control unmasked in a real ComfyUI: per-step time.

    COMFYUI_PATH=/path/to/ComfyUI /path/to/comfy/python benchmarks/masked_adapter_comfyui.py

SD1.5-shaped tiny UNet with a tiny T2I-Adapter, and the test pack's tiny SD1.5 with a tiny
ControlNet; one image with CFG, euler. The mask is the paper's centred box. Masking multiplies
each residual once per model call: no model work is added.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import benchmarks.comfy_setup  # noqa: E402,F401 - ComfyUI first, then the pack

import nodes as comfy_nodes  # noqa: E402
import torch  # noqa: E402

from benchmarks.measure import alternate  # noqa: E402
from multicond.nodes.adapter import MaskedAdapter  # noqa: E402
from tests.comfyui import tiny  # noqa: E402

STEPS = 4


def main() -> None:
    torch.set_num_threads(1)  # steady timings on a shared machine
    import comfyui_version

    print(f"ComfyUI {comfyui_version.__version__}, 1 image with CFG, {STEPS} euler steps, 1 thread; masked over unmasked")
    cases = (("T2I-Adapter, SD1.5-shaped", "sd15_shaped", tiny.build_t2i_adapter("sd15_shaped")),
             ("ControlNet, test pack SD1.5", "sd15", tiny.build_controlnet("sd15")))
    for name, kind, control in cases:
        model = tiny.build(kind)
        for size in (32, 64):
            hint = torch.rand(1, size * 8, size * 8, 3, generator=torch.Generator().manual_seed(0))
            positive, negative = comfy_nodes.ControlNetApplyAdvanced().apply_controlnet(
                tiny.conditioning(kind, 1), tiny.conditioning(kind, 2), control, hint, 1.0, 0.0, 1.0)
            box = torch.zeros(size * 8, size * 8)
            box[size * 2:size * 6, size * 2:size * 6] = 1
            masked = MaskedAdapter.execute(positive, negative, box, "nearest", 0.0, "").args
            latent = torch.zeros(1, 4, size, size)
            runs = {label: (lambda p=p, n=n: tiny.sample(model, kind, positive=p, negative=n, latent=latent, steps=STEPS))
                    for label, (p, n) in (("unmasked", (positive, negative)), ("masked", masked))}
            seconds = alternate(runs, repeats=9)
            print(f"  {name} {size}x{size} latent: unmasked {seconds['unmasked'] / STEPS * 1000:6.1f} ms/step, "
                  f"masked x{seconds['masked'] / seconds['unmasked']:.3f}")


if __name__ == "__main__":
    main()
