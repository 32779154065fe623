#!/usr/bin/env bash
# The main job: the diffusers command line (a tiny built-in random model when no --checkpoint is given).
# Relative paths are taken from where you run it; outputs go to outputs/<command>/ there by default.
#   bash scripts/run.sh                      # style-aligned set on the tiny model, PNGs in ./outputs/style-aligned
#   bash scripts/run.sh style-aligned --checkpoint path/to/sdxl.safetensors --family sdxl --prompts "a cat" "a dog"
#   bash scripts/run.sh style-aligned --help # every flag, its meaning and default
CALLER=$PWD
source "$(dirname "$0")/env.sh"
cd "$CALLER"  # env.sh works in the repository; the command runs where the user stands
if [ $# -eq 0 ]; then set -- style-aligned; fi
# The usage lines name this script as typed; the caller's directory is not put on Python's path (3.11+).
export MULTICOND_PROG=${MULTICOND_PROG:-$0} PYTHONSAFEPATH=1
exec "$PY" -m multicond "$@"
