#!/bin/bash
# Runs the cost report on 2 steps of the default model at batch 1 (emulated), and on the realistic
# config from the cost formulas, and checks that each report's tables add up: the per-kernel
# launches to the step's launches, the per-shape calls to its cuBLAS calls, the per-kernel and
# per-shape times to the step's parts (to the printed rounding), the host waits' part to 6 us a
# wait (the device model's typical figure), and the step time to the sum of its parts, positive.
# Usage: check_cost_report.sh COST_REPORT WORK_DIR REALISTIC_CONFIG
set -euo pipefail
mkdir -p "$2"
"$1" "$2" --set train.batch_size=1 --steps 2 --device-model h100 | tee "$2/cost_report.txt"
"$1" "$2" --config "$3" --formulas --device-model h200 | tee "$2/cost_report_realistic.txt"
for report in "$2/cost_report.txt" "$2/cost_report_realistic.txt"; do
awk '
  /^per kernel/ { section = "kernels"; getline; next }
  /^per cuBLAS shape/ { section = "gemms"; getline; next }
  /^per step/ { section = "step"; next }
  section == "kernels" && NF == 11 { kernel_launches += $2; kernel_us += $11; kernel_rows++ }
  section == "gemms" && NF == 11 { gemm_calls += $9; gemm_us += $11; gemm_rows++ }
  section == "step" && $1 == "launches" { launches = $2 }
  section == "step" && $1 == "host" && $2 == "waits" { waits = $3 }
  section == "step" && $1 == "cuBLAS" { calls = $3 + 0 }
  section == "step" && /step time us/ { total = $7; kernels = $10; gemms = $13; wait_us = $17 }
  section == "step" && /MFU/ { mfu = $5 + 0 }
  function fail(message) { print "FAIL: " message; failed = 1 }
  function near(a, b, tolerance) { return a - b <= tolerance && b - a <= tolerance }
  END {
    if (kernel_rows == 0 || gemm_rows == 0) fail("no kernel or cuBLAS rows")
    if (kernel_launches != launches) fail("kernel rows launch " kernel_launches ", the step " launches)
    if (gemm_calls != calls) fail("cuBLAS rows call " gemm_calls " times, the step " calls)
    if (!near(kernel_us, kernels, 0.0005 * kernel_rows + 0.0005)) fail("kernel rows " kernel_us " us, the step " kernels)
    if (!near(gemm_us, gemms, 0.0005 * gemm_rows + 0.0005)) fail("cuBLAS rows " gemm_us " us, the step " gemms)
    if (!near(wait_us, waits * 6, 0.0005)) fail(waits " host waits cost " wait_us " us, not 6 us each")
    if (!(total > 0) || !near(total, kernels + gemms + wait_us, 0.002)) fail("step time " total " is not its parts")
    if (!(mfu > 0)) fail("no positive MFU")
    exit failed
  }' "$report"
done
echo "both cost reports add up"
