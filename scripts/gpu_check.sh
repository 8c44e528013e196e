#!/usr/bin/env bash
# Every GPU check this machine can run (scripts/gpu_check.py says which), one line each; exit 1 on a FAIL.
#   bash scripts/gpu_check.sh [--with-job] [--no-job]
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="$REPO/.venv/bin/python"
[ -x "$PY" ] || PY="$(command -v python3)"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export AFTRAY_CACHE_DIR="${AFTRAY_CACHE_DIR:-$REPO/.cache}"  # where `make` keeps converted models
export RAY_USAGE_STATS_ENABLED="${RAY_USAGE_STATS_ENABLED:-0}" PYTHONUNBUFFERED=1
cd "$REPO"
rc=0
timeout --kill-after=20 480 "$PY" scripts/gpu_check.py "$@" || rc=$?
[ "$rc" -ne 124 ] && [ "$rc" -ne 137 ] || echo "FAIL gpu_check: stopped after 8 minutes"
exit "$rc"
