#!/usr/bin/env bash
# End-to-end gateway benchmark (`make bench` runs it after the micro benchmarks):
# nginx's native upstream, the seed article's pure-Lua balancer and rsbalancer, each in
# its own nginx (2 workers) in front of upstream nodes run by another nginx, all on
# 127.0.0.1. Scenarios: overhead (static nodes, wrk), busy storm (mock LLM nodes
# with concurrency caps and one slow node), defaults (issue 11's storm, rsbalancer with
# its pool defaults), quota node (token bucket + Retry-After),
# metrics (the overhead run of rsbalancer twice, without and with GET /metrics every
# second: both req/s and their ratio).
# overload (1.5x capacity in three priority classes; rsbalancer with its admission queue).
# openloop (the overload nodes under an open loop: Poisson arrivals at 1.5x capacity,
# 20% / 30% / 50% X-Priority 9 / 5 / 2, sent on schedule however slow the answers;
# latency from the scheduled arrival; per class success, 5xx, 429, goodput, latency
# and queue wait; rsbalancer's non-2xx answers by status and admission reason).
# Prints tables; exits non-zero only when something is missing or a contender does
# not start (timings are never asserted). About 8 minutes on 2 CPUs.
#
#   scripts/bench-gateway.sh                   everything
#   scripts/bench-gateway.sh storm quota       some scenarios (overhead storm defaults quota metrics overload openloop)
#   scripts/bench-gateway.sh --quick           a ~1 minute smoke run
#
# Environment (all optional): RSB_BENCH_ROUNDS RSB_BENCH_OVERHEAD_ROUNDS RSB_BENCH_OVERHEAD_S RSB_BENCH_STORM_S
# RSB_BENCH_WARM_S RSB_BENCH_NATIVE_NOFAIL=0 RSB_BENCH_FAIL_PAUSE_MS RSB_BENCH_KEEP=1 (keep configs and logs)
# RSB_BENCH_OPEN_S (openloop: measured seconds, default 10, --quick 4) RSB_BENCH_OPEN_X (offered load
# as a multiple of capacity, default 1.5) RSB_BENCH_OPEN_TIMEOUT_S RSB_BENCH_OPEN_CONNS RSB_BENCH_OPEN_NICE
# NGINX NGINX_MODULES RSB_LUA_SO WRK; see benches/gateway.rs.
#
# The bench needs this entry in Cargo.toml (without it cargo builds benches/gateway.rs
# as a libtest bench and runs nothing):
#   [[bench]]
#   name = "gateway"
#   harness = false
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

die() { echo "bench-gateway: $*" >&2; exit 1; }

NGINX="${NGINX:-$(command -v nginx 2>/dev/null || echo /usr/sbin/nginx)}"
NGINX_MODULES="${NGINX_MODULES:-/usr/lib/nginx/modules}"
[ -x "$NGINX" ] || die "nginx not found (set NGINX=...; 'make deps' installs it)"
for m in ndk_http_module.so ngx_http_lua_module.so; do
    [ -f "$NGINX_MODULES/$m" ] || die "$NGINX_MODULES/$m missing (libnginx-mod-http-lua)"
done
RSB_LUA_SO="${RSB_LUA_SO:-$ROOT/build/lib/rsbalancer.so}"
[ -f "$RSB_LUA_SO" ] || die "$RSB_LUA_SO is missing: run 'make build' first"
command -v "${CARGO:-cargo}" >/dev/null 2>&1 || die "cargo not found"
command -v "${WRK:-wrk}" >/dev/null 2>&1 ||
    echo "bench-gateway: wrk not found: the overhead scenario uses the bench's own client" >&2

# The [[bench]] entry, with harness = false, must be in Cargo.toml.
awk '
    /^\[\[bench\]\]/ { if (inb && name == "gateway" && harness == "false") ok = 1; inb = 1; name = ""; harness = ""; next }
    /^\[/            { if (inb && name == "gateway" && harness == "false") ok = 1; inb = 0 }
    inb && /^[ \t]*name[ \t]*=/    { gsub(/[" \t]/, ""); sub(/^name=/, ""); name = $0 }
    inb && /^[ \t]*harness[ \t]*=/ { gsub(/[" \t]/, ""); sub(/^harness=/, ""); harness = $0 }
    END { if (inb && name == "gateway" && harness == "false") ok = 1; exit ok ? 0 : 1 }
' Cargo.toml || die 'Cargo.toml lacks the bench entry:
  [[bench]]
  name = "gateway"
  harness = false'

export NGINX NGINX_MODULES RSB_LUA_SO
# The bench starts and stops every nginx itself (also on Ctrl-C / SIGTERM, and each
# nginx master gets SIGTERM from the kernel should the bench process die).
exec "${CARGO:-cargo}" bench --no-default-features --bench gateway -- "$@"
