#!/usr/bin/env bash
# Build (once) a Python for one ComfyUI host tree and print its path:
#   bash scripts/host_venv.sh HOST_DIR [VENV_DIR]
# The venv is rebuilt when the host's requirements.txt or the extra pins below change (their hash is kept in the venv).
set -euo pipefail
HOST=$(cd "$1" && pwd)
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${2:-$ROOT/.venv-hosts/$(basename "$HOST")}
STAMP="$VENV/.multicond-host-requirements"
# diffusers builds the tiny SD3 models the DiT tests load into ComfyUI (the same weights in every host); pinned to the
# project venv's version.
DIFFUSERS="diffusers==${MULTICOND_HOST_DIFFUSERS:-0.42.1}"
WANT=$({ cat "$HOST/requirements.txt"; echo "$DIFFUSERS"; } | sha256sum | cut -d' ' -f1)
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
  {
    python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    # CPU wheels, pinned: a bare `torch` from the host's requirements would pull a CUDA build.
    "$VENV/bin/python" -m pip install -q "torch==${MULTICOND_HOST_TORCH:-2.14.1}" "torchvision==${MULTICOND_HOST_TORCHVISION:-0.29.1}"
    grep -vE '^(torch|torchvision|torchaudio)\s*$' "$HOST/requirements.txt" > "$VENV/host-requirements.txt"
    # requests: 0.3.64's main.py imports it without listing it; pytest runs the tier.
    "$VENV/bin/python" -m pip install -q -r "$VENV/host-requirements.txt" requests pytest
    # Newer hosts import torchaudio unguarded while loading their nodes; the newest wheel here works with the torch above.
    "$VENV/bin/python" -m pip install -q "torchaudio==${MULTICOND_HOST_TORCHAUDIO:-2.11.1}"
    "$VENV/bin/python" -m pip install -q "$DIFFUSERS"
    echo "$WANT" > "$STAMP"
  } >&2
fi
echo "$VENV/bin/python"
