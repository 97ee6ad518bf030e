#!/usr/bin/env bash
# End-to-end tests of examples/train_tiny_rex on a tiny model and a generated corpus:
#  - resume equals uninterrupted: a run stopped at step 3 and resumed ends with byte-identical
#    model, checkpoint, routing report and metrics (timing fields aside) as a run never stopped, also
#    when the run that stopped had gone past its last checkpoint (its extra metrics lines are dropped),
#    and with per-sequence and per-token PSR masks tied across blocks;
#  - --eval-only reproduces the final validation loss, and with --set train.eval_batches=N the loss
#    a training run with that N logs; --sample prints the requested characters, and the same greedy
#    text with --sample-recompute, in fp32 and in bf16;
#  - a diverging run (lr 100, lr 10) exits 1 naming the step and the cause, and the checkpoint it
#    had written before still resumes; SIGTERM saves and exits (143) as Ctrl-C does;
#  - one writer per run folder: while a run trains, a second run on its folder (new or resumed) is
#    refused naming the first's PID and host and changes nothing there, a reader still reads it, and
#    once the first is killed with kill -9 the folder resumes at once (no stale lock);
#  - bad inputs exit with status 1 (not a crash) and a message naming the problem; a metrics.jsonl
#    line that is not a record is dropped with a warning. (tests/check_bad_inputs.sh goes further.)
# Usage: test_train_cli.sh PATH/TO/train_tiny_rex WORK_DIR
set -uo pipefail
. "$(dirname "$0")/cli_common.sh" "$@"

write_corpus > corpus.txt
cat > tiny.json <<'EOF'
{"model": {"d_model": 32, "n_layers": 2, "n_heads": 2, "n_kv_heads": 1, "context": 16},
 "moe": {"experts_per_layer": 2, "top_k": 2, "d_expert": 16, "reuse": 2, "z_loss_coef": 0.001},
 "psr": {"t_start": 2, "t_end": 5},
 "train": {"steps": 8, "batch_size": 4, "warmup": 2, "log_interval": 2, "eval_interval": 4,
           "eval_batches": 2, "checkpoint_interval": 4}}
EOF
train() { "$exe" --config tiny.json --data corpus.txt "$@"; }
strip_timing() { sed -E 's/"(elapsed_s|tokens_per_s)":[^,}]*,?//g' "$1"; }
same_run() {  # same_run A B: every file of the two run folders agrees
  for f in model.safetensors checkpoint.safetensors routing.json config.json vocab.json; do
    cmp -s "$1/$f" "$2/$f" || fail "$1/$f and $2/$f differ"
  done
  [ "$(strip_timing "$1/metrics.jsonl")" = "$(strip_timing "$2/metrics.jsonl")" ] ||
    fail "$1/metrics.jsonl and $2/metrics.jsonl differ"
}

# ---- resume equals uninterrupted ----------------------------------------------------------------
train --out whole > whole.log 2>&1 || fail "uninterrupted run failed: $(cat whole.log)"
train --out split --stop-after 3 > split1.log 2>&1 || fail "first half failed: $(cat split1.log)"
grep -q "stopped: checkpoint saved at step 3" split1.log || fail "no stop message: $(cat split1.log)"
"$exe" --resume split --data corpus.txt > split2.log 2>&1 || fail "resume failed: $(cat split2.log)"
grep -q "resuming at step 3 of 8" split2.log || fail "resume did not start at step 3"
same_run whole split

