#!/bin/sh
# Keeps docs/ops.md complete: every graph node an op records (detail::record / pointwise<Op> with a
# literal name) must appear in the doc's node column, and every gradient test the doc names must exist
# as a TEST_CASE. Usage: check_ops_doc.sh REPO_ROOT
set -eu
root=$1
doc="$root/docs/ops.md"
status=0
for node in $(perl -0777 -ne 'while (/(?:record|pointwise(?:<[^>]*>)?)\([^"\[]*?"([a-z_]+)"/g) { print "$1\n" }' \
                "$root"/include/rex/ops/*.hpp | sort -u); do
  if ! grep -q "| \`$node\` |" "$doc"; then
    echo "docs/ops.md does not list the node '$node'"
    status=1
  fi
done
perl -ne 'next unless /^\|/; my @cols = split /\|/; print "$1\n" while ($cols[-2] // "") =~ /"([^"]+)"/g' \
  "$doc" | sort -u | while IFS= read -r name; do
  if ! grep -qF "TEST_CASE(\"$name\")" "$root"/tests/test_*.cpp; then
    echo "docs/ops.md names a test that does not exist: \"$name\""
    exit 1
  fi
done || status=1
[ $status -eq 0 ] && echo "docs/ops.md lists every op node and only existing tests"
exit $status
