#!/usr/bin/env bash
# Install the pinned torch into the given Python: the CUDA build where an NVIDIA GPU is present, the CPU
# build elsewhere, so a laptop never downloads gigabytes of CUDA libraries. Usage: install_torch.sh PYTHON
set -euo pipefail
py=${1:-python3}
version=$(sed -n 's/^torch==//p' "$(dirname "$0")/../.ci/constraints.txt")
if "$py" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$version')" 2>/dev/null; then
  echo "torch $version already installed"; exit 0
fi
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  exec "$py" -m pip install "torch==$version"            # PyPI's default Linux wheel is the CUDA build
fi
# No GPU. A CPU wheel in a local wheel folder (pip's find-links) is taken without asking any index; its
# dependencies then come from the usual index. Otherwise PyTorch's CPU index serves torch and its needs.
if "$py" -m pip install -q --no-index --no-deps "torch==$version" 2>/dev/null; then
  exec "$py" -m pip install "torch==$version"
fi
exec "$py" -m pip install "torch==$version" \
  --index-url https://download.pytorch.org/whl/cpu --extra-index-url https://pypi.org/simple
