#!/usr/bin/env bash
# The main job: installs what is missing (build tools, the King James Bible from Debian's bible-kjv,
# matplotlib), builds train_tiny_rex, trains the default R4 + PSR model on the Bible text into
# runs/tiny_rex (about five minutes on two cores), prints a sample, and plots the run to PNG.
# Extra arguments go to train_tiny_rex, e.g. --config examples/configs/dense.json --out runs/dense.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh bible-kjv python3-matplotlib
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release
cmake --build build -j "$(nproc)" --target train_tiny_rex
mkdir -p data
if [ ! -s data/kjv.txt ]; then
  echo "writing data/kjv.txt from bible-kjv"
  bible "Gen1:1-Rev22:21" > data/kjv.txt
fi
out=runs/tiny_rex
for ((i = 1; i <= $#; i++)); do
  if [ "${!i}" = "--out" ]; then j=$((i + 1)); out=${!j}; fi
done
build/examples/train_tiny_rex --config examples/configs/tiny_rex.json --data data/kjv.txt \
  --out runs/tiny_rex --overwrite --sample 300 "$@"
/usr/bin/python3 scripts/plot_run.py "$out" || echo "train.sh: plotting failed (the run itself is complete)"