# The same with per-sequence and per-token PSR masks tied across each block (psr.mask_scope,
# psr.tie_block): each mask a pure function of its place, so resuming changes nothing; and the
# scope matters (a different model than the step scope's).
for scope in sequence token; do
  masks="--set psr.mask_scope=$scope --set psr.tie_block=true"
  # shellcheck disable=SC2086
  train --out whole_$scope $masks > whole_$scope.log 2>&1 ||
    fail "$scope: uninterrupted run failed: $(cat whole_$scope.log)"
  # shellcheck disable=SC2086
  train --out split_$scope $masks --stop-after 3 > split1_$scope.log 2>&1 ||
    fail "$scope: first half failed: $(cat split1_$scope.log)"
  "$exe" --resume split_$scope --data corpus.txt > split2_$scope.log 2>&1 ||
    fail "$scope: resume failed: $(cat split2_$scope.log)"
  same_run whole_$scope split_$scope
  cmp -s whole/model.safetensors whole_$scope/model.safetensors &&
    fail "psr.mask_scope=$scope trained the model of the step scope"
done

# A run that got to step 6 after its step-4 checkpoint, then "crashed": resuming from the step-4
# checkpoint must drop its metrics lines past step 4 and end identical to the whole run.
train --out crash --stop-after 4 > crash1.log 2>&1 || fail "crash run part 1 failed"
cp crash/checkpoint.safetensors step4.safetensors
"$exe" --resume crash --data corpus.txt --stop-after 2 > crash2.log 2>&1 || fail "crash run part 2 failed"
grep -q '"step":6' crash/metrics.jsonl || fail "crash run did not log step 6"
cp step4.safetensors crash/checkpoint.safetensors
"$exe" --resume crash --data corpus.txt > crash3.log 2>&1 || fail "crash resume failed: $(cat crash3.log)"
same_run whole crash

# ---- evaluation and sampling ----------------------------------------------------------------
final=$(grep '"kind":"eval"' whole/metrics.jsonl | tail -1 | sed -E 's/.*"val_loss":([^,}]*).*/\1/')
eval_line=$("$exe" --eval-only --checkpoint whole --data corpus.txt 2>&1) || fail "eval-only failed: $eval_line"
got=$(echo "$eval_line" | sed -E 's/.*"val_loss":([^,}]*).*/\1/')
[ "$got" = "$final" ] || fail "--eval-only gave val_loss $got, training logged $final"
echo "$eval_line" | grep -q '"step":8' || fail "--eval-only line lacks the step: $eval_line"
sample=$("$exe" --sample 40 --checkpoint whole --prompt "the " --temperature 0 2>&1) || fail "sampling failed: $sample"
[ "${#sample}" -eq 44 ] || fail "sample should be 4 + 40 characters, got ${#sample}: '$sample'"
# The recompute path (the KV cache's reference, rex/train/sample.hpp) gives the same greedy text.
recomputed=$("$exe" --sample 40 --checkpoint whole --prompt "the " --temperature 0 --sample-recompute 2>&1) ||
  fail "--sample-recompute failed: $recomputed"
[ "$recomputed" = "$sample" ] || fail "--sample-recompute gave '$recomputed', the KV cache '$sample'"
# So do both in bf16, where the KV cache reads bf16 copies of the weights.
bf16=(--sample 40 --checkpoint whole --prompt "the " --temperature 0 --set train.matmul_precision=bf16)
sample_bf16=$("$exe" "${bf16[@]}" 2>&1) || fail "sampling in bf16 failed: $sample_bf16"
[ "${#sample_bf16}" -eq 44 ] || fail "a bf16 sample should be 44 characters, got '$sample_bf16'"
recomputed_bf16=$("$exe" "${bf16[@]}" --sample-recompute 2>&1) || fail "bf16 --sample-recompute failed"
[ "$recomputed_bf16" = "$sample_bf16" ] ||
  fail "in bf16 --sample-recompute gave '$recomputed_bf16', the KV cache '$sample_bf16'"

