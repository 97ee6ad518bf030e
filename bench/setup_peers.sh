#!/bin/bash
# Creates a Python virtual environment with the benchmark's current peers: PyTorch (for eager and
# torch.compile) and JAX, both CPU builds where a CPU build is offered. Large downloads (PyTorch's
# CUDA-enabled PyPI wheel is several GB with its CUDA libraries): for benchmarks only, never CI.
#
#   bash bench/setup_peers.sh [DIR]      (default: .venv-peers at the repository root)
#   DIR/bin/python bench/bench_train.py  (then every peer is timed)
#
# torch.compile on the CPU compiles its kernels with the system C++ compiler (g++), already here.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=${1:-$root/.venv-peers}
python3 -m venv "$venv"
"$venv/bin/pip" install --upgrade pip
# PyTorch's CPU-only wheels live on its own index; where that index cannot be reached, the PyPI
# wheel (built with CUDA, which runs on the CPU just the same) is the fallback.
if ! "$venv/bin/pip" install --index-url https://download.pytorch.org/whl/cpu torch; then
  echo "setup_peers: PyTorch's CPU index is unreachable; installing the PyPI wheel instead" >&2
  "$venv/bin/pip" install torch
fi
"$venv/bin/pip" install jax numpy
"$venv/bin/python" -c 'import torch, jax
print("setup_peers: torch", torch.__version__, "jax", jax.__version__)'
echo "setup_peers: run $venv/bin/python bench/bench_train.py"
