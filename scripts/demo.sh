#!/usr/bin/env bash
# Sets up dependencies, builds the examples, and trains the demo model, printing a falling loss.
# Extra arguments are passed to the program (see: build/examples/train_mlp --help).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release
cmake --build build -j "$(nproc)" --target train_mlp
build/examples/train_mlp "$@"
