#!/usr/bin/env bash
# The GPU run of the CUDA backend (docs/cuda.md): build with rex::cuda, run the whole suite with the
# CUDA cases live, then compute-sanitizer memcheck and racecheck over the CUDA op tests, then the
# default model's training speed in fp32, tf32 and bf16. (The CUDA
# emulation is not built here: CI runs it; this script is about the real device.) Meant for a lent GPU
# machine without network access: the header-only dependencies come from .deps/ (fill it with
# `scripts/gpu_check.sh --collect-deps` on a machine that has the Debian packages, then carry it).
# Results go to ${OUT:-gpu-results}/.
set -euo pipefail
cd "$(dirname "$0")/.."
deps=$PWD/.deps
if [ "${1:-}" = "--collect-deps" ]; then
  # The copy mirrors the /usr layout, so the packages' own config files find their headers
  # relative to themselves; doctest's names /usr outright and is made relative the same way.
  rm -rf "$deps" && mkdir -p "$deps/include" "$deps/share/cmake" "$deps/share/eigen3" "$deps/lib/cmake"
  cp -r /usr/include/eigen3 /usr/include/doctest /usr/include/nlohmann "$deps/include/"
  cp -r /usr/share/eigen3/cmake "$deps/share/eigen3/"
  cp -r /usr/share/cmake/nlohmann_json "$deps/share/cmake/"
  cp -r /usr/lib/cmake/doctest "$deps/lib/cmake/"
  sed -i 's|set(_IMPORT_PREFIX "/usr")|get_filename_component(_IMPORT_PREFIX "${CMAKE_CURRENT_LIST_DIR}/../../.." ABSOLUTE)|' \
    "$deps/lib/cmake/doctest/doctestTargets.cmake"
  echo "copied the header-only dependencies into $deps ($(du -sh "$deps" | cut -f1))"
  exit 0
fi
mkdir -p "${OUT:-gpu-results}"
out=$(cd "${OUT:-gpu-results}" && pwd)
nvidia-smi -L | tee "$out/device.txt"
args=()
[ -d "$deps" ] && args=(-DCMAKE_PREFIX_PATH="$deps")
cmake -S . -B build-gpu -DCMAKE_BUILD_TYPE=Release -DREX_CUDA=ON -DREX_CUDA_EMULATION=OFF "${args[@]}" \
  > "$out/configure.log"
cmake --build build-gpu -j "$(nproc)" > "$out/build.log" 2>&1 || { tail -40 "$out/build.log"; exit 1; }
status=0
(cd build-gpu && ctest --output-on-failure -j 4 -E "twin|package" > "$out/ctest.log" 2>&1) ||
  status=1
tail -5 "$out/ctest.log"
(cd build-gpu && ctest -R cuda -V > "$out/ctest_cuda_verbose.log" 2>&1) || status=1
grep -E "Test +#|SKIPPED|passed|failed" "$out/ctest_cuda_verbose.log" | tail -20
# test_cuda holds every CUDA suite; --source-file picks one file's cases.
compute-sanitizer --tool memcheck --error-exitcode 3 build-gpu/tests/test_cuda \
  --source-file='*test_cuda_ops.cpp' > "$out/memcheck.log" 2>&1 || status=1
tail -5 "$out/memcheck.log"
compute-sanitizer --tool racecheck --racecheck-report all --error-exitcode 3 \
  build-gpu/tests/test_cuda --source-file='*test_cuda_ops.cpp' > "$out/racecheck.log" 2>&1 ||
  status=1
tail -5 "$out/racecheck.log"
# The tensor-core kernels (ldmatrix, mma.sync), which CI runs only in the emulation.
for tool in memcheck racecheck; do
  compute-sanitizer --tool "$tool" --error-exitcode 3 build-gpu/tests/test_cuda \
    --source-file='*test_cuda_flash_attention.cpp' > "$out/flash_$tool.log" 2>&1 || status=1
  tail -3 "$out/flash_$tool.log"
done
# The default model on the GPU in each matmul precision (docs/formats.md, "Precision"): 100 steps
# on a generated corpus, the last logged line (tokens per second) of each.
corpus=$out/corpus.txt
for i in $(seq 1 20000); do echo "In the ${i}th year the king said unto his servants: go forth."; done \
  > "$corpus"
for precision in fp32 tf32 bf16; do
  build-gpu/examples/train_tiny_rex --data "$corpus" --out "$out/train_$precision" --overwrite \
    --device cuda --steps 100 --set train.matmul_precision="$precision" \
    > "$out/train_$precision.log" 2>&1 || status=1
  echo "$precision: $(grep "^step" "$out/train_$precision.log" | tail -1)"
done
exit $status
