#!/usr/bin/env bash
# rex's byte-level BPE against the Hugging Face `tokenizers` library (installed into a throwaway
# venv when python3 lacks it; with no network the test is skipped, status 77, never failed):
#  - rex trains a tokenizer (prepare_shards --vocab-size) on tinyshakespeare and on a mixed text
#    (Latin-1 and CJK letters, digits, Unicode white space, punctuation, contractions); the library
#    loads rex's tokenizer.json and encodes each text to exactly the ids of rex's shards, and
#    decodes them back to the text;
#  - rex's tokenizer rewritten in the layout of GPT-2's file (no model type, an <|endoftext|> added
#    token, a ByteLevel post-processor) encodes a text with end-of-text markers as the library does;
#  - the library trains ByteLevel BPE tokenizers (with an added <|endoftext|> token, with and
#    without add_prefix_space) and rex (prepare_shards --tokenizer) encodes texts to exactly the
#    library's ids, <|endoftext|> included.
# Usage: test_bpe_hf.sh PATH/TO/prepare_shards WORK_DIR VENV_DIR CORPUS
set -uo pipefail
prepare=$(realpath "$1")
work=$(realpath -m "$2")
venv=$(realpath -m "$3")
corpus=$(realpath "$4") || { echo "SKIPPED: the corpus $4 is missing"; exit 77; }
rm -rf "$work" && mkdir -p "$work" && cd "$work" || exit 1

python=python3
if ! python3 -c "import tokenizers" 2> /dev/null; then
  python="$venv/bin/python"
  if ! "$python" -c "import tokenizers" 2> /dev/null; then
    rm -rf "$venv"
    python3 -m venv "$venv" > venv.log 2>&1 ||
      { echo "SKIPPED: python3 -m venv failed: $(tail -1 venv.log)"; exit 77; }
    timeout 300 "$venv/bin/pip" install --quiet tokenizers > pip.log 2>&1 ||
      { echo "SKIPPED: cannot pip install tokenizers (no network?): $(tail -1 pip.log)"; exit 77; }
  fi
fi
echo "tokenizers $("$python" -c "import tokenizers; print(tokenizers.__version__)")"

# Texts: the corpus; a mixed text; the corpus with <|endoftext|> between its paragraphs.
"$python" - "$corpus" << 'PY' || { echo "FAIL: writing the texts"; exit 1; }
import random, sys
rng = random.Random(5)
corpus = open(sys.argv[1], encoding="utf-8").read()
words = ["caf\u00e9", "na\u00efve", "\u00dcber", "stra\u00dfe", "\u6f22\u5b57", "\u304b\u306a",
         "don't", "we'll", "it's", "THEY'RE", "x2", "42", "3.14", "\u00bd", "\u00b2",
         "--", "...", "!?", "\u2014", "(a)", "#1", "\u00a0", "\t", "  ", "\n", "\n\n", " \n "]
mixed = "".join(rng.choice(words) + rng.choice([" ", " ", "", "\n", "  "]) for _ in range(20000))
open("mixed.txt", "w", encoding="utf-8").write(mixed)
paragraphs = corpus.split("\n\n")
open("eot.txt", "w", encoding="utf-8").write("<|endoftext|>".join(paragraphs[:400]))
PY

failures=0
fail() { echo "FAIL: $*"; failures=$((failures + 1)); }

# compare.py TOKENIZER TEXT SHARD_DIR: the library's ids of TEXT equal the shards' (train shards in
# order, then the validation shard), and decode back to TEXT when `roundtrip`.
cat > compare.py << 'PY'
import glob, struct, sys
from tokenizers import Tokenizer
tokenizer_file, text_file, shard_dir, roundtrip = sys.argv[1:5]
tok = Tokenizer.from_file(tokenizer_file)
text = open(text_file, encoding="utf-8").read()
theirs = tok.encode(text).ids
def shard(path):
    data = open(path, "rb").read()
    magic, version, count = struct.unpack("<3i", data[:12])
    assert magic == 20240520 and version in (1, 2), (path, magic, version)
    return list(struct.unpack("<%d%s" % (count, "H" if version == 1 else "I"), data[1024:]))
