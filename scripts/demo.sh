#!/usr/bin/env bash
# `make run`: start three mock LLM nodes and the rsbalancer gateway (2 workers) in
# front of them, print what to try, and stop everything on Ctrl-C / SIGTERM.
#
# Environment (all optional):
#   GATEWAY_PORT=8080  NODE_A_PORT=9001  NODE_B_PORT=9002  NODE_C_PORT=9003
#   RSB_DEMO_DIR=build/demo       runtime dir: rendered configs, logs, pid files
#   NGINX=/usr/sbin/nginx         NGINX_MODULES=/usr/lib/nginx/modules
#
# The configs are templates in nginx-conf/demo/ (gateway.conf, mock-nodes.conf,
# rsbalancer.json); the @...@ placeholders are filled in here.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DEMO="$ROOT/nginx-conf/demo"
LIBDIR="$ROOT/build/lib"
GATEWAY_PORT=${GATEWAY_PORT:-8080}
NODE_A_PORT=${NODE_A_PORT:-9001}
NODE_B_PORT=${NODE_B_PORT:-9002}
NODE_C_PORT=${NODE_C_PORT:-9003}
RUNTIME=${RSB_DEMO_DIR:-$ROOT/build/demo}
NGINX=${NGINX:-$(command -v nginx 2>/dev/null || echo /usr/sbin/nginx)}
NGINX_MODULES=${NGINX_MODULES:-/usr/lib/nginx/modules}

die() { echo "demo: $*" >&2; exit 1; }
[ -x "$NGINX" ] || die "nginx not found (set NGINX=...; make deps installs it)"
[ -f "$LIBDIR/rsbalancer.so" ] || die "$LIBDIR/rsbalancer.so missing: run make build"
for m in ndk_http_module.so ngx_http_lua_module.so; do
    [ -f "$NGINX_MODULES/$m" ] || die "$NGINX_MODULES/$m missing (libnginx-mod-http-lua)"
done

mkdir -p "$RUNTIME/tmp"
RUNTIME=$(cd "$RUNTIME" && pwd)
# Started as root, nginx runs its workers as `nobody`, who may not be able to read a
# checkout under a 0700 home: run them as root instead (a demo on 127.0.0.1).
USER_LINE=""
[ "$(id -u)" -eq 0 ] && USER_LINE="user root;"

render() { # template output
    sed -e "s|@USER@|$USER_LINE|g" -e "s|@MODULES@|$NGINX_MODULES|g" \
        -e "s|@RUNTIME@|$RUNTIME|g" -e "s|@REPO@|$ROOT|g" -e "s|@DEMO@|$DEMO|g" \
        -e "s|@LIBDIR@|$LIBDIR|g" -e "s|@CONFIG@|$RUNTIME/rsbalancer.json|g" \
        -e "s|@PORT@|$GATEWAY_PORT|g" -e "s|@PORT_A@|$NODE_A_PORT|g" \
        -e "s|@PORT_B@|$NODE_B_PORT|g" -e "s|@PORT_C@|$NODE_C_PORT|g" "$1" >"$2"
}
render "$DEMO/mock-nodes.conf" "$RUNTIME/mock-nodes.conf"
render "$DEMO/gateway.conf" "$RUNTIME/gateway.conf"
render "$DEMO/rsbalancer.json" "$RUNTIME/rsbalancer.json"

for conf in mock-nodes.conf gateway.conf; do
    "$NGINX" -q -t -p "$RUNTIME" -c "$conf" -e stderr || die "$RUNTIME/$conf does not pass nginx -t"
done

# Each nginx runs as a background job in its own process group (job control on), so
# that stopping one group stops its master and workers, and so that a Ctrl-C reaches
# this script (whose trap stops both) rather than the nginx processes directly.
set -m
MOCK_PID="" GATEWAY_PID=""
stopped=0
stop() {
    [ "$stopped" -eq 1 ] && return
    stopped=1
    trap '' INT TERM
    echo
    echo "demo: stopping"
    local pid pids=()
    for pid in $GATEWAY_PID $MOCK_PID; do
        kill -TERM -- "-$pid" 2>/dev/null && pids+=("$pid")
    done
    # nginx's fast shutdown: the master stops its workers, then exits.
    for _ in $(seq 50); do
        local alive=0
        for pid in "${pids[@]}"; do kill -0 -- "-$pid" 2>/dev/null && alive=1; done
        [ "$alive" -eq 0 ] && break
        sleep 0.1
    done
    for pid in "${pids[@]}"; do kill -KILL -- "-$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    echo "demo: stopped (logs in $RUNTIME)"
}
trap 'stop; exit 130' INT
trap 'stop; exit 143' TERM
trap 'stop' EXIT