# --set train.eval_batches=N evaluates the saved model on N batches: the value a training run with
# that N logs (evaluation does not change training: a run with eval_batches 4 trains the same model),
# another value for another N, and the saved run's own value for its own N (2).
val_loss() { sed -E 's/.*"val_loss":([^,}]*).*/\1/' <<< "$1"; }
train --out whole4 --set train.eval_batches=4 > whole4.log 2>&1 || fail "eval_batches 4 run failed: $(cat whole4.log)"
final4=$(grep '"kind":"eval"' whole4/metrics.jsonl | tail -1 | sed -E 's/.*"val_loss":([^,}]*).*/\1/')
declare -A eval_at
for n in 1 2 4; do
  line=$("$exe" --eval-only --checkpoint whole --data corpus.txt --set train.eval_batches=$n 2>&1) ||
    fail "--eval-only --set train.eval_batches=$n failed: $line"
  grep -qF "\"batches\":$n," <<< "$line" || fail "eval_batches $n: the line lacks \"batches\":$n: $line"
  eval_at[$n]=$(val_loss "$line")
done
[ "${eval_at[2]}" = "$final" ] || fail "eval_batches 2 gave ${eval_at[2]}, training logged $final"
[ "${eval_at[4]}" = "$final4" ] || fail "eval_batches 4 gave ${eval_at[4]}, a training run with 4 logged $final4"
[ "${eval_at[1]}" != "${eval_at[2]}" ] && [ "${eval_at[4]}" != "${eval_at[2]}" ] ||
  fail "eval_batches 1, 2, 4 should give different losses: ${eval_at[*]}"
# --eval-only with --sample: the evaluation line, then the sample.
output=$("$exe" --eval-only --checkpoint whole --data corpus.txt --sample 40 --prompt "the " --temperature 0 2>&1) ||
  fail "--eval-only --sample failed: $output"
[ "$(head -1 <<< "$output")" = "$eval_line" ] && [ "$(tail -n +2 <<< "$output")" = "$sample" ] ||
  fail "--eval-only --sample should print the evaluation line, then the sample: $output"

# ---- a diverging run stops before it saves, and its last good checkpoint resumes -----------------
for lr in 100 10; do
  output=$(train --out diverge$lr --set train.lr=$lr --set train.checkpoint_interval=1 2>&1)
  status=$?
  [ $status -eq 1 ] || fail "lr $lr: a diverging run exited with $status (want 1): $output"
  for want in "training diverged at step 2" "learning rate too high (train.lr = $lr)" \
    "the checkpoint of step 1 is kept"; do
    grep -qF "$want" <<< "$output" || fail "lr $lr: the message lacks '$want': $output"
  done
  # grep reads all its input (no -q): with pipefail, head killed by SIGPIPE would fail the check.
  head -c 65536 diverge$lr/checkpoint.safetensors | grep -aF '"step":"1"' > /dev/null ||
    fail "lr $lr: checkpoint.safetensors is not the step-1 checkpoint"
  output=$("$exe" --resume diverge$lr --data corpus.txt --steps 2 --set train.divergence_factor=0 2>&1) ||
    fail "lr $lr: the kept checkpoint does not resume: $output"
  grep -q "resuming at step 1 of 2" <<< "$output" || fail "lr $lr: resume did not start at step 1: $output"
done

# ---- SIGTERM (SLURM, Kubernetes, timeout) saves and exits as Ctrl-C does ------------------------
"$exe" --config tiny.json --data corpus.txt --out term --steps 100000 --set train.log_interval=1 \
  > term.log 2>&1 &
pid=$!
for _ in $(seq 1 600); do grep -q "^step" term.log && break; sleep 0.05; done
kill -TERM $pid
wait $pid
status=$?
[ $status -eq 143 ] || fail "SIGTERM: exit status $status (want 143): $(tail -3 term.log)"
saved=$(sed -nE 's/^interrupted: checkpoint saved at step ([0-9]+).*/\1/p' term.log)
if [ -z "$saved" ]; then
  fail "SIGTERM: no 'checkpoint saved' line: $(tail -3 term.log)"
else
  "$exe" --resume term --data corpus.txt --steps $((saved + 1)) > term2.log 2>&1 ||
    fail "SIGTERM: resume failed: $(cat term2.log)"
  grep -q "resuming at step $saved of $((saved + 1))" term2.log || fail "SIGTERM: resume did not start at step $saved"
fi

