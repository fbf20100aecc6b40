#!/usr/bin/env bash
# LuaJIT micro benchmark: ns per pick+report through the FFI wrapper and through the
# mlua object, for every algorithm at 3 / 100 / 1,000 nodes, against the seed's
# pure-Lua weighted random. One luajit process, JIT on. Prints a table; exits 0 unless
# something is missing or the run crashes (timings are never asserted).
#
#   scripts/bench-lua.sh                  full run (a few minutes)
#   RSB_BENCH_QUICK=1 scripts/bench-lua.sh   ~10x shorter runs
#   RSB_BENCH_CLOCK=monotonic ...          wall time instead of process CPU time
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

die() { echo "bench-lua: $*" >&2; exit 1; }

LUAJIT="${LUAJIT:-luajit}"
command -v "$LUAJIT" >/dev/null 2>&1 ||
    die "$LUAJIT not found (install OpenResty's LuaJIT: apt-get install luajit2)"
[ -f build/lib/rsbalancer.so ] ||
    die "build/lib/rsbalancer.so is missing: run 'make build' first"

# Run against a snapshot of the library: `make build` rewrites build/lib/rsbalancer.so
# in place (cp), which kills a process that has it mapped (SIGBUS) mid-run.
SNAP="$(mktemp -d)"
trap 'rm -rf "$SNAP"' EXIT
cp build/lib/rsbalancer.so "$SNAP/rsbalancer.so"

export LUA_CPATH="$SNAP/?.so"
export LUA_PATH="$ROOT/lua/?.lua;$ROOT/benches/lua/?.lua;;"

echo "bench-lua: load average $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo '?'), $(nproc 2>/dev/null || echo '?') CPUs"
"$LUAJIT" -jon benches/lua/bench.lua
