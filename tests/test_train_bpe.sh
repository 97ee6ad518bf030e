#!/usr/bin/env bash
# End-to-end tests of a byte-level BPE tokenizer in examples/train_tiny_rex, with the tokenizer and
# llm.c shards that examples/prepare_shards makes from a small text:
#  - prepare_shards writes tokenizer.json and shards holding as many tokens as it reports, and
#    refuses bad options (exit 1, nothing written);
#  - a run on the text with data.tokenizer = that tokenizer.json counts the same tokens, takes
#    model.vocab_size from it, keeps a byte-identical copy as tokenizer.json in its folder (no
#    vocab.json) and in its checkpoint: with the original file gone, a run stopped at step 3 resumes
#    to the same bytes as a run never stopped, --eval-only reproduces the final validation loss,
#    and --sample from the folder prints the same greedy text as the end of training did, made of
#    the text's characters only;
#  - a run on the shards with data.tokenizer samples (a shard run without one cannot), also with a
#    model vocabulary padded beyond the tokenizer's; a vocabulary smaller than it is refused.
# Usage: test_train_bpe.sh PATH/TO/train_tiny_rex PATH/TO/prepare_shards WORK_DIR
set -uo pipefail
prepare=$(realpath "$2")
. "$(dirname "$0")/cli_common.sh" "$1" "$3"

write_corpus > corpus.txt
"$prepare" --input corpus.txt --out bpe --vocab-size 300 --shard-tokens 1000 > prepare.log 2>&1 ||
  { echo "prepare_shards failed: $(cat prepare.log)"; exit 1; }
total=$(sed -nE 's/.* -> ([0-9]+) tokens in .*/\1/p' prepare.log)
shard_sum=$(sed -nE 's/^bpe\/data_(train|val)_[0-9]+\.bin: ([0-9]+) tokens$/\2/p' prepare.log |
  awk '{ sum += $1 } END { print sum }')
[ -n "$total" ] && [ "$total" = "$shard_sum" ] ||
  fail "prepare_shards reported $total tokens but its shards hold $shard_sum: $(cat prepare.log)"
[ "$(ls bpe/data_train_*.bin | wc -l)" -ge 2 ] || fail "expected several training shards: $(ls bpe)"
cp bpe/tokenizer.json given.json
"$prepare" --help | grep -qF -- "--vocab-size N" || fail "prepare_shards --help lists no options"
for case in "--vocab-size 100|the vocabulary size must be at least 256 (one token per byte), got 100" \
  "--vocab-size 300 --tokenizer given.json|give exactly one of --vocab-size N" \
  "--vocab-size 300 --val-fraction 1|--val-fraction expects a number between 0 and 1" \
  "--tokenizer corpus.txt|corpus.txt:"; do
  output=$("$prepare" --input corpus.txt --out refused ${case%%|*} 2>&1)
  [ $? -eq 1 ] && grep -qF -- "${case#*|}" <<< "$output" ||
    fail "prepare_shards ${case%%|*} should be refused saying '${case#*|}': $output"
done
[ ! -e refused ] || fail "a refused prepare_shards created its folder"

cat > tiny.json << 'EOF2'
{"model": {"d_model": 32, "n_layers": 2, "n_heads": 2, "n_kv_heads": 1, "context": 16},
 "moe": {"experts_per_layer": 2, "top_k": 2, "d_expert": 16, "reuse": 2},
 "train": {"steps": 8, "batch_size": 4, "warmup": 2, "log_interval": 2, "eval_interval": 4,
           "eval_batches": 2, "checkpoint_interval": 4}}
EOF2
strip_timing() { sed -E 's/"(elapsed_s|tokens_per_s)":[^,}]*,?//g' "$1"; }
sample_of() { sed -n '/^--- sample/,$p' "$1" | tail -n +2; }
bpe=(--config tiny.json --set data.tokenizer=given.json)

# ---- text with the BPE tokenizer: folder, resume, evaluation, sampling --------------------------
"$exe" "${bpe[@]}" --data corpus.txt --out whole --sample 40 --temperature 0 > whole.log 2>&1 ||
  fail "BPE text run failed: $(cat whole.log)"
