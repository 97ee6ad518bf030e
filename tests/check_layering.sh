#!/bin/sh
# Keeps the layers pointing down: a header under include/rex/<layer>/ may include rex headers of its
# own layer and of the layers before it in
#   core -> backend -> autograd -> ops -> nn -> optim -> dist -> io -> data -> train
# (rex/rex.hpp, the umbrella, may include all). Within backend, cpu/ and cuda/ are siblings and do
# not include each other. kernels/ implements the CUDA backend and may include core and backend
# only. examples/ and bench/ use the public API: no rex::detail. Usage: check_layering.sh REPO_ROOT
set -eu
root=$1
order="core backend autograd ops nn optim dist io data train"
rank() {
  i=0
  for layer in $order; do
    [ "$layer" = "$1" ] && { echo $i; return; }
    i=$((i + 1))
  done
  echo 99
}
status=0
# Prints "file included" for every rex include of the files given.
rex_includes() {
  perl -ne 'print "$ARGV $1\n" if /^\s*#\s*include\s+"rex\/([^"]+)"/' "$@"
}
for file in $(find "$root/include/rex" -mindepth 2 -name '*.hpp' | sort); do
  path=${file#"$root/include/rex/"}
  layer=${path%%/*}
  own=$(rank "$layer")
  rex_includes "$file" | while read -r _ included; do
    target=${included%%/*}
    if [ "$(rank "$target")" -gt "$own" ]; then
      echo "include/rex/$path ($layer) includes rex/$included, a later layer ($target)"
      exit 1
    fi
    case "$path/$included" in
      backend/cpu/*/backend/cuda/* | backend/cuda/*/backend/cpu/*)
        echo "include/rex/$path includes rex/$included: backend/cpu and backend/cuda are siblings"
        exit 1 ;;
    esac
  done || status=1
done
for file in $(find "$root/kernels" -name '*.cu' -o -name '*.cuh' | sort); do
  rex_includes "$file" | while read -r _ included; do
    if [ "$(rank "${included%%/*}")" -gt "$(rank backend)" ]; then
      echo "${file#"$root/"} includes rex/$included: kernels/ may include core and backend only"
      exit 1
    fi
  done || status=1
done
hits=$(find "$root/examples" "$root/bench" -name '*.cpp' -exec grep -Hn 'detail::' {} + || true)
if [ -n "$hits" ]; then
  printf "%s\n" "$hits"
  echo "examples/ and bench/ reach into rex::detail (above): give them a public helper instead"
  status=1
fi
[ $status -eq 0 ] && echo "every include points down the layers; examples and bench use the public API"
exit $status
