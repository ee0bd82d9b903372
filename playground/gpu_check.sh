#!/usr/bin/env bash
# One-shot GPU check (see playground/gpu_check.py): on one CUDA GPU, ~6-8 minutes, writes OUT/gpu_check.json
# and OUT/gpu_check.md. Usage: bash playground/gpu_check.sh [OUT] [MONAI_PATH]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
args=(--out "${1:-gpu_check}")
[ -n "${2:-}" ] && args+=(--monai-path "$2")
exec "$PY" playground/gpu_check.py "${args[@]}"
