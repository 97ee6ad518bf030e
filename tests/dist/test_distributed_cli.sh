#!/usr/bin/env bash
# train_tiny_rex under mpirun -np 2 (docs/distributed.md), on a tiny model and a generated corpus:
#  - a checkpoint written by 2 ranks resumes on 1 rank with 2 micro-batches, and one written so on
#    2 ranks, and each continues as the uninterrupted 2-rank run does, to the bit (the same shards
#    added in the same order: docs/distributed.md, "Exact data parallel"), its logged losses and
#    gradient norms included;
#  - ranks that disagree (config, data) refuse before the first step with one message naming the
#    difference; an error on one rank ends the whole job within seconds; so does a rank killed
#    with kill -9 mid-run; SIGTERM to the ranks saves one checkpoint at the same step and exits 143;
#  - a run folder another run is writing: rank 0 is refused the folder's lock, naming the holder's
#    PID, and the whole job ends within seconds.
# Usage: test_distributed_cli.sh PATH/TO/train_tiny_rex WORK_DIR MPIRUN
set -uo pipefail
compare="$(dirname "$(realpath "$0")")/compare_models.py"
. "$(dirname "$0")/../cli_common.sh" "$1" "$2"
mpi=("$3" --oversubscribe --allow-run-as-root -x OMP_NUM_THREADS=1)

write_corpus > corpus.txt
cat > tiny.json <<'EOF'
{"model": {"d_model": 32, "n_layers": 2, "n_heads": 2, "n_kv_heads": 1, "context": 16},
 "moe": {"experts_per_layer": 2, "top_k": 2, "d_expert": 16, "reuse": 2},
 "psr": {"t_start": 2, "t_end": 10},
 "train": {"steps": 16, "batch_size": 8, "warmup": 2, "log_interval": 4, "eval_interval": 8,
           "eval_batches": 2, "checkpoint_interval": 8}}
EOF
ranks() { n=$1; shift; "${mpi[@]}" -np "$n" "$exe" "$@"; }
# elapsed SECONDS COMMAND...: runs the command, fails the check if it took longer than SECONDS.
within() {
  limit=$1; shift
  start=$(date +%s)
  timeout 60 "$@"
  status=$?
  [ $(($(date +%s) - start)) -le "$limit" ] || fail "took more than ${limit}s: $*"
  return $status
}

# ---- resume across world sizes -------------------------------------------------------------------
ranks 2 --config tiny.json --data corpus.txt --out two > two.log 2>&1 || fail "2-rank run: $(cat two.log)"
grep -q "x 2 ranks" two.log || fail "the 2-rank run does not say it has 2 ranks: $(head -3 two.log)"
ranks 2 --config tiny.json --data corpus.txt --out two_then_one --stop-after 8 > a.log 2>&1 ||
  fail "2-rank first half: $(cat a.log)"
# One process with 2 micro-batches adds the same shards in the same order as 2 ranks with 1 each
# (docs/distributed.md, "Exact data parallel"), so the parameters must be the same bits (bound 0).
"$exe" --resume two_then_one --data corpus.txt --set train.grad_accum=2 > b.log 2>&1 ||
  fail "1-rank resume: $(cat b.log)"
grep -q "resuming at step 8 of 16" b.log || fail "the 1-rank resume did not start at step 8"
python3 "$compare" two_then_one/model.safetensors two/model.safetensors 0 ||
  fail "2 ranks then 1 (2 micro-batches) does not continue as 2 ranks do"
"$exe" --config tiny.json --data corpus.txt --out one_then_two --stop-after 8 \
  --set train.grad_accum=2 > c.log 2>&1 || fail "1-rank first half: $(cat c.log)"
ranks 2 --resume one_then_two --data corpus.txt --set train.grad_accum=1 > d.log 2>&1 ||
  fail "2-rank resume: $(cat d.log)"
python3 "$compare" one_then_two/model.safetensors two/model.safetensors 0 ||
  fail "1 rank (2 micro-batches) then 2 ranks does not continue as 2 ranks do"
[ "$(grep -c '"kind":"eval"' two/metrics.jsonl)" = 2 ] || fail "rank 0 alone writes metrics.jsonl"
# The logged losses and gradient norms (read back from the ranks' queued steps, the shards' losses
# summed across the ranks) are those of one process with 2 micro-batches, to the bit.
python3 - two/metrics.jsonl two_then_one/metrics.jsonl one_then_two/metrics.jsonl <<'PY' ||
import json, sys
def train(path):
    return {r["step"]: [r[k] for k in ("loss", "lm_loss", "aux_loss", "grad_norm")]
            for r in map(json.loads, open(path)) if r["kind"] == "train"}
