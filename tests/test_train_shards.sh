#!/usr/bin/env bash
# End-to-end tests of examples/train_tiny_rex on token shards written here by a small Python writer
# (llm.c: a 256-int32 header, then uint16 or uint32 ids; nanoGPT: raw uint16 ids):
#  - a run on twelve llm.c shards of 9 to 40 tokens (a window is 17, so most windows cross a shard
#    boundary) stopped at step 3 and resumed ends with byte-identical model, checkpoint, config and metrics
#    (timing fields aside) as a run never stopped, and writes no vocab.json;
#  - the summary line counts the training and validation tokens the writer wrote, for an llm.c
#    folder (*_val_* validates), a nanoGPT folder (val.bin validates), a glob of uint32 shards with
#    data.validation, and one nanoGPT file split at train.train_fraction;
#  - --eval-only reproduces the final validation loss; --sample of a shard-trained model, at the end
#    of training or from its folder, is refused (no tokenizer) before any work;
#  - a sparse 1100 MiB nanoGPT file, above the 1 GiB limit of text, is mapped and trains.
# Usage: test_train_shards.sh PATH/TO/train_tiny_rex WORK_DIR
set -uo pipefail
. "$(dirname "$0")/cli_common.sh" "$@"

# Writes the shard sets and, in counts.txt, "NAME TOKENS" for every file written.
python3 - << 'EOF' || { echo "the shard writer failed"; exit 1; }
import os, random, struct
rng = random.Random(7)
counts = open("counts.txt", "w")

def ids(n, vocab):  # a learnable stream: runs of a rising pattern with some noise
    out, x = [], rng.randrange(vocab)
    for _ in range(n):
        x = (x + 3) % vocab if rng.random() < 0.8 else rng.randrange(vocab)
        out.append(x)
    return out

def llmc(path, tokens, version):
    with open(path, "wb") as f:
        f.write(struct.pack("<256i", 20240520, version, len(tokens), *([0] * 253)))
        f.write(struct.pack("<%d%s" % (len(tokens), "H" if version == 1 else "I"), *tokens))
    counts.write("%s %d\n" % (path, len(tokens)))

def nanogpt(path, tokens):
    with open(path, "wb") as f:
        f.write(struct.pack("<%dH" % len(tokens), *tokens))
    counts.write("%s %d\n" % (path, len(tokens)))

os.makedirs("llmc"), os.makedirs("nanogpt"), os.makedirs("wide")
for i, n in enumerate([23, 31, 9, 40, 17, 28, 35, 12, 26, 30, 19, 38]):
    llmc("llmc/tiny_train_%06d.bin" % (i + 1), ids(n, 60), 1)
llmc("llmc/tiny_val_000000.bin", ids(150, 60), 1)
nanogpt("nanogpt/train.bin", ids(700, 60))
nanogpt("nanogpt/val.bin", ids(90, 60))
for i in range(3):
    llmc("wide/part_%d.bin" % i, ids(200, 300), 2)
EOF
count() { awk -v f="$1" '$1 == f { print $2 }' counts.txt; }
sum() { local total=0; for f in "$@"; do total=$((total + $(count "$f"))); done; echo $total; }

cat > tiny.json << 'EOF'
{"model": {"vocab_size": 64, "d_model": 32, "n_layers": 2, "n_heads": 2, "n_kv_heads": 1,
           "context": 16},
 "moe": {"experts_per_layer": 2, "top_k": 2, "d_expert": 16, "reuse": 2},
 "train": {"steps": 8, "batch_size": 4, "warmup": 2, "log_interval": 2, "eval_interval": 4,
           "eval_batches": 2, "checkpoint_interval": 4}}
EOF
strip_timing() { sed -E 's/"(elapsed_s|tokens_per_s)":[^,}]*,?//g' "$1"; }
# expect_split LOG TRAIN VALIDATION: the summary line of LOG counts these tokens.
expect_split() {
  grep -qF "train $2 / validation $3 tokens" "$1" ||
    fail "$1 should count train $2 / validation $3 tokens: $(grep -E '^(data|corpus) ' "$1")"
}

# ---- resume equals uninterrupted, across shard boundaries ---------------------------------------
"$exe" --config tiny.json --data llmc --out whole > whole.log 2>&1 ||
  fail "uninterrupted run failed: $(cat whole.log)"
