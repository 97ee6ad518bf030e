#!/usr/bin/env bash
# examples/train_rex_minimal end to end on a small generated corpus: a few dozen steps of a small
# model must bring the validation loss well below its starting value, which is about ln(vocab).
# Usage: test_train_minimal.sh PATH/TO/train_rex_minimal WORK_DIR
set -uo pipefail
. "$(dirname "$0")/cli_common.sh" "$@"
write_corpus > corpus.txt
"$exe" corpus.txt model.d_model=32 model.n_layers=2 model.n_heads=2 model.n_kv_heads=1 \
  model.context=32 moe.experts_per_layer=2 moe.d_expert=32 moe.reuse=2 psr.t_start=5 \
  psr.t_end=20 train.steps=40 train.batch_size=8 train.warmup=5 train.lr=1e-2 \
  train.log_interval=10 train.eval_batches=4 > run.log 2>&1 || { cat run.log; echo "FAIL: exit $?"; exit 1; }
cat run.log
initial=$(sed -nE 's/^step 0: val_loss ([0-9.]+) \(ln\(vocab\) = ([0-9.]+)\)$/\1/p' run.log)
ln_vocab=$(sed -nE 's/^step 0: val_loss ([0-9.]+) \(ln\(vocab\) = ([0-9.]+)\)$/\2/p' run.log)
final=$(sed -nE 's/^step 40: val_loss ([0-9.]+)$/\1/p' run.log)
[ -n "$initial" ] && [ -n "$final" ] || { echo "FAIL: no validation losses in the output"; exit 1; }
grep -q -- '--- sample ---' run.log || { echo "FAIL: no sample"; exit 1; }
# The untrained loss is within 0.3 of ln(vocab); 40 steps take it at least 1 nat lower.
awk -v a="$initial" -v l="$ln_vocab" -v b="$final" 'BEGIN {
  d = a - l; if (d < 0) d = -d
  if (d > 0.3) { print "FAIL: initial val_loss " a " is not near ln(vocab) " l; exit 1 }
  if (b > a - 1.0) { print "FAIL: val_loss " a " -> " b " did not fall by 1 nat"; exit 1 }
  print "ok: val_loss " a " -> " b " (ln(vocab) " l ")" }'
