#!/usr/bin/env bash
# Install everything and run every test tier; each tier runs and reports even when an earlier one failed, and the
# exit status is non-zero if any failed.
#   1. core + diffusers, in the project venv (.venv, built on first use);
#   2. the ComfyUI tier, once per ComfyUI host given:
#        COMFYUI_PATH=/path/to/ComfyUI        one checkout, run with COMFYUI_PYTHON, or its venv/.venv, or a venv
#                                             built for it by scripts/host_venv.sh;
#        COMFYUI_HOSTS="/path/a /path/b"      several checkouts (CI: the oldest supported and the newest), each with
#                                             a venv from scripts/host_venv.sh; they run side by side, one thread each.
#      With neither, the ComfyUI tier reports itself skipped, with the reason.
# Extra arguments go to every pytest run (e.g. -x, -k name).
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
source "$ROOT/scripts/env.sh" || exit 1
set +e  # env.sh stops on the first error; from here every tier runs whatever the one before did
LOGS=$(mktemp -d)
declare -a NAMES=() STATUS=() SUMMARY=()

summary_of() {  # pytest's closing line: "12 passed, 1 skipped in 3.4s"
  grep -E '^(=+ )?[0-9]+ (passed|failed|error|skipped)' "$1" | tail -1 | sed -E 's/=//g; s/ in [0-9.]+s.*$//; s/^ +//'
}

record() {  # name, status, log
  NAMES+=("$1"); STATUS+=("$2"); SUMMARY+=("$(summary_of "$3")")
}

host_python() {  # the Python that runs a host's tier
  local host=$1
  if [ -n "${COMFYUI_PYTHON:-}" ] && [ "$host" = "${COMFYUI_PATH:-}" ]; then echo "$COMFYUI_PYTHON"; return; fi
  for candidate in "$host/venv/bin/python" "$host/.venv/bin/python"; do
    if [ -x "$candidate" ]; then echo "$candidate"; return; fi
  done
  bash "$ROOT/scripts/host_venv.sh" "$host"
}

HOSTS=()
if [ -n "${COMFYUI_PATH:-}" ]; then HOSTS+=("$COMFYUI_PATH"); fi
for host in ${COMFYUI_HOSTS:-}; do HOSTS+=("$host"); done

# The hosts' Pythons are found or built (pip, mostly waiting on the disk and network) while the core tier runs.
declare -a BUILDERS=()
for index in "${!HOSTS[@]}"; do
  host_python "${HOSTS[$index]}" > "$LOGS/python$index" 2> "$LOGS/python$index.log" &
  BUILDERS+=("$!")
done

echo "== core + diffusers tier"
"$PY" -m pytest tests -q --ignore=tests/comfyui "$@" 2>&1 | tee "$LOGS/core.log"
record "core + diffusers" "${PIPESTATUS[0]}" "$LOGS/core.log"

if [ ${#HOSTS[@]} -eq 0 ]; then
  echo "== ComfyUI tier: no host given (set COMFYUI_PATH or COMFYUI_HOSTS)"
  "$PY" -m pytest tests/comfyui -q "$@" 2>&1 | tee "$LOGS/comfyui.log"  # reports itself skipped, with the reason
  status=${PIPESTATUS[0]}
  [ "$status" -eq 5 ] && status=0  # pytest's "no tests ran": every test of the tier skipped as designed
  record "ComfyUI tier (skipped)" "$status" "$LOGS/comfyui.log"
else
  declare -a PIDS=() LABELS=()
  for index in "${!HOSTS[@]}"; do
    host=${HOSTS[$index]}
    version=$(sed -nE 's/^__version__ = "(.*)"/\1/p' "$host/comfyui_version.py" 2>/dev/null)
    LABELS+=("ComfyUI ${version:-?} ($host)")
    log="$LOGS/host$index.log"
    if ! wait "${BUILDERS[$index]}"; then
      { echo "no Python for $host:"; cat "$LOGS/python$index.log"; } > "$log"; PIDS+=(""); continue
    fi
    python=$(cat "$LOGS/python$index")
    "$python" -c "import pytest" 2>/dev/null || "$python" -m pip install -q pytest
    # One torch thread each: the tiny models gain nothing from more, and two tiers share the cores.
    COMFYUI_PATH="$host" OMP_NUM_THREADS=1 PYTHONDONTWRITEBYTECODE=1 \
      "$python" -m pytest tests/comfyui -q -p no:cacheprovider "$@" > "$log" 2>&1 &
    PIDS+=("$!")
  done
  for index in "${!HOSTS[@]}"; do
    status=1
    if [ -n "${PIDS[$index]}" ]; then wait "${PIDS[$index]}"; status=$?; fi
    echo "== ComfyUI tier: ${LABELS[$index]}"
    cat "$LOGS/host$index.log"
    record "${LABELS[$index]}" "$status" "$LOGS/host$index.log"
  done
fi

echo "== summary"
failed=0 passed_total=0 failed_total=0
for index in "${!NAMES[@]}"; do
  verdict=ok
  if [ "${STATUS[$index]}" -ne 0 ]; then verdict="FAILED (exit ${STATUS[$index]})"; failed=1; fi
  echo "${NAMES[$index]}: ${SUMMARY[$index]:-no summary} - $verdict"
  count() { awk -v word="$1" '{for (i = 2; i <= NF; i++) if ($i ~ "^" word) total += $(i - 1)} END {print total + 0}' <<< "$2"; }
  passed_total=$((passed_total + $(count passed "${SUMMARY[$index]}")))
  failed_total=$((failed_total + $(count failed "${SUMMARY[$index]}") + $(count error "${SUMMARY[$index]}")))
done
if [ "$failed" -ne 0 ] && [ "$failed_total" -eq 0 ]; then failed_total=1; fi  # a tier that died before counting
rm -rf "$LOGS"
echo "total: $passed_total passed, $failed_total failed"
exit "$failed"