ours = []
for path in sorted(glob.glob(shard_dir + "/data_train_*.bin")) + [shard_dir + "/data_val_000000.bin"]:
    ours += shard(path)
if ours != theirs:
    first = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
    print("ids differ: rex %d ids, tokenizers %d; first difference at %d: rex %s, tokenizers %s"
          % (len(ours), len(theirs), first, ours[first:first + 5], theirs[first:first + 5]))
    sys.exit(1)
if roundtrip == "roundtrip" and tok.decode(ours) != text:
    print("the library's decode of rex's ids is not the text")
    sys.exit(1)
print("%s: %d ids agree" % (text_file, len(ours)))
PY

# rex trains, the library encodes.
for case in "$corpus 1024" "mixed.txt 400"; do
  set -- $case
  out=rex_$(basename "$1" .txt)
  "$prepare" --input "$1" --out "$out" --vocab-size "$2" --shard-tokens 100000 > "$out.log" 2>&1 ||
    { fail "prepare_shards on $1: $(cat "$out.log")"; continue; }
  grep -q "trained a tokenizer of $2 tokens" "$out.log" || fail "$1: not $2 tokens: $(cat "$out.log")"
  "$python" compare.py "$out/tokenizer.json" "$1" "$out" roundtrip ||
    fail "the library does not encode $1 as rex does"
done

# GPT-2's layout (no model type, "" affixes, a ByteLevel post-processor, <|endoftext|> as the last
# id), made from rex's tokenizer: the library and rex encode the text with end-of-text markers alike.
"$python" - "rex_$(basename "$corpus" .txt)/tokenizer.json" << 'PY' || fail "writing the GPT-2 layout"
import json, sys
t = json.load(open(sys.argv[1], encoding="utf-8"))
model = t["model"]
del model["type"], model["byte_fallback"], model["ignore_merges"]
model.update(continuing_subword_prefix="", end_of_word_suffix="")
eot = len(model["vocab"])
model["vocab"]["<|endoftext|>"] = eot
t["added_tokens"] = [{"id": eot, "special": True, "content": "<|endoftext|>", "single_word": False,
                      "lstrip": False, "rstrip": False, "normalized": True}]
t["pre_tokenizer"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True}
t["post_processor"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False}
json.dump(t, open("gpt2_layout.json", "w", encoding="utf-8"), ensure_ascii=False)
PY
"$prepare" --input eot.txt --out gpt2_eot --tokenizer gpt2_layout.json > gpt2_eot.log 2>&1 ||
  fail "prepare_shards --tokenizer gpt2_layout.json: $(cat gpt2_eot.log)"
"$python" compare.py gpt2_layout.json eot.txt gpt2_eot no ||
  fail "rex does not encode eot.txt with GPT-2's layout as the library does"

# The library trains, rex encodes.
for prefix in False True; do
  "$python" - "$corpus" "$prefix" << 'PY' || { fail "the library could not train (add_prefix_space $prefix)"; continue; }
import sys
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
tok = Tokenizer(models.BPE())
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=sys.argv[2] == "True")
tok.decoder = decoders.ByteLevel()
trainer = trainers.BpeTrainer(vocab_size=800, show_progress=False, special_tokens=["<|endoftext|>"],
                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
tok.train([sys.argv[1], "mixed.txt"], trainer)
tok.save("hf_%s.json" % sys.argv[2])
PY
  for text in eot.txt mixed.txt; do
    out=hf_${prefix}_$(basename "$text" .txt)
    "$prepare" --input "$text" --out "$out" --tokenizer "hf_$prefix.json" --shard-tokens 30000 \
      > "$out.log" 2>&1 || { fail "prepare_shards --tokenizer hf_$prefix.json: $(cat "$out.log")"; continue; }
    "$python" compare.py "hf_$prefix.json" "$text" "$out" no ||
      fail "rex does not encode $text as the library does (add_prefix_space $prefix)"
  done
done

[ "$failures" -eq 0 ] && echo "all checks passed" || echo "$failures check(s) failed"
[ "$failures" -eq 0 ]
