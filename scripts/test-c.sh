#!/usr/bin/env bash
# C ABI tests: compile tests/c/test_abi.c against build/lib/librsbalancer.so with
# strict warnings, then run it under valgrind. Fails (non-zero) on a compile error, a
# failed check, a valgrind error or a definite leak. Never skips: gcc and valgrind are
# required.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

die() { echo "test-c: $*" >&2; exit 1; }

command -v gcc >/dev/null 2>&1 || die "gcc not found (install it: apt-get install gcc)"
command -v valgrind >/dev/null 2>&1 || die "valgrind not found (install it: apt-get install valgrind)"

LIB="$ROOT/build/lib"
[ -f "$LIB/librsbalancer.so" ] || die "$LIB/librsbalancer.so is missing: run 'make build' first"
[ -f include/rsbalancer.h ] || die "include/rsbalancer.h is missing"

CFLAGS=(-std=c11 -Wall -Wextra -Werror -pedantic -I include)
BIN="$ROOT/build/test_abi"
mkdir -p "$ROOT/build"

# 1. The header on its own, as C and C++ programs that include nothing else see it.
echo "test-c: checking that include/rsbalancer.h compiles on its own (C and C++)"
printf '#include "rsbalancer.h"\nint main(void) { return 0; }\n' |
    gcc "${CFLAGS[@]}" -fsyntax-only -x c - || die "include/rsbalancer.h does not compile as C"
if command -v g++ >/dev/null; then
    printf '#include "rsbalancer.h"\nint main() { return 0; }\n' |
        g++ -std=c++11 -Wall -Wextra -Werror -pedantic -I include -fsyntax-only -x c++ - ||
        die "include/rsbalancer.h does not compile as C++"
fi

# 2. The ABI tests.
echo "test-c: compiling $BIN"
gcc "${CFLAGS[@]}" tests/c/test_abi.c \
    -L "$LIB" -lrsbalancer -Wl,-rpath,"$LIB" -o "$BIN" \
    || die "compilation of tests/c/test_abi.c failed"

echo "test-c: running under valgrind"
start=$(date +%s.%N)
status=0
valgrind --error-exitcode=99 --leak-check=full --errors-for-leak-kinds=definite \
    --track-fds=no -q "$BIN" || status=$?
end=$(date +%s.%N)
elapsed=$(awk -v s="$start" -v e="$end" 'BEGIN { printf "%.1f", e - s }')

if [ "$status" -eq 99 ]; then
    die "valgrind reported errors or definite leaks (${elapsed}s)"
elif [ "$status" -ne 0 ]; then
    die "test_abi failed with exit status $status (${elapsed}s)"
fi
echo "test-c: ok (${elapsed}s under valgrind)"
