"""The ComfyUI tier run by a Python that lacks what ComfyUI imports names the package, not a bare traceback."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HOST = next((path for path in ([Path(os.environ["COMFYUI_PATH"])] if os.environ.get("COMFYUI_PATH") else [])
             + sorted((ROOT.parent / "shared" / "hosts").glob("comfyui-*"))
             if (path / "comfy" / "model_patcher.py").is_file()), None)


@pytest.mark.skipif(HOST is None, reason="no ComfyUI checkout (COMFYUI_PATH or ../shared/hosts)")
def test_a_host_python_without_comfyuis_requirements_is_told_which_package():
    """This venv has torch but not ComfyUI's requirements (torchsde, einops, ...)."""
    result = subprocess.run([sys.executable, "-m", "pytest", "tests/comfyui/test_node_errors.py", "-q"], cwd=ROOT,
                            env={**os.environ, "COMFYUI_PATH": str(HOST)}, capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 4, output[-2000:]
    found = re.search(r"ComfyUI tier: the Python running it \(.*?\) lacks the package '([\w.]+)'", output)
    assert found, output[-2000:]
    assert importlib.util.find_spec(found.group(1).split(".")[0]) is None  # the package named is the one missing
