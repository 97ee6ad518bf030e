#!/usr/bin/env bash
# Sets up dependencies, builds everything (tests, examples, benchmarks; rex::cuda too when nvcc is
# found; the CUDA emulation, which runs every CUDA test on the CPU) in build/, and runs the whole
# test suite through CTest, including the PyTorch twin checks and the emulated CUDA suites.
set -euo pipefail
cd "$(dirname "$0")/.."
# python3-torch, libopenblas0-pthread: the PyTorch twin tests; clang-14, libboost-context-dev: the
# CUDA emulation (tests/cuda_emulation).
bash scripts/setup.sh python3-torch libopenblas0-pthread clang-14 libboost-context-dev
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release
cmake --build build -j "$(nproc)"
ctest --test-dir build --output-on-failure -j "$(nproc)"
