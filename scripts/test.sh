#!/usr/bin/env bash
# Install everything into .venv and run the tests: core and diffusers always; the ComfyUI tier too when
# COMFYUI_PATH points at a ComfyUI checkout (run with that ComfyUI's Python: COMFYUI_PYTHON, or the
# venv/.venv inside the checkout, or python3).
source "$(dirname "$0")/env.sh"
if [ -z "${COMFYUI_PATH:-}" ]; then
  "$PY" -m pytest tests -q "$@"  # the ComfyUI tier reports itself skipped, with the reason
  exit 0
fi
"$PY" -m pytest tests -q --ignore=tests/comfyui "$@"
COMFY_PY=${COMFYUI_PYTHON:-}
for candidate in "$COMFYUI_PATH/venv/bin/python" "$COMFYUI_PATH/.venv/bin/python" python3; do
  if [ -z "$COMFY_PY" ] && command -v "$candidate" >/dev/null 2>&1; then COMFY_PY=$candidate; fi
done
"$COMFY_PY" -c "import pytest" 2>/dev/null || "$COMFY_PY" -m pip install -q pytest
echo "ComfyUI tier: $COMFYUI_PATH with $COMFY_PY"
PYTHONDONTWRITEBYTECODE=1 "$COMFY_PY" -m pytest tests/comfyui -q "$@"