# ---- one writer per run folder ----------------------------------------------------------------
"$exe" --config tiny.json --data corpus.txt --out busy --steps 100000 \
  --set train.checkpoint_interval=1 --set train.log_interval=1000 > busy.log 2>&1 &
pid=$!
# Wait (up to 60 s, for a loaded machine) until it holds the lock and has saved a model.
for _ in $(seq 1 1200); do
  [ -e busy/model.safetensors ] && grep -q "^$pid " busy/.lock 2> /dev/null && break
  sleep 0.05
done
fingerprint() { (cd "$1" && find . -type f -print0 | sort -z | xargs -0 sha256sum); }
if ! grep -q "^$pid " busy/.lock 2> /dev/null || [ ! -e busy/model.safetensors ]; then
  fail "the first writer did not lock busy/ and save a model within 60 s: $(cat busy.log)"
  kill -9 $pid
  wait $pid 2> /dev/null
else
  kill -STOP $pid  # it keeps the lock but writes nothing while the second writers try
  before=$(fingerprint busy)
  holder="run folder busy is in use by PID $pid on host $(uname -n) (lock file busy/.lock)"
  for second in "--config tiny.json --data corpus.txt --out busy --overwrite" \
    "--resume busy --data corpus.txt"; do
    output=$("$exe" $second --stop-after 1 2>&1)  # --stop-after 1: it ends should it get the lock
    status=$?
    [ $status -eq 1 ] || fail "second writer '$second': exit status $status (want 1): $output"
    grep -qF "$holder" <<< "$output" || fail "second writer '$second' did not say '$holder': $output"
  done
  [ "$(fingerprint busy)" = "$before" ] || fail "a refused second writer changed files in busy/"
  "$exe" --eval-only --checkpoint busy --data corpus.txt > /dev/null 2>&1 ||
    fail "--eval-only cannot read a folder another run is writing"
  kill -9 $pid
  wait $pid 2> /dev/null
  output=$("$exe" --resume busy --data corpus.txt --stop-after 1 2>&1) ||
    fail "the folder of a writer killed with kill -9 does not resume at once: $output"
  grep -q "^$pid " busy/.lock && fail "the resumed run did not write itself into busy/.lock"
fi

# ---- bad inputs ------------------------------------------------------------------------------
expect_error() {  # expect_error "what the message must contain" command...
  local want=$1
  shift
  local output status
  output=$("$@" 2>&1)
  status=$?
  if [ $status -ne 1 ]; then
    fail "'$*' exited with $status (want 1): $output"
  elif ! grep -qF -- "$want" <<< "$output"; then
    fail "'$*' did not say '$want': $output"
  fi
}
: > empty.txt
printf 'abcdefghijklmnopqrstuvwxyz0123456789' > short.txt
printf '{"model": {"d_model": 32,}}' > malformed.json
printf '{"model": {"d_modl": 32}}' > unknown_key.json
printf '{"moe": {"top_k": 3, "experts_per_layer": 2}}' > impossible.json
cp -r whole truncated && head -c 1000 whole/checkpoint.safetensors > truncated/checkpoint.safetensors
mkdir -p folder && printf 'text\0with a NUL byte, then more text to pass the length checks' > binary.bin
truncate -s 1100M huge.txt  # sparse: refused by its size before it is read
cp -r whole corrupt && printf 'XXXXXXXX' | dd of=corrupt/model.safetensors bs=1 seek=0 conv=notrunc 2>/dev/null

