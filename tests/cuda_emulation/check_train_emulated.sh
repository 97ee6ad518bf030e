#!/usr/bin/env bash
# train_tiny_rex --device cuda on the emulated device against the same program on the CPU, the
# default model on the same corpus and seed. The CPU trains 20 steps (logged every step, 2
# evaluation batches; batch 1 instead of 12 to fit CI: an emulated step of the default batch takes
# about 35 s). The device then takes, from the same parameters as the CPU each time,
#  - step 1, from the initialisation;
#  - step 11, resumed from the CPU run's checkpoint after step 10 (trained weights, optimiser state
#    and data position carried over from a CPU checkpoint);
#  - the evaluation of the CPU run's final model (--eval-only),
# and each must give the CPU's loss and lm_loss (and gradient norm for the steps) within bounds
# derived from the model's sizes (tests/reference/error_bounds.py: twice gamma_N, N counted along
# the forward pass, or forward and backward for the gradient norm; docs/testing.md, "Tolerances").
# The steps start from the same parameters on purpose: after a step the two runs' weights differ
# by rounding that AdamW can amplify up to lr per element (an element whose gradient is zero up to
# rounding moves by +lr on one device and -lr on the other), so free-running runs have no derivable
# bound. The device's optimiser step itself is compared by test_cuda_ops.
# A run whose gradient norm turns NaN (train.lr = 1e30) must stop at the next log step, where
# the device's norms are read, naming the step.
# Usage: check_train_emulated.sh PATH/TO/train_tiny_rex_emulated CORPUS WORK_DIR [BATCH_SIZE]
# (BATCH_SIZE 12 runs the default recipe's batch: about 2 minutes emulated, not for CI.)
set -uo pipefail
exe=$(realpath "$1")
corpus=$2
work=$3
batch=${4:-1}
here=$(cd "$(dirname "$0")" && pwd)
rm -rf "$work" && mkdir -p "$work" || exit 1
if [ ! -s "$corpus" ]; then  # no shared corpus here: make one
  corpus=$work/corpus.txt
  for i in $(seq 1 3000); do
    echo "And it came to pass, in the ${i}th year, that the king said unto his servants: go forth."
  done > "$corpus"
fi

run() {  # run LOG ARGS...: train_tiny_rex ARGS, its output in $work/LOG.log
  local log=$1
  shift
  "$exe" --data "$corpus" "$@" > "$work/$log.log" 2>&1 ||
    { echo "FAIL: train_tiny_rex $*:"; cat "$work/$log.log"; exit 1; }
}
settings=(--steps 20 --set train.batch_size="$batch" --set train.warmup=5
          --set train.log_interval=1 --set train.eval_batches=2)
run cpu_1 --out "$work/cpu" --device cpu "${settings[@]}" --stop-after 10
cp -r "$work/cpu" "$work/cuda_11" || exit 1
run cpu_2 --resume "$work/cpu" --device cpu
run cuda_1 --out "$work/cuda_1" --device cuda "${settings[@]}" --stop-after 1
run cuda_11 --resume "$work/cuda_11" --device cuda --stop-after 1
run cuda_eval --eval-only --checkpoint "$work/cpu" --device cuda --set train.eval_batches=2
# A step whose gradient norm is not finite updates nothing on the device, and the run stops where
# the norms are next read (a log step), naming the step.
output=$("$exe" --data "$corpus" --out "$work/nan" --device cuda --steps 4 --set train.warmup=1 \
  --set train.batch_size="$batch" --set train.lr=1e30 --set train.log_interval=4 2>&1)
status=$?
want="step 2: the gradient norm is nan, so that step updated nothing; training stopped at step 4"
[ $status -eq 1 ] && grep -qF "$want" <<< "$output" ||
  { echo "FAIL: a non-finite gradient norm (exit $status) should end with '$want':"; echo "$output"; exit 1; }
for log in cuda_1 cuda_11 cuda_eval; do
  grep -q "rex CUDA emulation" "$work/$log.log" ||
    { echo "FAIL: $log did not report the emulated device:"; head -5 "$work/$log.log"; exit 1; }
done

python3 - "$here/../reference" "$work" <<'EOF'
import json, os, sys
sys.path.insert(0, sys.argv[1])
from error_bounds import chain_lengths, gamma
work = sys.argv[2]
def rows(run):
    return [json.loads(l) for l in open(os.path.join(work, run, "metrics.jsonl")) if l.strip()]
def train_row(run, step):
    found = [r for r in rows(run) if r["kind"] == "train" and r["step"] == step]
    if len(found) != 1:
        print(f"FAIL: {run}/metrics.jsonl has {len(found)} train rows for step {step}")
        sys.exit(1)
    return found[0]
cfg = json.load(open(os.path.join(work, "cpu", "config.json")))
n = chain_lengths(cfg)
# Losses: twice gamma_N of the forward pass and the loss (evaluation: plus the mean over its
# batches). Gradient norm: | ||a|| - ||b|| | <= ||a - b||, the gradients' bound (both devices sum
# the squares in double, which adds nothing at this precision).
tol = {"loss": 2 * gamma(n["losses"]), "lm_loss": 2 * gamma(n["losses"]),
       "grad_norm": 2 * gamma(n["grad"]),
       "val_loss": 2 * gamma(n["losses"] + cfg["train"]["eval_batches"])}
failures = 0
worst = {}
def check(what, key, cpu, cuda):
    global failures
    rel = abs(cpu - cuda) / max(abs(cpu), 1e-30)
    worst[key] = max(worst.get(key, 0.0), rel)
    if not rel <= tol[key]:
        print(f"FAIL: {what} {key}: cpu {cpu!r}, cuda {cuda!r} (relative {rel:.2e} > {tol[key]:.2e})")
        failures += 1
for step, run in ((1, "cuda_1"), (11, "cuda_11")):
    a, b = train_row("cpu", step), train_row(run, step)
    for key in ("loss", "lm_loss", "grad_norm"):
        check(f"step {step}", key, a[key], b[key])
evals = [r for r in rows("cpu") if r["kind"] == "eval"]
cuda_eval = json.loads(open(os.path.join(work, "cuda_eval.log")).read().strip().splitlines()[-1])
check("final evaluation", "val_loss", evals[-1]["val_loss"], cuda_eval["val_loss"])
print("steps 1 and 11 and the final evaluation, largest relative differences (bound): " +
      ", ".join(f"{k} {v:.2e} ({tol[k]:.2e})" for k, v in worst.items()))
sys.exit(1 if failures else 0)
EOF
