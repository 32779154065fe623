"""ComfyUI tier: runs against a real ComfyUI, skipped loudly when none is found."""

from __future__ import annotations

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
else:
    warnings.warn(SKIP_REASON, stacklevel=1)
