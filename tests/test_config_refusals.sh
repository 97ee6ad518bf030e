#!/usr/bin/env bash
# Bad configs and oversize models are refused by examples/train_tiny_rex before any work is done:
# exit status 1 (not a crash, not a hang), a message naming the key or the file (for JSON, the
# file's line and column and the key path too), within seconds, and no checkpoint written. Also: config.json is in the run folder before the first step.
# Usage: test_config_refusals.sh PATH/TO/train_tiny_rex WORK_DIR
set -uo pipefail
. "$(dirname "$0")/cli_common.sh" "$@"

for i in $(seq 1 100); do echo "the quick brown fox $((i % 7)) jumps over the lazy dog."; done > corpus.txt

# refused "WANTED TEXT" ARGS...: the run exits with status 1 within 30 s, its message holds the
# wanted text, and it wrote no checkpoint.
refused() {
  local want=$1
  shift
  rm -rf out
  timeout 30 "$exe" --data corpus.txt --out out "$@" > log.txt 2>&1
  local status=$?
  [ "$status" -eq 1 ] || fail "$* exited with $status, not 1: $(tail -c 400 log.txt)"
  grep -qF -- "$want" log.txt || fail "$*: the message lacks '$want': $(tail -c 400 log.txt)"
  [ ! -e out/checkpoint.safetensors ] || fail "$*: a checkpoint was written"
}

# Text that is not UTF-8, on the command line and in a file, in any string key (also one that a
# dense model does not use).
refused "psr.schedule: the value is not valid UTF-8" --set "psr.schedule=$(printf 'linear\xff')"
refused "model.ffn: the value is not valid UTF-8" --set "model.ffn=$(printf '\xc3')"
refused 'psr.schedule must be "none", "linear" or "stepwise"' --set model.ffn=dense \
  --set psr.schedule=cosine
refused 'psr.masks must be "random" or "own_first"' --set psr.masks=own
refused 'psr.mask_scope must be "step", "sequence" or "token", got "batch"' \
  --set psr.mask_scope=batch
refused 'psr.tie_block shares one mask among the layers of a block' --set psr.tie_block=true \
  --set psr.masks=own_first
refused 'moe.gating must be "softmax_topk" or "topk_softmax", got "softmax"' --set moe.gating=softmax
refused 'moe.renormalize has nothing to do with moe.gating = "topk_softmax"' \
  --set moe.gating=topk_softmax --set moe.renormalize=true
printf '{"psr": {"schedule": "lin\xe9ar"}}' > latin1.json
refused "latin1.json:1:27: psr.schedule: syntax error while parsing value - invalid string: ill-formed UTF-8 byte" \
  --config latin1.json

# Numbers beyond double range, repeated keys, and values beyond float range. A JSON refusal names
# the file (or --set key), the line and column, and the key path.
printf '{\n  "model": {"d_model": 32},\n  "train": {"lr": 1e999}\n}\n' > overflow.json
refused "overflow.json:3:19: train.lr: number overflow parsing '1e999'" --config overflow.json
echo '{"model": {"d_model": 32, "n_heads": 2, "d_model": 64}}' > repeated.json
refused 'repeated.json:1:41: model.d_model: key appears twice in one object' --config repeated.json
echo '{"train": {"lr": 1e-3}, "train": {"lr": 1e-2}}' > repeated_section.json
refused 'repeated_section.json:1:25: train: key appears twice' --config repeated_section.json
refused "model.init_std = 1e+300 is not a finite number within float range" --set model.init_std=1e300
refused "moe.aux_loss_coef = 1e+300 is not a finite number" --set moe.aux_loss_coef=1e300
refused "model.rope_theta = 1e+300 is not a finite number" --set model.rope_theta=1e300
refused "--set model.init_std:1:1: number overflow parsing '1e999'" --set model.init_std=1e999
refused "--set moe.top_k:1:2: syntax error" --set "moe.top_k=2}"

# A model too big for the machine: refused with the estimate and the keys, not allocated.
refused "moe.experts_per_layer" --set moe.experts_per_layer=1000000
grep -q "GiB of memory of this machine" log.txt || fail "no memory figures: $(cat log.txt)"
refused "mostly the embeddings (model.vocab_size x model.d_model)" --set model.vocab_size=100000000000

# A model folder whose config.json or vocab.json overflows a number or repeats a key.
mkdir -p folder
echo '{"train": {"lr": 1e999}}' > folder/config.json
timeout 30 "$exe" --sample 3 --checkpoint folder > log.txt 2>&1
[ $? -eq 1 ] && grep -qF "folder/config.json:1:18: train.lr: number overflow parsing '1e999'" log.txt ||
  fail "number overflow in config.json: $(cat log.txt)"
echo '{}' > folder/config.json
echo '{"type": "char", "type": "char", "vocabulary": [97]}' > folder/vocab.json
timeout 30 "$exe" --sample 3 --checkpoint folder > log.txt 2>&1
[ $? -eq 1 ] && grep -qF 'folder/vocab.json:1:18: type: key appears twice' log.txt ||
  fail "repeated key in vocab.json: $(cat log.txt)"
echo '{"type": "char", "vocabulary": [1e999]}' > folder/vocab.json
timeout 30 "$exe" --sample 3 --checkpoint folder > log.txt 2>&1
[ $? -eq 1 ] && grep -qF "folder/vocab.json:1:33: vocabulary[0]: number overflow parsing '1e999'" log.txt ||
  fail "number overflow in vocab.json: $(cat log.txt)"

# A JSON file far too large to be a config (a wrong path): refused by its size before it is read,
# not read until memory runs out (a sparse 8 GiB file: no disk is used).
truncate -s 8G huge.json
timeout 30 "$exe" --data corpus.txt --out out_huge --config huge.json > log.txt 2>&1
[ $? -eq 1 ] && grep -qF "huge.json: is 8589934592 bytes or more, above the 67108864" log.txt ||
  fail "an 8 GiB --config: $(cat log.txt)"
rm -f huge.json

# config.json is written before the first step: a run that fails right after starting (its
# metrics.jsonl cannot be created) has already left a config.json that parses back.
rm -rf out && mkdir -p out/metrics.jsonl
timeout 30 "$exe" --data corpus.txt --out out --set train.steps=2 --set train.warmup=1 > log.txt 2>&1
[ $? -eq 1 ] || fail "a run whose metrics.jsonl is a folder did not fail: $(cat log.txt)"
grep -q '"d_model": 128' out/config.json 2>/dev/null || fail "no config.json before the first step"

[ "$failures" -eq 0 ] && echo "ok: every bad config was refused" || exit 1
