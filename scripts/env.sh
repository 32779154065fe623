# Sourced by run.sh and test.sh: a project venv with CPU torch and the pack installed (editable).
# Sets ROOT (the repository) and PY (the venv's Python), both absolute, and changes into ROOT, where
# test.sh runs pytest; run.sh goes back to the caller's directory, so relative paths stay the caller's.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${MULTICOND_VENV:-.venv}
case $VENV in /*) ;; *) VENV="$ROOT/$VENV" ;; esac  # a relative MULTICOND_VENV is a folder of the repository
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
# Reinstall whenever pyproject.toml changes (its hash is kept in the venv).
STAMP="$VENV/.multicond-pyproject"
WANT=$(sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1)
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
  "$PY" -m pip install -q --upgrade pip
  # torch first and pinned: a bare `torch` requirement would pull a multi-GB CUDA build.
  "$PY" -m pip install -q "torch==${MULTICOND_TORCH:-2.13.0}"
  "$PY" -m pip install -q -e "$ROOT[test]"
  echo "$WANT" > "$STAMP"
fi
cd "$ROOT"
