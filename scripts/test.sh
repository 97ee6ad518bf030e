#!/usr/bin/env bash
# Sets up dependencies, builds everything (tests, examples, benchmarks; rex::cuda too when nvcc is
# found; the CUDA emulation, which runs every CUDA test on the CPU) in build/, and runs the whole
# test suite through CTest, including the PyTorch twin checks and the emulated CUDA suites; then
# the sanitizer job: the suites again, built with ASan + UBSan in build-asan/ (docs/testing.md).
set -euo pipefail
cd "$(dirname "$0")/.."
# python3-torch, libopenblas0-pthread: the PyTorch twin tests; clang-14, libboost-context-dev: the
# CUDA emulation (tests/cuda_emulation); libopenmpi-dev, openmpi-bin: the data-parallel tests
# (tests/dist).
bash scripts/setup.sh python3-torch libopenblas0-pthread clang-14 libboost-context-dev \
  libopenmpi-dev openmpi-bin
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release
cmake --build build -j "$(nproc)"
ctest --test-dir build --output-on-failure -j "$(nproc)"

# The sanitizer job (docs/testing.md): the suites of the code that reads files and runs training
# (config, corpus, tokenizer, safetensors, checkpoints, the training library, the CLI end to end),
# built with AddressSanitizer and UndefinedBehaviorSanitizer (REX_SANITIZE), without CUDA, its
# emulation, the benchmarks, the fuzz targets (sanitized already, and run above) or the PyTorch
# twin. Any report fails the suite that produced it. The whole suite under the sanitizers does not
# fit CI's 30 minutes on 2 cores (its build alone was 41% done after 8 minutes): REX_SANITIZE_ALL=1
# runs it.
cmake -S . -B build-asan -DCMAKE_BUILD_TYPE=RelWithDebInfo -DREX_SANITIZE=ON -DREX_CUDA=OFF \
  -DREX_CUDA_EMULATION=OFF -DREX_BUILD_BENCH=OFF -DREX_FUZZ=OFF
export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1:strict_string_checks=1:detect_stack_use_after_return=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
if [ "${REX_SANITIZE_ALL:-0}" = 1 ]; then
  cmake --build build-asan -j "$(nproc)"
  ctest --test-dir build-asan --output-on-failure -j "$(nproc)" \
    -E '^(package_|header_only_compile|layering_check|ops_doc_complete)'
else
  suites=(test_training test_data test_safetensors test_fuzz_regressions)
  cmake --build build-asan -j "$(nproc)" --target "${suites[@]}" train_tiny_rex train_rex_minimal
  for suite in "${suites[@]}"; do build-asan/tests/"$suite"; done
  ctest --test-dir build-asan --output-on-failure -j "$(nproc)" \
    -R '^(train_tiny_rex_cli|train_tiny_rex_bad_inputs|config_refusals|train_rex_minimal)$'
fi