want = train(sys.argv[1])
assert sorted(want) == [4, 8, 12, 16], want
for path in sys.argv[2:]:
    got = train(path)
    assert got == want, (path, got, want)
PY
  fail "the logged losses of 2 ranks and of 1 rank with 2 micro-batches differ"

# ---- ranks that disagree, errors on one rank ------------------------------------------------------
# A wrapper gives rank 1 other arguments ($RANK1_ARGS) or other data ($RANK1_DATA).
cat > per_rank.sh <<EOF
#!/bin/sh
if [ "\$OMPI_COMM_WORLD_RANK" = 1 ]; then
  exec "$exe" --config tiny.json --data "\${RANK1_DATA:-corpus.txt}" \$RANK1_ARGS "\$@"
fi
exec "$exe" --config tiny.json --data corpus.txt "\$@"
EOF
chmod +x per_rank.sh
expect_refusal() {  # expect_refusal NAME PATTERN: the job failed fast, saying PATTERN
  status=$1 name=$2 pattern=$3
  [ "$status" -ne 0 ] || fail "$name: exit status 0"
  grep -q "$pattern" "$name.log" || fail "$name: no message matching '$pattern': $(cat "$name.log")"
}
RANK1_ARGS="--set train.lr=0.002" within 20 "${mpi[@]}" -np 2 ./per_rank.sh --out mismatch \
  > config_mismatch.log 2>&1
expect_refusal $? config_mismatch "rank 1 differs from rank 0 in the config: train.lr"
[ ! -e mismatch/checkpoint.safetensors ] || fail "config_mismatch: a checkpoint was written"
head -c 20000 corpus.txt > other.txt
RANK1_DATA=other.txt within 20 "${mpi[@]}" -np 2 ./per_rank.sh --out mismatch2 \
  > data_mismatch.log 2>&1
expect_refusal $? data_mismatch "rank 1 differs from rank 0 in the --data text"
RANK1_DATA=missing.txt within 20 "${mpi[@]}" -np 2 ./per_rank.sh --out failing \
  > one_rank_fails.log 2>&1
expect_refusal $? one_rank_fails "error (rank 1 of 2): .*missing.txt"
within 20 "${mpi[@]}" -np 2 "$exe" --config tiny.json --data corpus.txt --out odd \
  --set train.batch_size=7 > batch_split.log 2>&1
expect_refusal $? batch_split "train.batch_size (7) must be a multiple of the number of ranks (2)"

# ---- a run folder another run is writing ---------------------------------------------------------
OMP_NUM_THREADS=1 "$exe" --config tiny.json --data corpus.txt --steps 100000 --out held \
  > held_first.log 2>&1 &
holder=$!
for _ in $(seq 1 600); do grep -q "^$holder " held/.lock 2> /dev/null && break; sleep 0.1; done
within 20 "${mpi[@]}" -np 2 "$exe" --config tiny.json --data corpus.txt --out held --overwrite \
  > held.log 2>&1
expect_refusal $? held "run folder held is in use by PID $holder on host"
kill -9 $holder
wait $holder 2> /dev/null

# ---- a rank killed mid-run; SIGTERM ---------------------------------------------------------------
long=(--config tiny.json --data corpus.txt --steps 100000 --set train.log_interval=1)
ranks 2 "${long[@]}" --out killed > killed.log 2>&1 &
job=$!
for _ in $(seq 1 100); do grep -q "^step" killed.log && break; sleep 0.2; done
pkill -9 -n -f "^$exe .*--out killed"  # the newest rank (not mpirun)
start=$(date +%s)
wait $job
status=$?
[ "$status" -ne 0 ] || fail "a job with a killed rank exited 0"
[ $(($(date +%s) - start)) -le 20 ] || fail "a job with a killed rank took more than 20 s to end"

ranks 2 "${long[@]}" --out term > term.log 2>&1 &
job=$!
for _ in $(seq 1 100); do grep -q "^step" term.log && break; sleep 0.2; done
pkill -TERM -f "^$exe .*--out term"  # both ranks (not mpirun), as scancel does
wait $job
grep -q "interrupted: checkpoint saved at step" term.log || fail "SIGTERM: no save: $(tail -3 term.log)"
"$exe" --resume term --data corpus.txt --stop-after 1 > term_resume.log 2>&1 ||
  fail "the SIGTERM checkpoint does not resume: $(cat term_resume.log)"

[ "$failures" -eq 0 ] && echo "data-parallel CLI checks passed"
exit "$failures"
