#!/usr/bin/env bash
# Installs lemur-agent-server into ./.venv: torch + torchvision (the pair that imports together), then the
# package with its test extras. Idempotent: a second run installs nothing new.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
if ! .venv/bin/python -c "import torch, torchvision" 2>/dev/null; then
  case "$(uname -m)" in
    aarch64|arm64) .venv/bin/pip install -q "torch==2.9.1" "torchvision==0.24.1" ;;
    *)             .venv/bin/pip install -q "torch==2.14.1" "torchvision==0.29.1" ;;
  esac
fi
.venv/bin/pip install -q -e ".[test]"
echo "installed: $(.venv/bin/lemur-agent-server --version)" >&2
