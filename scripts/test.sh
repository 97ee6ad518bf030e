#!/usr/bin/env bash
# Sets up dependencies, builds everything (tests, examples, benchmarks; rex::cuda too when nvcc is
# found; the CUDA emulation, which runs every CUDA test on the CPU) in build/, and runs the whole
# test suite through CTest, including the PyTorch twin checks and the emulated CUDA suites; then
# the sanitizer job: the whole suite again, built with ASan + UBSan in build-asan/
# (docs/testing.md).
set -euo pipefail
cd "$(dirname "$0")/.."
# python3-torch, libopenblas0-pthread: the PyTorch twin tests; clang-14, llvm-14-dev,
# libboost-context-dev: the CUDA emulation (tests/cuda_emulation); libopenmpi-dev, openmpi-bin:
# the data-parallel tests (tests/dist); python3-matplotlib: the study runner's figures (tests/study).
bash scripts/setup.sh python3-torch libopenblas0-pthread clang-14 llvm-14-dev libboost-context-dev \
  libopenmpi-dev openmpi-bin python3-matplotlib
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release
cmake --build build -j "$(nproc)"
ctest --test-dir build --output-on-failure -j "$(nproc)"

# The sanitizer job (docs/testing.md): the whole suite again, built with AddressSanitizer and
# UndefinedBehaviorSanitizer (REX_SANITIZE) in build-asan/, without CUDA, its emulation, the
# benchmarks, the fuzz targets (sanitized already, and run above) or the PyTorch twin. -O1 -g1
# (line tables only) builds in about a third of the time of -O2 -g, which is what lets the whole
# suite fit CI's 30 minutes on 2 cores. Any report fails the test that produced it.
# It is also the second instruction set every CI run exercises: compiled for x86-64-v2 (SSE4.2, no
# AVX, AVX2 or FMA), where build/ is compiled for this machine (-march=native), so that a bound or
# an exact comparison that holds only for one vector width fails here.
cmake -S . -B build-asan -DCMAKE_BUILD_TYPE=None "-DCMAKE_CXX_FLAGS=-O1 -g1 -march=x86-64-v2" \
  -DREX_NATIVE_ARCH=OFF -DREX_SANITIZE=ON -DREX_CUDA=OFF -DREX_CUDA_EMULATION=OFF \
  -DREX_BUILD_BENCH=OFF -DREX_FUZZ=OFF
export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1:strict_string_checks=1:detect_stack_use_after_return=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
cmake --build build-asan -j "$(nproc)"
ctest --test-dir build-asan --output-on-failure -j "$(nproc)" \
  -E '^(package_|header_only_compile|layering_check|ops_doc_complete)'