"$NGINX" -p "$RUNTIME" -c mock-nodes.conf -g 'daemon off; master_process on;' &
MOCK_PID=$!
for port in "$NODE_A_PORT" "$NODE_B_PORT" "$NODE_C_PORT"; do
    for _ in $(seq 50); do
        (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
        kill -0 "$MOCK_PID" 2>/dev/null || die "mock nodes exited: see $RUNTIME/mock-nodes-error.log"
        sleep 0.1
    done
done

"$NGINX" -p "$RUNTIME" -c gateway.conf -g 'daemon off; master_process on;' &
GATEWAY_PID=$!
for _ in $(seq 50); do
    (exec 3<>"/dev/tcp/127.0.0.1/$GATEWAY_PORT") 2>/dev/null && break
    kill -0 "$GATEWAY_PID" 2>/dev/null || die "gateway exited: see $RUNTIME/gateway-error.log"
    sleep 0.1
done

G="http://127.0.0.1:$GATEWAY_PORT"
BODY='{"model":"mock-llm","messages":[{"role":"user","content":"Hello"}]}'
SBODY='{"model":"mock-llm","stream":true,"messages":[{"role":"user","content":"Hello"}]}'
cat <<EOF

rsbalancer demo running (Ctrl-C stops everything)
  gateway   $G  (2 workers, pool "llm": a=30 b=50 c=20, p2c_ewma)
  nodes     a 127.0.0.1:$NODE_A_PORT (40 ms, max 8 in flight -> 429)
            b 127.0.0.1:$NODE_B_PORT (60 ms, 20 req/s quota -> 429 + Retry-After)
            c 127.0.0.1:$NODE_C_PORT (slow: 1.5 s)
  runtime   $RUNTIME (rendered configs, *-error.log, gateway-access.log)

Try:
  # a chat completion (X-Node: which node answered, X-Worker: which gateway worker)
  curl -si $G/v1/chat/completions -H 'Content-Type: application/json' -d '$BODY'

  # streaming (server-sent events)
  curl -sN $G/v1/chat/completions -H 'Content-Type: application/json' -d '$SBODY'

  # per-node counters, shared by all workers
  curl -s $G/rsbalancer/stats

  # everything the balancer learned: EWMA, learned limits, cooldowns, state (admin API)
  curl -s $G/rsbalancer/

  # Prometheus metrics (nginx-conf/prometheus/: scrape config, alerts, dashboard)
  curl -s $G/metrics | grep -v '^#' | grep 'pool="llm"' | head -40

  # the live status page: open $G/rsbalancer/status in a browser on this machine

  # change a node's weight, drain it, put it back (every worker follows at once)
  curl -s -X PUT $G/rsbalancer/pools/llm/nodes/c -d '{"weight": 80}'
  curl -s -X PUT $G/rsbalancer/pools/llm/nodes/c -d '{"drain": true}'
  curl -s -X PUT $G/rsbalancer/pools/llm/nodes/c -d '{"drain": false}'

  # make node b answer 503 (fail=close drops connections; fail= restores it)
  curl -s -X POST '127.0.0.1:$NODE_B_PORT/mock/set?fail=503'

  # one request after another all go to node a: idle, it is the fastest, and
  # p2c_ewma weighs latency and load, not weights alone
  for i in \$(seq 20); do curl -s -o /dev/null -D - $G/v1/chat/completions -d '$BODY' | grep -i '^x-node'; done | sort | uniq -c

  # concurrent load, in phases, with what each shows (weights, a's limit, b's quota,
  # the slow node c as overflow, b failing with 503): in another terminal
  make demo-load

EOF

# `wait` returns early when a trapped signal arrives, so the trap runs at once.
wait "$GATEWAY_PID" || true
echo "demo: gateway exited (see $RUNTIME/gateway-error.log)" >&2
exit 1
