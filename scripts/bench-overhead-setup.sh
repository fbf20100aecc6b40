# Sourced by scripts/bench-instructions.sh and scripts/bench-throughput.sh: the
# gateways of scripts/bench-gateway.sh's overhead scenario, rendered (a --quick run
# with RSB_BENCH_KEEP=1) into $RUN, the static nodes started, and the floor
# contenders derived from the seed's config:
#   ovh-floor0  a balancer_by_lua that only sets a fixed peer (the first static node)
#   ovh-floor1  the same plus an empty log_by_lua: what any balancer with
#               per-response feedback pays at least
#   ovh-floor2  ovh-floor1 plus two locations GET / never enters, a named one with an
#               empty access_by_lua (as the gateway's @rsb_round) and a content_by_lua
#               one (as its /metrics): lua-nginx-module then runs its access handler
#               and its subrequest-capture header and body filters on every request
#               of the server, whatever the location
# Gateways: ovh-gw0 native upstream, ovh-gw1 rsbalancer p2c_ewma, ovh-gw2 rsbalancer
# weighted_random, ovh-gw3 the seed's Lua weighted random, ovh-floor0..2, and the
# references ovh-spread, ovh-bare and ovh-least (overhead_references).
# Needs `die` (and gcc, for ovh-bare); sets RUN, PEER_PORT; the caller's EXIT trap
# should call overhead_cleanup.

# Dies unless every command named is on PATH.
overhead_need() {
    local c
    for c in "$@"; do
        command -v "$c" >/dev/null || die "$c not found ('make deps' installs it)"
    done
}

overhead_setup() {
    local log
    log=$(mktemp)
    RSB_BENCH_KEEP=1 RSB_BENCH_OVERHEAD_S=1 scripts/bench-gateway.sh --quick overhead >"$log" 2>&1 ||
        { cat "$log"; die "bench-gateway.sh failed"; }
    RUN=$(sed -n 's/.*configs and logs kept in //p' "$log")
    rm -f "$log"
    [ -d "$RUN" ] || die "no run directory from bench-gateway.sh"
    nginx -p "$RUN" -c "$RUN/ovh-nodes.conf" -g 'daemon on;' 2>/dev/null ||
        die "static nodes did not start"
    PEER_PORT=$(grep -o 'listen 127.0.0.1:[0-9]*' "$RUN/ovh-nodes.conf" | head -1 | cut -d: -f2)
    [ -n "$PEER_PORT" ] || die "no static node port in ovh-nodes.conf"
    [ -f "$RUN/ovh-gw3.conf" ] || die "no seed gateway config to derive the floor from"
    sed -e 's/contender "seed"/contender "floor0"/' \
        -e "s|require(\"seed_balancer\").balance(.*)|require(\"ngx.balancer\").set_current_peer(\"127.0.0.1\", $PEER_PORT)|" \
        -e 's|require("seed_balancer").init(.*)||' -e 's|require("seed_balancer").init_worker()||' \
        "$RUN/ovh-gw3.conf" >"$RUN/ovh-floor0.conf"
    sed -e 's/contender "floor0"/contender "floor1"/' \
        -e 's|proxy_pass http://llm;|proxy_pass http://llm;\n            log_by_lua_block { }|' \
        "$RUN/ovh-floor0.conf" >"$RUN/ovh-floor1.conf"
    cat >"$RUN/floor2-locations.conf" <<'LOCATIONS'

        # Off the path of GET /: their Lua phases make lua-nginx-module run its
        # handlers on every request (the gateway's @rsb_round and /metrics do).
        location @round {
            access_by_lua_block { }
            proxy_pass http://llm;
        }
        location = /metrics {
            content_by_lua_block { ngx.say("") }
        }
LOCATIONS
    sed -e 's/contender "floor1"/contender "floor2"/' \
        -e "/^            log_by_lua_block { }\$/{n;r $RUN/floor2-locations.conf" -e '}' \
        "$RUN/ovh-floor1.conf" >"$RUN/ovh-floor2.conf"
    grep -q 'location @round' "$RUN/ovh-floor2.conf" || die "ovh-floor2: no place for its locations"
    overhead_references
}