n_train=$((total * 9 / 10))
grep -qF "corpus corpus.txt: $(stat -c %s corpus.txt) bytes, vocab 300, train $n_train / validation $((total - n_train)) tokens" \
  whole.log || fail "the summary should count $total tokens, vocab 300: $(grep '^corpus' whole.log)"
grep -q '"vocab_size": 300' whole/config.json || fail "config.json should say vocab_size 300"
cmp -s whole/tokenizer.json given.json || fail "whole/tokenizer.json is not a copy of given.json"
[ ! -e whole/vocab.json ] || fail "a BPE run wrote a vocab.json"
"$exe" "${bpe[@]}" --data corpus.txt --out split --stop-after 3 > split1.log 2>&1 ||
  fail "first half failed: $(cat split1.log)"
mv given.json away.json  # from here on only the run folders hold the tokenizer
"$exe" --resume split --data corpus.txt > split2.log 2>&1 || fail "resume failed: $(cat split2.log)"
for f in model.safetensors checkpoint.safetensors config.json tokenizer.json; do
  cmp -s "whole/$f" "split/$f" || fail "whole/$f and split/$f differ"
done
[ "$(strip_timing whole/metrics.jsonl)" = "$(strip_timing split/metrics.jsonl)" ] ||
  fail "whole/metrics.jsonl and split/metrics.jsonl differ"
final=$(grep '"kind":"eval"' whole/metrics.jsonl | tail -1 | sed -E 's/.*"val_loss":([^,}]*).*/\1/')
line=$("$exe" --eval-only --checkpoint whole --data corpus.txt 2>&1) || fail "eval-only failed: $line"
[ "$(sed -E 's/.*"val_loss":([^,}]*).*/\1/' <<< "$line")" = "$final" ] ||
  fail "--eval-only gave $line, training logged val_loss $final"
"$exe" --sample 40 --checkpoint whole --temperature 0 > sampled.txt 2> sample.err ||
  fail "--sample from the folder failed: $(cat sample.err)"
[ "$(cat sampled.txt)" = "$(sample_of whole.log)" ] ||
  fail "the folder's greedy sample differs from the one at the end of training"
[ "$(wc -c < sampled.txt)" -ge 41 ] || fail "40 tokens decode to at least 40 bytes: $(cat sampled.txt)"
stray=$(tr -d "$(fold -w1 corpus.txt | sort -u | tr -d '\n')\n" < sampled.txt)
[ -z "$stray" ] || fail "the sample holds characters that are not in the text: '$stray'"
mv away.json given.json

# ---- token shards with the tokenizer: sampling works, the vocabulary covers the tokenizer -------
"$exe" "${bpe[@]}" --data bpe --out shards --steps 4 > shards.log 2>&1 ||
  fail "shard run with data.tokenizer failed: $(cat shards.log)"
grep -q '"vocab_size": 300' shards/config.json || fail "the shard run should take vocab_size 300"
cmp -s shards/tokenizer.json given.json || fail "shards/tokenizer.json is not a copy of given.json"
"$exe" --sample 20 --checkpoint shards > shards_sample.txt 2>&1 ||
  fail "--sample of a shard run with a tokenizer failed: $(cat shards_sample.txt)"
"$exe" "${bpe[@]}" --set model.vocab_size=320 --data bpe --out padded --steps 2 --sample 20 \
  > padded.log 2>&1 || fail "a padded vocabulary (320 > 300) failed: $(cat padded.log)"
output=$("$exe" "${bpe[@]}" --set model.vocab_size=200 --data bpe --out small --steps 2 2>&1)
[ $? -eq 1 ] && grep -qF "config: model.vocab_size is 200 but given.json has 300 tokens; expected at least that many" \
  <<< "$output" || fail "a vocabulary below the tokenizer's was not refused as expected: $output"
output=$("$exe" --config tiny.json --set model.vocab_size=300 --data bpe --out bare --steps 2 \
  --sample 5 2>&1)
[ $? -eq 1 ] && grep -qF "name the tokenizer.json the shards were made with in data.tokenizer" \
  <<< "$output" || fail "a shard run without a tokenizer should refuse --sample: $output"
[ "$failures" -eq 0 ] && echo "all BPE training checks passed" || exit 1
