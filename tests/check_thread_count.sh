#!/usr/bin/env bash
# The same bits at any thread count (docs/architecture.md, "Determinism"): the default model
# (R4 + PSR, the PSR ramp over steps 2-15 so that masks, routing and the expert tables all move)
# trained 20 steps with OMP_NUM_THREADS = 1, 2 and 3 writes byte-identical model.safetensors and
# checkpoint.safetensors and logs the same losses; a run saved at step 10 with 1 thread and resumed
# with 3 ends byte-identical to them too.
# Usage: check_thread_count.sh PATH/TO/train_tiny_rex WORK_DIR [--set KEY=VALUE ...]
# (the sanitizer job passes a smaller batch: a step there is some 20 times slower)
set -uo pipefail
. "$(dirname "$0")/cli_common.sh" "$1" "$2"
shift 2

write_corpus > corpus.txt
args=(--data corpus.txt --steps 20 --set psr.t_start=2 --set psr.t_end=15 --set train.warmup=5
      --set train.log_interval=1 --set train.eval_interval=10 --set train.checkpoint_interval=10
      "$@")
# Every logged number but the wall-clock ones.
losses() { sed -e 's/"elapsed_s":[^,}]*,\{0,1\}//' -e 's/"tokens_per_s":[^,}]*,\{0,1\}//' "$1"; }

for threads in 1 2 3; do
  OMP_NUM_THREADS=$threads "$exe" "${args[@]}" --out "t$threads" > "t$threads.log" 2>&1 ||
    fail "$threads threads: $(tail -3 "t$threads.log")"
done
OMP_NUM_THREADS=1 "$exe" "${args[@]}" --out resumed --stop-after 10 > r1.log 2>&1 ||
  fail "first half: $(tail -3 r1.log)"
OMP_NUM_THREADS=3 "$exe" --resume resumed --data corpus.txt > r2.log 2>&1 ||
  fail "resume with 3 threads: $(tail -3 r2.log)"

[ "$(grep -c '"kind":"train"' t1/metrics.jsonl)" = 20 ] || fail "1 thread: not 20 logged steps"
for run in t2 t3 resumed; do
  for file in model.safetensors checkpoint.safetensors; do
    cmp -s "t1/$file" "$run/$file" || fail "$run/$file differs from 1 thread's"
  done
  diff <(losses t1/metrics.jsonl) <(losses "$run/metrics.jsonl") > /dev/null ||
    fail "$run logged other losses than 1 thread: $(diff <(losses t1/metrics.jsonl) \
      <(losses "$run/metrics.jsonl") | head -4)"
done

[ "$failures" -eq 0 ] && echo "thread count: all checks passed"
exit "$failures"