expect_error "missing.txt" train --out bad --data missing.txt
expect_error "is empty" train --out bad --data empty.txt
expect_error "context" train --out bad --data short.txt
expect_error "/dev/zero is not a regular file" train --out bad --data /dev/zero
# data.format "text": "auto" would read a folder or a .bin file as token shards (test_train_shards.sh)
expect_error "folder is not a regular file" train --out bad --data folder --set data.format=text
expect_error "holds a NUL byte at offset 4" train --out bad --data binary.bin --set data.format=text
expect_error "the folder holds no token shards (expected *.bin files)" train --out bad --data folder
expect_error "more than the limit of 1073741824" train --out bad --data huge.txt
expect_error "--prompt: CharTokenizer::encode" train --out prompt_first --sample 5 --prompt "Z"
[ ! -e prompt_first ] || fail "--prompt was checked after the run folder was made"
expect_error "train.divergence_factor must be 0 (no limit) or above 1" train --out bad --set train.divergence_factor=0.5
expect_error "train.keep_checkpoints must be positive" train --out bad --set train.keep_checkpoints=0
expect_error "malformed.json:1:26: model: syntax error while parsing object key - unexpected '}'" \
  "$exe" --config malformed.json --data corpus.txt --out bad
expect_error 'unknown key "model.d_modl"' "$exe" --config unknown_key.json --data corpus.txt --out bad
expect_error 'unknown key "train.stepz"' train --out bad --set train.stepz=3
expect_error "moe.top_k (3) cannot exceed moe.experts_per_layer (2)" "$exe" --config impossible.json --data corpus.txt --out bad
if ! nvidia-smi -L > /dev/null 2>&1; then  # with a GPU, --device cuda trains
  expect_error "--device cuda:" train --out bad --device cuda
fi
expect_error "unknown option --stepz" train --out bad --stepz 3
expect_error "already holds a run" train --out whole
expect_error "checkpoint.safetensors" "$exe" --resume truncated --data corpus.txt
expect_error "model.safetensors" "$exe" --eval-only --checkpoint corrupt --data corpus.txt
expect_error "does not exist" "$exe" --eval-only --checkpoint nowhere --data corpus.txt
expect_error "leave it at 0" train --out bad --set model.vocab_size=5
expect_error "--stop-after expects at least 1 step" train --out bad --stop-after 0
expect_error "model.d_model cannot change in a resumed run" "$exe" --resume whole --data corpus.txt --set model.d_model=64
# The checkpoint modes refuse the training options they would ignore, and every --set but the
# evaluation keys, naming the key.
for option in "--steps 3" "--seed 2" "--config tiny.json" "--out elsewhere"; do
  expect_error "${option%% *} applies only to training" "$exe" --eval-only --checkpoint whole --data corpus.txt $option
  expect_error "${option%% *} applies only to training" "$exe" --sample 5 --checkpoint whole $option
done
only="only train.eval_batches and train.matmul_precision may be set"
expect_error "--eval-only: --set model.d_model would change the saved model; $only" \
  "$exe" --eval-only --checkpoint whole --data corpus.txt --set train.eval_batches=3 --set model.d_model=64
expect_error "--sample with --checkpoint: --set moe.top_k would change the saved model; $only" \
  "$exe" --sample 5 --checkpoint whole --set moe.top_k=1
expect_error "--eval-only: --set train.seed would change the saved run; $only" \
  "$exe" --eval-only --checkpoint whole --data corpus.txt --set train.seed=2
expect_error "train.eval_batches must be positive" \
  "$exe" --eval-only --checkpoint whole --data corpus.txt --set train.eval_batches=0

# A metrics.jsonl line that is JSON but not a record (or not JSON) is dropped with a warning.
cp -r whole metrics_junk && printf '[1, 2]\n"text"\n{"kind": "train"}\nnot json\n' >> metrics_junk/metrics.jsonl
output=$("$exe" --resume metrics_junk --data corpus.txt 2>&1) || fail "a junk metrics line is fatal: $output"
[ "$(grep -c "is not a metrics record; dropped" <<< "$output")" -eq 4 ] ||
  fail "junk metrics lines were not each reported: $output"
grep -q '^\[1' metrics_junk/metrics.jsonl && fail "a junk metrics line was kept"

if [ $failures -ne 0 ]; then
  echo "$failures check(s) failed"
  exit 1
fi
echo "train_tiny_rex: resume, evaluation, sampling and bad-input checks passed"
