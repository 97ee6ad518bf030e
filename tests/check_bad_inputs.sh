#!/usr/bin/env bash
# The bad-input catalogue of train_tiny_rex (rex issue 13): every probe feeds the program something
# that is not what it claims to be and asserts, for each trial,
#   - a non-zero exit that is not a crash (status 1; a signal or an abort fails the trial),
#   - a message naming the problem (the file, key or value), and
#   - no existing file changed: every file of the run folder the trial points at has the same
#     sha256 after it as before (new files, such as a kept copy of a checkpoint, may appear; the
#     lock file .lock names the last process that locked the folder, so it may change).
# Probes: bad data (missing, empty, folder, /dev/zero, binary, too large), bad token shards (wrong
# magic or version, a count that disagrees with the size, a cut header, an odd-sized nanoGPT file,
# an empty folder or glob, an id at or above model.vocab_size), bad tokenizer.json (not byte-level
# BPE, a merge of unknown tokens or not of two parts, missing keys, duplicate ids), bad config (malformed
# JSON, unknown key, wrong type, impossible values), checkpoints truncated to several lengths or
# with a garbage header, kill -9 while checkpoints are written (the folder must still resume, or be
# refused cleanly; nothing torn), disk full on a small tmpfs (skipped when one cannot be mounted)
# and flipped bits in the tensor data (refused by the per-tensor checksums).
# Prints a table: probe, trials, clean. Usage: check_bad_inputs.sh PATH/TO/train_tiny_rex WORK_DIR
set -uo pipefail
umount "$(realpath -m "$2")/tmpfs" 2> /dev/null  # left mounted by a run that was killed
. "$(dirname "$0")/cli_common.sh" "$@"

declare -A trials clean
order=()
record() {  # record PROBE OK(0|1) WHY
  [ -n "${trials[$1]+x}" ] || { order+=("$1"); trials[$1]=0; clean[$1]=0; }
  trials[$1]=$((trials[$1] + 1))
  if [ "$2" -eq 0 ]; then
    clean[$1]=$((clean[$1] + 1))
  else
    echo "FAIL [$1]: $3"
    failures=$((failures + 1))
  fi
}
# The lock file (.lock) is left out: every run that locks the folder writes its PID there.
fingerprint() {
  (cd "$1" 2> /dev/null && find . -type f ! -name .lock -print0 | sort -z | xargs -0 -r sha256sum)
}
# unchanged FOLDER SUMS: every file FOLDER held (SUMS: its fingerprint then) is still there, unchanged.
unchanged() { [ -z "$2" ] || (cd "$1" && sha256sum --quiet -c - <<< "$2" > /dev/null 2>&1); }

# refused PROBE FOLDER WANT COMMAND...: COMMAND exits 1 saying WANT, and FOLDER is unchanged.
refused() {
  local probe=$1 folder=$2 want=$3
  shift 3
  local before output status
  before=$(fingerprint "$folder")
  output=$("$@" 2>&1)
  status=$?
  if [ $status -ne 1 ]; then
    record "$probe" 1 "'$*' exited with $status (want 1): $(tail -c 600 <<< "$output")"
  elif ! grep -qF -- "$want" <<< "$output"; then
    record "$probe" 1 "'$*' did not say '$want': $(tail -c 600 <<< "$output")"
  elif ! unchanged "$folder" "$before"; then
    record "$probe" 1 "'$*' changed files in $folder"
  else
    record "$probe" 0 ""
  fi
}

for i in $(seq 1 200); do
  echo "a bad input must be refused $((i % 7)) with a message that names it $((i % 3))."
done > corpus.txt
cat > tiny.json <<'EOF'
{"model": {"d_model": 16, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1, "context": 8},
 "moe": {"experts_per_layer": 2, "top_k": 1, "d_expert": 8, "reuse": 1},
 "train": {"steps": 4, "batch_size": 2, "warmup": 1, "log_interval": 2, "eval_interval": 4,
           "eval_batches": 1, "checkpoint_interval": 4}}
