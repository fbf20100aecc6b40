#!/usr/bin/env bash
# fuzz-run.sh BIN_DIR TARGET SECONDS: run one libFuzzer target for SECONDS from its
# committed seeds (fuzz/seeds/TARGET) and its growing corpus (fuzz/corpus/TARGET,
# git-ignored); crash inputs go to fuzz/artifacts/TARGET/. Prints libFuzzer's final
# figures; exits non-zero on a crash, a panic or a failed invariant.
set -euo pipefail
bin="$1/$2"; target="$2"; secs="$3"
cd "$(dirname "$0")/.."
[ -x "$bin" ] || { echo "fuzz: $bin not built (make fuzz-build)" >&2; exit 1; }
mkdir -p "fuzz/corpus/$target" "fuzz/artifacts/$target" "fuzz/seeds/$target"
log="fuzz/artifacts/$target/last-run.log"
status=0
"$bin" "fuzz/corpus/$target" "fuzz/seeds/$target" \
    -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
    -artifact_prefix="fuzz/artifacts/$target/" >"$log" 2>&1 || status=$?
done_line=$(grep -E '^#[0-9]+.*DONE' "$log" | tail -1 || true)
runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
echo "fuzz $target: ${secs}s, ${runs:-?} executions; ${done_line:-no DONE line}"
if [ "$status" -ne 0 ]; then
    echo "fuzz $target: FAILED (exit $status); the input is under fuzz/artifacts/$target/, log $log:" >&2
    grep -E -A30 'panicked|ERROR: libFuzzer|deadly signal' "$log" | head -60 >&2 || tail -40 "$log" >&2
    exit 1
fi
