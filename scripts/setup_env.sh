#!/usr/bin/env bash
# Create .venv (idempotent) and install aftray with its test extra.
# - uses uv when it can (fast), plain pip otherwise (AFTRAY_INSTALLER=pip forces pip);
# - honours PIP_FIND_LINKS, so a local CPU torch wheel is used instead of the CUDA one from PyPI;
# - keeps every cache inside the clone (.cache/), so CI leaves nothing behind.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${AFTRAY_EXTRAS:-test}"
STAMP=.venv/.aftray-installed
WANT="$(cat pyproject.toml scripts/setup_env.sh | sha256sum | cut -c1-16)-$EXTRAS"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then exit 0; fi

export UV_CACHE_DIR="$PWD/.cache/uv" PIP_CACHE_DIR="$PWD/.cache/pip"
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
FIND_LINKS=()
for d in ${PIP_FIND_LINKS:-}; do FIND_LINKS+=(--find-links "$d"); done

start=$(date +%s)
if [ "${AFTRAY_INSTALLER:-uv}" = uv ] && .venv/bin/python -m pip install -q uv 2>/dev/null; then
  # --index-strategy unsafe-best-match lets the find-links CPU wheel (2.13.0+cpu) win over PyPI's 2.13.0.
  .venv/bin/uv pip install --python .venv/bin/python --index-strategy unsafe-best-match \
    "${FIND_LINKS[@]}" -e ".[${EXTRAS}]"
else
  .venv/bin/python -m pip install -q "${FIND_LINKS[@]}" -e ".[${EXTRAS}]"
fi
echo "$WANT" > "$STAMP"
echo "setup_env: .venv ready in $(( $(date +%s) - start ))s ($(du -sh .venv | cut -f1))"
