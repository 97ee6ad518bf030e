#!/usr/bin/env bash
# Every __global__ kernel in kernels/*.cu must appear in the launch list that the emulated suites
# wrote (REX_CUDA_EMULATION_LAUNCHES): a kernel no emulated test launches is a kernel CI never ran.
# Usage: check_kernel_coverage.sh KERNELS_DIR LAUNCH_LIST
set -uo pipefail
kernels=$(grep -ohE '__global__ void [A-Za-z0-9_]+' "$1"/*.cu | awk '{print $3}' | sort -u)
[ -n "$kernels" ] || { echo "FAIL: no __global__ kernel found in $1"; exit 1; }
[ -s "$2" ] || { echo "FAIL: $2 is missing or empty: no emulated suite recorded its launches"; exit 1; }
# a template kernel is launched as name<args>: its name counts
missing=$(comm -23 <(echo "$kernels") <(sed 's/<.*//' "$2" | sort -u))
total=$(echo "$kernels" | wc -l)
if [ -n "$missing" ]; then
  echo "FAIL: kernels that no emulated test launched:"; echo "$missing" | sed 's/^/  /'
  exit 1
fi
echo "all $total kernels in $1 were launched on the emulated device"
