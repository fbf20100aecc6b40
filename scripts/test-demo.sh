#!/usr/bin/env bash
# `make test-demo`: what the README's first screen promises. Starts the demo
# (scripts/demo.sh, what `make run` runs) on free ports, runs `make demo-load`'s
# script against it (short phases), checks that every phase printed its answers and
# that clients got 200s from the nodes, then stops the demo and checks that no nginx
# process of it is left.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
die() { echo "test-demo: FAIL: $*" >&2; exit 1; }
# shellcheck source=scripts/free-port.sh
. "$ROOT/scripts/free-port.sh"

WORK=$(mktemp -d)
export GATEWAY_PORT NODE_A_PORT NODE_B_PORT NODE_C_PORT RSB_DEMO_DIR="$WORK/demo"
GATEWAY_PORT=$(free_port); NODE_A_PORT=$(free_port); NODE_B_PORT=$(free_port); NODE_C_PORT=$(free_port)
DEMO_PID=""
cleanup() {
    [ -n "$DEMO_PID" ] && kill -TERM "$DEMO_PID" 2>/dev/null || true
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

"$ROOT/scripts/demo.sh" >"$WORK/demo.out" 2>&1 &
DEMO_PID=$!
for _ in $(seq 100); do
    grep -q "rsbalancer demo running" "$WORK/demo.out" && break
    kill -0 "$DEMO_PID" 2>/dev/null || { cat "$WORK/demo.out" >&2; die "the demo exited"; }
    sleep 0.1
done
grep -q "make demo-load" "$WORK/demo.out" || die "the demo's banner does not mention make demo-load"

PHASE_S=2 CLIENTS=6 "$ROOT/scripts/demo-load.sh" >"$WORK/load.out" 2>&1 ||
    { cat "$WORK/load.out" >&2; die "demo-load failed"; }
cat "$WORK/load.out"
[ "$(grep -c '^== ' "$WORK/load.out")" -eq 3 ] || die "demo-load did not run its 3 phases"
# Every phase: some answers, and 200s from the nodes (X-Node set).
while read -r n ok; do
    [ "$n" -gt 0 ] && [ "$ok" -gt 0 ] || die "a phase had $n answers, $ok x 200"
done < <(sed -n 's/^   \([0-9]*\) answers, \([0-9]*\) x 200.*/\1 \2/p' "$WORK/load.out")
[ "$(grep -c ' answers, ' "$WORK/load.out")" -eq 3 ] || die "a phase printed no answer count"
grep -Eq '^ +200 +node a +[0-9]+' "$WORK/load.out" || die "no 200 from node a"

kill -TERM "$DEMO_PID"
wait "$DEMO_PID" 2>/dev/null || true
DEMO_PID=""
sleep 0.5
if pgrep -f "$RSB_DEMO_DIR" >/dev/null; then
    pgrep -fa "$RSB_DEMO_DIR" >&2
    die "nginx processes of the demo are left after it stopped"
fi
echo "test-demo: passed"
