"""What every ComfyUI benchmark does first: register the pack as `multicond` and import ComfyUI (PyTorch SDPA)."""

from __future__ import annotations

import sys

import tests.conftest  # noqa: F401 - registers the pack as `multicond`
from tests.comfyui.comfy_host import find_comfyui, import_comfyui

COMFY = find_comfyui()
if COMFY is None:
    sys.exit("set COMFYUI_PATH to a ComfyUI checkout and run with its Python")
import_comfyui(COMFY, pytorch_attention=True)
