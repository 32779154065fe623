# Sourced by run.sh and test.sh: a project venv with CPU torch and the pack installed (editable).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV=${MULTICOND_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
# Reinstall whenever pyproject.toml changes (its hash is kept in the venv).
STAMP="$VENV/.multicond-pyproject"
WANT=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
  "$PY" -m pip install -q --upgrade pip
  # torch first and pinned: a bare `torch` requirement would pull a multi-GB CUDA build.
  "$PY" -m pip install -q "torch==${MULTICOND_TORCH:-2.13.0}"
  "$PY" -m pip install -q -e ".[test]"
  echo "$WANT" > "$STAMP"
fi
