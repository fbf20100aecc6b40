#!/usr/bin/env bash
# Pick + report measured inside an nginx worker (1 worker, JIT on), through the public
# Lua API, ns per pair, for every algorithm at 3 / 100 / 1,000 / 10,000 nodes, with
# the seed's pure-Lua pick and a no-op loop as baselines in the same run
# (benches/nginx/pick_bench.lua). Prints the table; asserts nothing about timing.
#
#   scripts/bench-nginx-pick.sh          (make bench runs it; a few minutes)
#   RSB_BENCH_QUICK=1 scripts/bench-nginx-pick.sh   ~10x shorter runs
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
die() { echo "bench-nginx-pick: $*" >&2; exit 1; }
NGINX="${NGINX:-$(command -v nginx 2>/dev/null || echo /usr/sbin/nginx)}"
NGINX_MODULES="${NGINX_MODULES:-/usr/lib/nginx/modules}"
[ -x "$NGINX" ] || die "nginx not found ('make deps' installs it)"
[ -f build/lib/rsbalancer.so ] || die "build/lib/rsbalancer.so is missing: run 'make build' first"

RUN="$(mktemp -d)"
chmod 755 "$RUN"
trap '[ -f "$RUN/nginx.pid" ] && kill "$(cat "$RUN/nginx.pid")" 2>/dev/null; sleep 0.5; rm -rf "$RUN"' EXIT
# A snapshot of the library: `make build` rewrites build/lib in place.
mkdir -p "$RUN/lib"
cp build/lib/rsbalancer.so "$RUN/lib/rsbalancer.so"
. scripts/free-port.sh
PORT=$(free_port)
sed -e "s|@MODULES@|$NGINX_MODULES|g" -e "s|@RUNTIME@|$RUN|g" -e "s|@PORT@|$PORT|g" \
    -e "s|@LUADIR@|$ROOT/lua|g" -e "s|@BENCHDIR@|$ROOT/benches|g" -e "s|@LIBDIR@|$RUN/lib|g" \
    benches/nginx/pick-bench.conf >"$RUN/nginx.conf"
"$NGINX" -p "$RUN" -c "$RUN/nginx.conf" -g 'daemon on;' || { cat "$RUN/error.log" >&2; die "nginx did not start"; }
for _ in $(seq 1 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break
    sleep 0.1
done
echo "bench-nginx-pick: load average $(cut -d' ' -f1-3 /proc/loadavg), $(nproc) CPUs"
q=""
[ -n "${RSB_BENCH_QUICK:-}" ] && q="?quick=1"
curl -sS --max-time 1800 "http://127.0.0.1:$PORT/run$q" || { cat "$RUN/error.log" >&2; die "the run failed"; }
grep -E '\[(error|crit|alert|emerg)\]' "$RUN/error.log" >&2 || true