"$exe" --config tiny.json --data llmc --out split --stop-after 3 > split1.log 2>&1 ||
  fail "first half failed: $(cat split1.log)"
"$exe" --resume split --data llmc > split2.log 2>&1 || fail "resume failed: $(cat split2.log)"
grep -q "resuming at step 3 of 8" split2.log || fail "resume did not start at step 3: $(cat split2.log)"
for f in model.safetensors checkpoint.safetensors config.json; do
  cmp -s "whole/$f" "split/$f" || fail "whole/$f and split/$f differ"
done
[ "$(strip_timing whole/metrics.jsonl)" = "$(strip_timing split/metrics.jsonl)" ] ||
  fail "whole/metrics.jsonl and split/metrics.jsonl differ"
[ ! -e whole/vocab.json ] || fail "a run on token shards wrote a vocab.json"
grep -q '"format": "llmc"' whole/config.json || fail "config.json should record data.format llmc"
grep -qF "data llmc: 13 llmc shards" whole.log || fail "no shard summary: $(head -3 whole.log)"
expect_split whole.log "$(sum llmc/tiny_train_0000{01,02,03,04,05,06,07,08,09,10,11,12}.bin)" \
  "$(count llmc/tiny_val_000000.bin)"

# ---- evaluation; no sampling without a tokenizer -------------------------------------------------
final=$(grep '"kind":"eval"' whole/metrics.jsonl | tail -1 | sed -E 's/.*"val_loss":([^,}]*).*/\1/')
line=$("$exe" --eval-only --checkpoint whole --data llmc 2>&1) || fail "eval-only failed: $line"
got=$(sed -E 's/.*"val_loss":([^,}]*).*/\1/' <<< "$line")
[ "$got" = "$final" ] || fail "--eval-only gave val_loss $got, training logged $final"
for args in "--sample 10 --checkpoint whole" "--config tiny.json --data llmc --out sampled --sample 10"; do
  output=$("$exe" $args 2>&1)
  status=$?
  [ $status -eq 1 ] || fail "'$args' exited with $status (want 1): $output"
  grep -qF -- '--sample: the model was trained on token shards (data.format "llmc") and has no tokenizer' \
    <<< "$output" || fail "'$args' did not say why it cannot sample: $output"
done
[ ! -e sampled ] || fail "a run refused for --sample created its folder"

# ---- other layouts: nanoGPT's folder, a glob with data.validation, one file's tail ----------------
"$exe" --config tiny.json --data nanogpt --out nano --steps 4 > nano.log 2>&1 ||
  fail "nanoGPT run failed: $(cat nano.log)"
grep -qF "data nanogpt: 2 nanogpt shards" nano.log || fail "no nanoGPT summary: $(head -3 nano.log)"
expect_split nano.log "$(count nanogpt/train.bin)" "$(count nanogpt/val.bin)"
"$exe" --config tiny.json --data 'wide/part_*.bin' --set data.validation=wide/part_1.bin \
  --set model.vocab_size=300 --out wide_run --steps 4 > wide.log 2>&1 ||
  fail "uint32 glob run failed: $(cat wide.log)"
expect_split wide.log "$(sum wide/part_0.bin wide/part_2.bin)" "$(count wide/part_1.bin)"
n=$(count nanogpt/train.bin)
"$exe" --config tiny.json --data nanogpt/train.bin --out tail --steps 4 > tail.log 2>&1 ||
  fail "single-file run failed: $(cat tail.log)"
expect_split tail.log $((n * 9 / 10)) $((n - n * 9 / 10))

# ---- no size limit: a sparse nanoGPT file of 1100 MiB (text stops at 1 GiB) is mapped and trains ---
truncate -s 1100M big.bin
"$exe" --config tiny.json --data big.bin --out big --steps 2 > big.log 2>&1 ||
  fail "the 1100 MiB shard did not train: $(cat big.log)"
n=$((1100 * 1024 * 1024 / 2))
expect_split big.log $((n * 9 / 10)) $((n - n * 9 / 10))
rm -f big.bin
[ "$failures" -eq 0 ] && echo "all token shard checks passed" || exit 1
