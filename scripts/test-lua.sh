#!/usr/bin/env bash
# Lua tests: run every tests/lua/*_test.lua with luajit (JIT on) from the repo root,
# against build/lib/rsbalancer.so (package.cpath) and lua/resty/rsbalancer.lua
# (package.path). Each file ends with "N passed, M failed"; the last line here is
# the sum. Exits non-zero if any test failed or any file did not finish. Never
# skips: luajit and the built library are required.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

die() { echo "test-lua: $*" >&2; exit 1; }

LUAJIT="${LUAJIT:-luajit}"
command -v "$LUAJIT" >/dev/null 2>&1 ||
    die "$LUAJIT not found (install OpenResty's LuaJIT: apt-get install luajit2)"
[ -f build/lib/rsbalancer.so ] ||
    die "build/lib/rsbalancer.so is missing: run 'make build' first"
[ -f lua/resty/rsbalancer.lua ] || die "lua/resty/rsbalancer.lua is missing"

# Only the repo's library on the C path (no installed copy can be picked up); the
# default Lua path is kept after ours for LuaJIT's own jit.* modules.
export LUA_CPATH="$ROOT/build/lib/?.so"
export LUA_PATH="$ROOT/lua/?.lua;$ROOT/tests/lua/?.lua;;"

shopt -s nullglob
files=(tests/lua/*_test.lua)
[ "${#files[@]}" -gt 0 ] || die "no tests/lua/*_test.lua found"

passed=0
failed=0
broken=()
out="$(mktemp)"
trap 'rm -f "$out"' EXIT

for f in "${files[@]}"; do
    echo "== $f"
    "$LUAJIT" "$f" 2>&1 | tee "$out"
    rc=${PIPESTATUS[0]}
    line="$(grep -E '^[0-9]+ passed, [0-9]+ failed$' "$out" | tail -n 1)"
    if [ -z "$line" ]; then
        # Crashed or raised outside a test: count the file as one failure.
        echo "test-lua: $f exited with status $rc before its closing line" >&2
        failed=$((failed + 1))
        broken+=("$f")
        continue
    fi
    p="${line%% passed*}"
    m="${line#*passed, }"
    m="${m%% failed}"
    passed=$((passed + p))
    failed=$((failed + m))
    if [ "$m" -gt 0 ] || [ "$rc" -ne 0 ]; then
        broken+=("$f")
        if [ "$m" -eq 0 ]; then
            echo "test-lua: $f exited with status $rc" >&2
            failed=$((failed + 1))
        fi
    fi
done

echo
[ "${#broken[@]}" -gt 0 ] && echo "test-lua: failing files: ${broken[*]}"
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
