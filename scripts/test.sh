#!/usr/bin/env bash
# Sets up dependencies, builds everything (tests, examples, benchmarks; rex::cuda too when nvcc is
# found) in build/, and runs the whole test suite through CTest, including the PyTorch twin checks.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh python3-torch libopenblas0-pthread  # the PyTorch twin tests
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release
cmake --build build -j "$(nproc)"
ctest --test-dir build --output-on-failure -j "$(nproc)"
