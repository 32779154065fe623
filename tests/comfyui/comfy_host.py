"""Find a real ComfyUI checkout and build tiny SD1.5- and SDXL-shaped models in it."""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def find_comfyui() -> Path | None:
    """`COMFYUI_PATH`, or the ComfyUI that holds this pack in `custom_nodes/`."""
    candidates = [Path(os.environ["COMFYUI_PATH"])] if os.environ.get("COMFYUI_PATH") else []
    if ROOT.parent.name == "custom_nodes":
        candidates.append(ROOT.parent.parent)
    return next((path for path in candidates if (path / "comfy" / "model_patcher.py").is_file()), None)


def import_comfyui(path: Path, pytorch_attention: bool = False) -> None:
    """Put the checkout on sys.path and set ComfyUI's flags for a CPU run before anything imports comfy."""
    sys.dont_write_bytecode = True
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
    from comfy.cli_args import args

    args.cpu = True
    args.force_fp32 = True
    args.disable_smart_memory = True
    # ComfyUI picks sub-quadratic attention on CPU; GPUs get PyTorch SDPA, which benchmarks should compare with.
    args.use_pytorch_cross_attention = pytorch_attention