EOF
"$exe" --config tiny.json --data corpus.txt --out good > good.log 2>&1 ||
  { echo "the reference run failed: $(cat good.log)"; exit 1; }
ckpt_size=$(stat -c %s good/checkpoint.safetensors)
model_size=$(stat -c %s good/model.safetensors)
fresh() { rm -rf "$1" && cp -r good "$1"; }

# ---- bad data: refused whether it starts a run or resumes one ---------------------------------
: > empty.txt
mkdir -p folder.txt
head -c 3000 /dev/urandom > binary.bin && printf '\0' >> binary.bin
truncate -s 1100M huge.txt
for case in "missing.txt|does not exist" "empty.txt|is empty" "folder.txt|is not a regular file" \
  "/dev/zero|is not a regular file" "binary.bin|holds a NUL byte" "huge.txt|more than the limit"; do
  data=${case%%|*} want=${case#*|}
  refused "data" good "$want" "$exe" --resume good --data "$data"
  refused "data" good "$want" "$exe" --config tiny.json --data "$data" --out good --overwrite \
    --set data.format=text  # "auto" reads a folder or a .bin file as token shards (below)
  refused "data" good "$want" "$exe" --eval-only --checkpoint good --data "$data"
done

# ---- bad token shards: refused naming the file, the offset or key and what was expected --------
# Each is refused when it starts a run and when a run on good shards resumes or is evaluated.
python3 - << 'PY' || { echo "the shard writer failed"; exit 1; }
import os, struct
def llmc(path, tokens, version=1, magic=20240520, count=None, cut=None):
    data = struct.pack("<256i", magic, version, len(tokens) if count is None else count, *([0] * 253))
    data += struct.pack("<%d%s" % (len(tokens), "H" if version == 1 else "I"), *tokens)
    open(path, "wb").write(data[:cut])
os.makedirs("shards"), os.makedirs("no_shards")
llmc("shards/good_000000.bin", [i % 40 for i in range(400)])
llmc("bad_magic.bin", [1, 2, 3], magic=20240521)
llmc("bad_version.bin", [1, 2, 3], version=3)
llmc("count_above.bin", [1, 2, 3], count=4)
llmc("count_below.bin", [1, 2, 3], version=2, count=2)
llmc("cut_header.bin", [1, 2, 3], cut=100)
llmc("big_id.bin", [i % 40 for i in range(300)] + [70] + [1] * 99)
open("odd.bin", "wb").write(b"\x01\x00\x02\x00\x03")
PY
shard_config=(--config tiny.json --set model.vocab_size=64)
"$exe" "${shard_config[@]}" --data shards --out good_shards > good_shards.log 2>&1 ||
  { echo "the reference shard run failed: $(cat good_shards.log)"; exit 1; }
for case in "bad_magic.bin|bad_magic.bin: header[0] at offset 0 is 20240521, expected the llm.c magic 20240520" \
  "bad_version.bin|bad_version.bin: header[1] (version) at offset 4 is 3, expected 1 (uint16 tokens) or 2" \
  "count_above.bin|count_above.bin: header[2] at offset 8 says 4 tokens of 2 bytes, so the file should have 1032 bytes, but it has 1030 (truncated)" \
  "count_below.bin|count_below.bin: header[2] at offset 8 says 2 tokens of 4 bytes, so the file should have 1032 bytes, but it has 1036 (bytes after the last token)" \
  "cut_header.bin|cut_header.bin: truncated llm.c shard: 100 bytes, expected a header of 1024 bytes" \
  "no_shards|no_shards: the folder holds no token shards (expected *.bin files)" \
  "none_*.bin|none_*.bin: the glob matches no file (expected token shards)" \
  "big_id.bin|big_id.bin at byte offset 1624: token id 70 is not below model.vocab_size 64"; do
  data=${case%%|*} want=${case#*|}
  refused "token shards" good_shards "$want" "$exe" "${shard_config[@]}" --data "$data" \
    --set data.format=llmc --out good_shards --overwrite
  refused "token shards" good_shards "$want" "$exe" --resume good_shards --data "$data"
  refused "token shards" good_shards "$want" "$exe" --eval-only --checkpoint good_shards --data "$data"
done
# data.format "auto": the llm.c magic makes a file a shard, *.bin without it a nanoGPT file.
for case in "bad_version.bin|bad_version.bin: header[1] (version) at offset 4 is 3" \
  "cut_header.bin|cut_header.bin: truncated llm.c shard: 100 bytes" \
  "odd.bin|odd.bin: a nanoGPT .bin file holds uint16 token ids, so its size must be even; it has 5 bytes, the last id cut short at offset 4"; do
  refused "token shards" good_shards "${case#*|}" "$exe" "${shard_config[@]}" --data "${case%%|*}" \
    --out good_shards --overwrite
done
refused "token shards" good "data.validation names validation shards, but --data corpus.txt is text" \
  "$exe" --config tiny.json --data corpus.txt --set data.validation=shards --out good --overwrite
refused "token shards" good_shards "model.vocab_size must be set for token shards" "$exe" \
  --config tiny.json --data shards --out good_shards --overwrite
refused "token shards" good_shards 'data.format must be "auto", "text", "llmc" or "nanogpt", got "csv"' \
  "$exe" "${shard_config[@]}" --set data.format=csv --data shards --out good_shards --overwrite

# ---- bad tokenizer.json (data.tokenizer): refused naming the file, the key and what was expected --
# Each is refused when it starts a run; a run folder whose tokenizer.json went bad is refused by
# --eval-only, --sample and --resume (the checkpoint keeps its own copy, so the resume works).
python3 - << 'PY' || { echo "the tokenizer writer failed"; exit 1; }
import copy, json
printable = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
symbol, extra = {}, 0
for b in range(256):  # GPT-2's byte-to-character map
    symbol[b] = chr(b) if b in printable else chr(256 + extra)
    extra += b not in printable
vocab = {symbol[b]: b for b in range(256)}
vocab.update({"ba": 256, "Ġa": 257})
good = {"normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True},
        "decoder": {"type": "ByteLevel"},
        "model": {"type": "BPE", "vocab": vocab, "merges": ["b a", "Ġ a"]}}
def write(name, change):
    t = copy.deepcopy(good)
    change(t)
    json.dump(t, open(name, "w"), ensure_ascii=False)
write("tok_good.json", lambda t: None)
write("tok_wordpiece.json", lambda t: t["model"].update(type="WordPiece"))
write("tok_metaspace.json", lambda t: t.update(pre_tokenizer={"type": "Metaspace"}))
write("tok_unknown_merge.json", lambda t: t["model"]["merges"].append("a z"))
write("tok_three_parts.json", lambda t: t["model"]["merges"].append("b a a"))
write("tok_no_vocab.json", lambda t: t["model"].pop("vocab"))
write("tok_no_merges.json", lambda t: t["model"].pop("merges"))
write("tok_no_model.json", lambda t: t.pop("model"))
write("tok_duplicate_id.json", lambda t: t["model"]["vocab"].update(ba=5))
write("tok_missing_byte.json", lambda t: t["model"]["vocab"].update(Āa=t["model"]["vocab"].pop("Ā")))
open("tok_not_json.json", "w").write('{"model": ')
PY
for case in "tok_wordpiece.json|tok_wordpiece.json: key \"model.type\": expected \"BPE\", got \"WordPiece\"" \
  "tok_metaspace.json|tok_metaspace.json: key \"pre_tokenizer\": expected an object of \"type\": \"ByteLevel\"" \
  "tok_unknown_merge.json|tok_unknown_merge.json: key \"model.merges[2]\": expected tokens of model.vocab, but \"az\" is not one" \
  "tok_three_parts.json|tok_three_parts.json: key \"model.merges[2]\": expected two tokens separated by one space, got \"b a a\"" \
  "tok_no_vocab.json|tok_no_vocab.json: key \"model.vocab\": expected an object of token -> id, but it is missing" \
  "tok_no_merges.json|tok_no_merges.json: key \"model.merges\": expected an array of merges, but it is missing" \
  "tok_no_model.json|tok_no_model.json: key \"model\": expected an object, but it is missing" \
  "tok_duplicate_id.json|tok_duplicate_id.json: key \"model.vocab[\"ą\"]\": expected an id of its own (\"ba\" has id 5 too)" \
  "tok_missing_byte.json|tok_missing_byte.json: key \"model.vocab\": expected a token for each of the 256 bytes; byte 0" \
  "tok_not_json.json|tok_not_json.json" \
  "tok_absent.json|read_file: tok_absent.json: file does not exist"; do
  refused "tokenizer.json" good "config: data.tokenizer: ${case#*|}" "$exe" --config tiny.json \
    --data corpus.txt --set data.tokenizer="${case%%|*}" --out good --overwrite
done
"$exe" --config tiny.json --data corpus.txt --set data.tokenizer=tok_good.json --out good_bpe \
  > good_bpe.log 2>&1 || { echo "the reference BPE run failed: $(cat good_bpe.log)"; exit 1; }
cp tok_unknown_merge.json good_bpe/tokenizer.json
want='good_bpe/tokenizer.json: key "model.merges[2]": expected tokens of model.vocab'
refused "tokenizer.json" good_bpe "$want" "$exe" --eval-only --checkpoint good_bpe --data corpus.txt
refused "tokenizer.json" good_bpe "$want" "$exe" --sample 5 --checkpoint good_bpe

# ---- bad config: refused before --overwrite touches the folder --------------------------------
printf '{"model": {"d_model": 32,}}' > malformed.json
printf '{"model": {"d_modl": 32}}' > unknown_key.json
printf '{"train": {"steps": "many"}}' > wrong_type.json
printf '[1, 2]' > not_object.json
printf '{"moe": {"top_k": 3, "experts_per_layer": 2}}' > impossible.json
printf '{"train": {"lr": -1}}' > negative_lr.json
for case in "malformed.json|malformed.json:1:26: model: syntax error" \
  "unknown_key.json|unknown key \"model.d_modl\"" "wrong_type.json|train.steps" \
  "not_object.json|must be a JSON object" \
  "impossible.json|cannot exceed moe.experts_per_layer" "negative_lr.json|train.lr must be positive"; do
  refused "config" good "${case#*|}" "$exe" --config "${case%%|*}" --data corpus.txt --out good --overwrite
done
for set in "train.steps=-3|train.steps" "train.divergence_factor=1|train.divergence_factor" \
  "train.keep_checkpoints=0|train.keep_checkpoints" "moe.top_k=7|moe.top_k"; do
  refused "config" good "${set#*|}" "$exe" --config tiny.json --data corpus.txt --out good --overwrite --set "${set%%|*}"
done

# ---- truncated and garbage-header checkpoints ---------------------------------------------------
for length in 0 1 7 8 100 $((ckpt_size / 2)) $((ckpt_size - 1)); do
  fresh cut && truncate -s "$length" cut/checkpoint.safetensors
  refused "truncated checkpoint" cut "checkpoint.safetensors" "$exe" --resume cut --data corpus.txt
done
for length in 0 8 100 $((model_size / 2)) $((model_size - 1)); do
  fresh cut && truncate -s "$length" cut/model.safetensors
  refused "truncated model" cut "model.safetensors" "$exe" --eval-only --checkpoint cut --data corpus.txt
  refused "truncated model" cut "model.safetensors" "$exe" --sample 3 --checkpoint cut
done
for case in "checkpoint|--resume garbage" "model|--eval-only --checkpoint garbage"; do
  file=${case%%|*}
  fresh garbage && printf 'this is no JSON header at all' |
    dd of=garbage/$file.safetensors bs=1 seek=8 conv=notrunc 2> /dev/null
  refused "garbage header" garbage "$file.safetensors" "$exe" ${case#*|} --data corpus.txt
done

# ---- kill -9 while checkpoints are written: the folder resumes (or is refused), nothing torn ------
for delay in 0.4 0.7 1.0 1.3; do
  rm -rf killed
  "$exe" --config tiny.json --data corpus.txt --out killed --steps 100000 \
    --set train.checkpoint_interval=1 --set train.log_interval=1000 > killed.log 2>&1 &
  pid=$!
  sleep "$delay"
  kill -9 $pid 2> /dev/null
  wait $pid 2> /dev/null
  if [ ! -e killed/checkpoint.safetensors ]; then
    refused "kill -9" killed "does not exist" "$exe" --resume killed --data corpus.txt
    continue
  fi
  output=$("$exe" --resume killed --data corpus.txt --stop-after 1 --steps 100000 2>&1)
  status=$?
  if [ $status -ne 0 ] && [ $status -ne 1 ]; then
    record "kill -9" 1 "resume after kill -9 at ${delay}s exited with $status: $output"
  elif [ $status -eq 1 ] && ! grep -q "error:" <<< "$output"; then
    record "kill -9" 1 "resume after kill -9 at ${delay}s failed without a message: $output"
  elif ! "$exe" --eval-only --checkpoint killed --data corpus.txt > /dev/null 2>&1; then
    record "kill -9" 1 "the model folder after kill -9 at ${delay}s does not load"
  else
    record "kill -9" 0 ""
  fi
done

# ---- disk full: a small tmpfs that holds the run's first checkpoints but not its later ones ------
if mkdir -p tmpfs && mount -t tmpfs -o size=1m tmpfs tmpfs 2> /dev/null; then
  trap 'umount "$work/tmpfs" 2> /dev/null' EXIT
  for keep in 1 2; do
    rm -rf tmpfs/run
    output=$("$exe" --config tiny.json --data corpus.txt --out tmpfs/run --steps 100000 \
      --set train.checkpoint_interval=1 --set train.keep_checkpoints=$keep \
      --set train.log_interval=1000 --set train.eval_interval=100000 --stop-after 3 2>&1) ||
      record "disk full" 1 "the run on the tmpfs failed before the disk was full: $output"
    # Fill the disk to leave room for metrics.jsonl and the small files, not a checkpoint.
    avail=$(($(stat -f -c '%a * %S' tmpfs)))
    head -c $((avail - ckpt_size / 2)) /dev/zero > tmpfs/filler 2> /dev/null
    refused "disk full" tmpfs/run "No space left on device" \
      "$exe" --resume tmpfs/run --data corpus.txt --stop-after 1 --steps 100000
    rm -f tmpfs/filler tmpfs/run/*.tmp.*
    "$exe" --resume tmpfs/run --data corpus.txt --stop-after 1 --steps 100000 > /dev/null 2>&1 ||
      record "disk full" 1 "the run does not resume once space is free again (keep $keep)"
  done
  umount tmpfs
else
  echo "disk full: skipped (cannot mount a tmpfs here: not root, or no permission)"
fi

# ---- flipped bits in the tensor data: refused by the per-tensor checksums ----------------------
for case in "checkpoint|--resume flipped" "model|--eval-only --checkpoint flipped"; do
  file=${case%%|*}
  size=$(stat -c %s good/$file.safetensors)
  fresh flipped && printf '\x55' |
    dd of=flipped/$file.safetensors bs=1 seek=$((size - 5)) conv=notrunc 2> /dev/null
  refused "flipped bits" flipped "$file.safetensors" "$exe" ${case#*|} --data corpus.txt
done

printf '\n%-22s %7s %7s\n' probe trials clean
for probe in "${order[@]}"; do
  printf '%-22s %7d %7d\n' "$probe" "${trials[$probe]}" "${clean[$probe]}"
done
if [ $failures -ne 0 ]; then
  echo "$failures trial(s) failed"
  exit 1
fi
echo "bad-input catalogue: every trial refused cleanly"
