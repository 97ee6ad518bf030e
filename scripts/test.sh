#!/usr/bin/env bash
# Sets up dependencies, builds everything (tests, examples, benchmarks; rex::cuda too when nvcc is
# found; the CUDA emulation, which runs every CUDA test on the CPU) in build/, and runs the whole
# test suite through CTest, including the PyTorch twin checks and the emulated CUDA suites; then
# the sanitizer job: the suites again, built with ASan + UBSan in build-asan/ (docs/testing.md).
set -euo pipefail
cd "$(dirname "$0")/.."
# python3-torch, libopenblas0-pthread: the PyTorch twin tests; clang-14, libboost-context-dev: the
# CUDA emulation (tests/cuda_emulation).
bash scripts/setup.sh python3-torch libopenblas0-pthread clang-14 libboost-context-dev
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release
cmake --build build -j "$(nproc)"
ctest --test-dir build --output-on-failure -j "$(nproc)"

# The sanitizer job (docs/testing.md): every rex test built with AddressSanitizer and
# UndefinedBehaviorSanitizer (REX_SANITIZE), without CUDA, its emulation or the benchmarks, and run
# except for the tests that exercise no sanitized rex code (the PyTorch twin runs torch, the
# package and header-only tests build without the sanitizers, the doc and layering checks are
# scripts). Any report fails the test that produced it.
cmake -S . -B build-asan -DCMAKE_BUILD_TYPE=RelWithDebInfo -DREX_SANITIZE=ON -DREX_CUDA=OFF \
  -DREX_CUDA_EMULATION=OFF -DREX_BUILD_BENCH=OFF
cmake --build build-asan -j "$(nproc)"
export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1:strict_string_checks=1:detect_stack_use_after_return=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
ctest --test-dir build-asan --output-on-failure -j "$(nproc)" \
  -E '^(twin_|package_|header_only_compile|layering_check|ops_doc_complete)'