# Three references that split the gap between the floor and rsbalancer:
#   ovh-spread  ovh-floor1 with its fixed peer turned round robin over the three static
#               nodes: what going to three nodes costs by itself (nginx's keepalive cache
#               is searched by address, one connection pool for all three)
#   ovh-bare    ovh-floor1 with the least per-response feedback any shared-memory
#               balancer can have, in C, not rsbalancer (benches/nginx/bare_feedback.c
#               and .lua: a weighted random pick over the three nodes counted in flight,
#               a report that uncounts it and feeds a decaying latency average, in an
#               anonymous shared mapping the master makes; atomics, no locks, no
#               request state)
#   ovh-least   the rsbalancer weighted_random gateway (ovh-gw2: its config, pool and
#               locations) with balance() and log() replaced by the least feedback
#               through the library (benches/nginx/rsb_least.lua: one pick and one
#               report per request, no request state)
overhead_references() {
    local ports
    ports=$(grep -o 'listen 127.0.0.1:[0-9]*' "$RUN/ovh-nodes.conf" | cut -d: -f2 | paste -sd, -)
    sed -e 's/contender "floor1"/contender "spread"/' \
        -e "s|^    init_by_lua_block {|    init_by_lua_block {\n        SPREAD = { n = 0, ports = { $ports } }|" \
        -e "s|require(\"ngx.balancer\").set_current_peer(\"127.0.0.1\", $PEER_PORT)|local n = SPREAD.n % #SPREAD.ports + 1; SPREAD.n = n; require(\"ngx.balancer\").set_current_peer(\"127.0.0.1\", SPREAD.ports[n])|" \
        "$RUN/ovh-floor1.conf" >"$RUN/ovh-spread.conf"
    grep -q 'SPREAD.ports\[n\]' "$RUN/ovh-spread.conf" || die "ovh-spread: the floor's set_current_peer not found"
    mkdir -p "$RUN/lib" "$RUN/lua"
    gcc -O2 -Wall -shared -fPIC -o "$RUN/lib/bare_feedback.so" benches/nginx/bare_feedback.c -lm ||
        die "ovh-bare: gcc could not build benches/nginx/bare_feedback.c"
    cp benches/nginx/bare_feedback.lua "$RUN/lua/bare_feedback.lua"
    sed -e 's/contender "floor1"/contender "bare"/' \
        -e "s|^    init_by_lua_block {|    init_by_lua_block {\n        BARE = require(\"bare_feedback\")\n        BARE.setup(\"$RUN/lib/bare_feedback.so\")\n        BARE.init({ $ports })|" \
        -e "s|require(\"ngx.balancer\").set_current_peer(\"127.0.0.1\", $PEER_PORT)|BARE.balance()|" \
        -e 's|^\( *\)log_by_lua_block { }$|\1log_by_lua_block { BARE.log() }|' \
        "$RUN/ovh-floor1.conf" >"$RUN/ovh-bare.conf"
    grep -q 'BARE.init(' "$RUN/ovh-bare.conf" || die "ovh-bare: the floor's init_by_lua_block not found"
    grep -q 'BARE.balance()' "$RUN/ovh-bare.conf" || die "ovh-bare: the floor's set_current_peer not found"
    grep -q 'log_by_lua_block { BARE.log() }' "$RUN/ovh-bare.conf" || die "ovh-bare: the floor's empty log_by_lua_block not found"
    grep -q "lua_package_path \"$RUN/lua/" "$RUN/ovh-bare.conf" || die "ovh-bare: lua_package_path does not cover $RUN/lua"
    [ -f "$RUN/ovh-gw2.conf" ] || return 0
    cp benches/nginx/rsb_least.lua "$RUN/lua/rsb_least.lua"
    sed -e 's/contender "rsbalancer"/contender "least"/' \
        -e 's/rsbalancer.balance("llm")/rsb_least.balance()/' \
        -e 's/^\( *\)rsbalancer.log()$/\1rsb_least.log()/' \
        -e 's/^\( *\)rsbalancer.init_worker()$/\1rsbalancer.init_worker()\n\1rsb_least = require("rsb_least")\n\1rsb_least.setup("llm")/' \
        "$RUN/ovh-gw2.conf" >"$RUN/ovh-least.conf"
    [ "$(grep -c 'rsb_least\.' "$RUN/ovh-least.conf")" -ge 4 ] || die "ovh-least: the gateway's phases not found"
}

# Stops what overhead_setup started (every nginx of $RUN, by its pid file) and
# removes $RUN.
overhead_cleanup() {
    [ -n "${RUN:-}" ] && [ -d "$RUN" ] || return 0
    local f
    for f in "$RUN"/*.pid; do
        [ -f "$f" ] && kill "$(cat "$f")" 2>/dev/null
    done
    sleep 0.3
    rm -rf "$RUN"
}

# A readable name for a gateway config.
overhead_label() {
    case "$(sed -n 's/^# benches\/gateway.rs contender "\([^"]*\)".*/\1/p' "$1")" in
        native) echo "native upstream" ;;
        seed) echo "seed Lua weighted random" ;;
        floor0) echo "floor: balancer_by_lua, fixed peer" ;;
        floor1) echo "floor + empty log_by_lua" ;;
        floor2) echo "floor1 + Lua access/content locs" ;;
        spread) echo "floor1 round robin over 3 nodes" ;;
        bare) echo "bare C feedback: pick + report, shm" ;;
        least) echo "rsbalancer least: FFI pick + report" ;;
        rsbalancer) echo "rsbalancer $(grep -o '"algorithm": *"[a-z_0-9]*"' "${1%.conf}.json" | cut -d'"' -f4)" ;;
        *) echo "$1" ;;
    esac
}

# The first port from $1 on that nothing listens on.
overhead_port_from() {
    local p=$1
    while (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; do p=$((p + 1)); done
    echo "$p"
}

# Writes $RUN/$2.conf: gateway $1 as one worker (no CPU affinity: the caller pins),
# its own pid file, listening on port $3.
overhead_one_worker() {
    sed -e 's/worker_processes 2;/worker_processes 1;/' -e 's/worker_cpu_affinity.*//' \
        -e "s|^pid .*|pid $RUN/$2.pid;|" \
        -e "s/listen 127.0.0.1:[0-9]*/listen 127.0.0.1:$3/" "$RUN/$1.conf" >"$RUN/$2.conf"
}
