"""What every ComfyUI benchmark does first: register the pack as `multicond` and import ComfyUI (PyTorch SDPA)."""

from __future__ import annotations

import sys

import tests.conftest  # noqa: F401 - registers the pack as `multicond`
from tests.comfyui.comfy_host import find_comfyui, import_comfyui

COMFY = find_comfyui()
if COMFY is None:
    sys.exit("set COMFYUI_PATH to a ComfyUI checkout and run with its Python")
import_comfyui(COMFY, pytorch_attention=True)

# The tiny DiTs (import after the lines above).
DIT_SIZES = (32, 64)  # latent sides: 256 and 1024 image tokens (patch 2)


def tiny_sd35l():
    """ComfyUI's SD3 with the tiny SD3.5-L-like weights of benchmarks/style_aligned_dit.py (a 32x32 position table:
    a 64x64 latent fits; the test pack's has 16x16). Call inside inference_mode for inference-tensor weights."""
    import comfy.sd
    import torch

    from benchmarks.style_aligned_dit import sd3_transformer

    state = {key: value.clone() for key, value in sd3_transformer().state_dict().items()}
    return comfy.sd.load_diffusion_model_state_dict(state, model_options={"dtype": torch.float32})


def dit_sample(model, positive: list, negative: list, cfg: float, size: int, steps: int, batch: int = 1):
    """One sampling run of a tiny DiT (16-channel latent, euler/simple, inference_mode): tests/comfyui/tiny_dit.py's."""
    from tests.comfyui import tiny_dit

    return tiny_dit.sample(model, batch=batch, height=size, width=size, steps=steps, cfg=cfg, positive=positive,
                           negative=negative)
