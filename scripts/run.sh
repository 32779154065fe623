#!/usr/bin/env bash
# The main job: the diffusers command line (a tiny built-in random model when no --checkpoint is given).
#   bash scripts/run.sh                      # style-aligned set on the tiny model, PNGs in outputs/
#   bash scripts/run.sh style-aligned --checkpoint path/to/sdxl.safetensors --family sdxl --prompts "a cat" "a dog"
source "$(dirname "$0")/env.sh"
if [ $# -eq 0 ]; then set -- style-aligned; fi
exec "$PY" -m multicond "$@"
