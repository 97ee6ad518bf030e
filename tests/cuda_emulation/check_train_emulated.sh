#!/usr/bin/env bash
# train_tiny_rex --device cuda on the emulated device against the same program on the CPU: 20 steps
# of the default model on the same corpus and seed, logged every step. The recipe is shrunk to fit
# CI (batch 1 instead of 12: an emulated step of the default batch takes about 35 s; warmup 5 so
# the learning rate moves; 2 evaluation batches). Each step's loss and lm_loss, and the final
# validation loss, must agree within 1e-5 relative; the gradient norm within 1e-3 (it sums every
# gradient of a model whose weights differ by float rounding after a few steps; measured 1.4e-4).
# Usage: check_train_emulated.sh PATH/TO/train_tiny_rex_emulated CORPUS WORK_DIR [BATCH_SIZE]
# (BATCH_SIZE 12 runs the default recipe's batch: about 14 minutes emulated, not for CI.)
set -uo pipefail
exe=$(realpath "$1")
corpus=$2
work=$3
batch=${4:-1}
rm -rf "$work" && mkdir -p "$work" || exit 1
if [ ! -s "$corpus" ]; then  # no shared corpus here: make one
  corpus=$work/corpus.txt
  for i in $(seq 1 3000); do
    echo "And it came to pass, in the ${i}th year, that the king said unto his servants: go forth."
  done > "$corpus"
fi

run() {  # run DEVICE
  "$exe" --data "$corpus" --out "$work/$1" --device "$1" --steps 20 \
    --set train.batch_size=$batch --set train.warmup=5 --set train.log_interval=1 \
    --set train.eval_batches=2 > "$work/$1.log" 2>&1 ||
    { echo "FAIL: the $1 run failed:"; cat "$work/$1.log"; exit 1; }
}
run cpu
run cuda
grep -q "rex CUDA emulation" "$work/cuda.log" ||
  { echo "FAIL: the cuda run did not report the emulated device:"; head -5 "$work/cuda.log"; exit 1; }

python3 - "$work/cpu/metrics.jsonl" "$work/cuda/metrics.jsonl" <<'EOF'
import json, sys
def lines(path):
    return [json.loads(l) for l in open(path) if l.strip()]
cpu, cuda = lines(sys.argv[1]), lines(sys.argv[2])
train = lambda rows: {r["step"]: r for r in rows if r["kind"] == "train"}
evals = lambda rows: [r for r in rows if r["kind"] == "eval"]
a, b = train(cpu), train(cuda)
failures = 0
if sorted(a) != list(range(1, 21)) or sorted(b) != sorted(a):
    print(f"FAIL: logged steps differ: cpu {sorted(a)}, cuda {sorted(b)}")
    sys.exit(1)
worst = {"loss": 0.0, "lm_loss": 0.0, "grad_norm": 0.0}
for step in sorted(a):
    for key, tol in (("loss", 1e-5), ("lm_loss", 1e-5), ("grad_norm", 1e-3)):
        x, y = a[step][key], b[step][key]
        rel = abs(x - y) / max(abs(x), 1e-30)
        worst[key] = max(worst[key], rel)
        if rel > tol:
            print(f"FAIL: step {step} {key}: cpu {x!r}, cuda {y!r} (relative {rel:.2e})")
            failures += 1
ea, eb = evals(cpu)[-1]["val_loss"], evals(cuda)[-1]["val_loss"]
rel = abs(ea - eb) / abs(ea)
if rel > 1e-5:
    print(f"FAIL: final val_loss: cpu {ea!r}, cuda {eb!r} (relative {rel:.2e})")
    failures += 1
print("20 steps, largest relative differences: " +
      ", ".join(f"{k} {v:.2e}" for k, v in worst.items()) +
      f"; final val_loss cpu {ea!r}, cuda {eb!r}")
sys.exit(1 if failures else 0)
EOF
