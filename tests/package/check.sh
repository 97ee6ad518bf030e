#!/bin/sh
# Configures, builds and runs the consumer project in tests/package: check.sh BUILD_DIR [cmake args...]
set -e
here=$(dirname "$0")
build=$1
shift
rm -rf "$build"
cmake -S "$here" -B "$build" -DCMAKE_BUILD_TYPE=Release "$@" >/dev/null
cmake --build "$build" >/dev/null
"$build/consumer"
echo "consumer ran: ok"
