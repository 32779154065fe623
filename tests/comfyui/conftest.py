"""ComfyUI tier: runs against a real ComfyUI, skipped loudly when none is found."""

from __future__ import annotations

import sys
import warnings

import pytest

from .comfy_host import find_comfyui, import_comfyui

COMFYUI = find_comfyui()
SKIP_REASON = ("no ComfyUI found: set COMFYUI_PATH to a ComfyUI checkout (or put this pack in ComfyUI/custom_nodes/) "
               "and run with that checkout's Python to run the ComfyUI tier")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if COMFYUI is not None:
        return
    marker = pytest.mark.skip(reason=SKIP_REASON)
    for item in items:
        if "tests/comfyui" in str(item.fspath).replace("\\", "/"):
            item.add_marker(marker)


def pytest_report_header(config: pytest.Config) -> str:
    return f"ComfyUI tier: {COMFYUI}" if COMFYUI else f"ComfyUI tier: SKIPPED - {SKIP_REASON}"


if COMFYUI is not None:
    import_comfyui(COMFYUI)
    try:  # what the tier imports from the host: a missing package is named, not a bare traceback
        import comfy.model_patcher  # noqa: F401
        import comfy.sd  # noqa: F401
        import comfy_extras.nodes_freelunch  # noqa: F401
        import nodes  # noqa: F401
    except ModuleNotFoundError as error:
        pytest.exit(f"ComfyUI tier: the Python running it ({sys.executable}) lacks the package {error.name!r} that "
                    f"ComfyUI at {COMFYUI} imports. Install the host's requirements into it (scripts/host_venv.sh "
                    f"{COMFYUI} builds a venv that has them) or point COMFYUI_PYTHON at one that does.", returncode=4)
    import torch

    # The tiny models' ops are so small that a second thread only waits on the first; on a busy 2-core machine
    # oversubscribed threads make a 0.4 s sampling run take 10 s.
    torch.set_num_threads(1)
else:
    warnings.warn(SKIP_REASON, stacklevel=1)
