# Sourced by the end-to-end scripts (test_train_cli.sh, test_config_refusals.sh,
# test_train_minimal.sh, check_bad_inputs.sh) as `. cli_common.sh PROGRAM WORK_DIR`: sets exe (the
# program, absolute) and work (the folder, absolute), makes the folder afresh and enters it, and
# defines fail, which reports a failed check and counts it in $failures, and write_corpus, which
# prints a small text to train on (300 lines, 35 distinct).
exe=$(realpath "$1")
work=$(realpath -m "$2")
rm -rf "$work" && mkdir -p "$work" && cd "$work" || exit 1
failures=0
fail() { echo "FAIL: $*"; failures=$((failures + 1)); }
write_corpus() {
  for i in $(seq 1 300); do
    echo "the quick brown fox $((i % 7)) jumps over the lazy dog $((i % 5)); and then it rests."
  done
}
