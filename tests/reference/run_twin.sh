#!/bin/sh
# Runs one twin comparison: dump_rex writes a model, a batch and rex's results for one training
# step into OUT, then twin.py rebuilds the model in PyTorch and compares everything.
# Usage: run_twin.sh DUMP_REX OUT STEP [dump_rex --set args...] [-- twin.py args...]
# Prints "SKIPPED: ..." (CTest reports the test as skipped) when PyTorch is not installed.
set -eu
dump=$1 out=$2 step=$3
shift 3
here=$(dirname "$0")
if ! /usr/bin/python3 -c "import torch" 2>/dev/null; then
  echo "SKIPPED: python3-torch is not installed (sudo apt-get install python3-torch)"
  exit 0
fi
sets=""
while [ $# -gt 0 ] && [ "$1" != "--" ]; do sets="$sets --set $1"; shift; done
[ $# -gt 0 ] && shift
rm -rf "$out" && mkdir -p "$out"
# shellcheck disable=SC2086
"$dump" --config "$here/twin_base.json" --step "$step" --out "$out" $sets
/usr/bin/python3 "$here/twin.py" "$out" "$@"
