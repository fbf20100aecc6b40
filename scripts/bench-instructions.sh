#!/usr/bin/env bash
# Instructions per request of each overhead-benchmark gateway, counted by valgrind's
# callgrind: repeatable on a busy machine, where req/s and CPU time are not.
#
# Renders the configs of scripts/bench-gateway.sh's overhead scenario (a --quick run
# with RSB_BENCH_KEEP=1), starts the static nodes, then runs each gateway as one nginx
# process (master_process off, 1 worker) under callgrind: warm-up load (JIT traces),
# counters zeroed, N seconds of wrk load, counters dumped. Prints user-space
# instructions per request, the ratio to native nginx and, under the table, each
# contender's gap to the floor + empty log_by_lua (issue 15's target: at most +2,000).
# Timings are never asserted.
#
#   scripts/bench-instructions.sh          (make bench runs it after bench-gateway.sh)
#   RSB_BENCH_IR_KEEP=/some/dir            keep each gateway's callgrind output there
#                                          (callgrind_annotate --inclusive=yes FILE)
#   RSB_BENCH_IR_ONLY="ovh-gw0 ovh-gw2"    some gateways only (0 native, 1 rsbalancer
#                                          p2c_ewma, 2 weighted_random, 3 seed, floor0
#                                          floor1, floor2, spread, bare, least:
#                                          below)
#
# The floor contenders (scripts/bench-overhead-setup.sh derives them from the seed's
# config): a balancer_by_lua that only sets a fixed peer (ovh-floor0), and the same
# plus an empty log_by_lua (ovh-floor1): what any balancer with per-response feedback
# pays at least. ovh-floor2 adds to ovh-floor1 what the rsbalancer gateways' config
# makes lua-nginx-module run on every request (an access_by_lua location and a
# content_by_lua one, which GET / never enters): the gap to it is rsbalancer's own.
# The references (scripts/bench-overhead-setup.sh): ovh-spread, ovh-floor1 round robin
# over the three nodes; ovh-bare, ovh-floor1 with the least shared-memory feedback in C
# (benches/nginx/bare_feedback.c, no rsbalancer, no pool config); ovh-least,
# rsbalancer's least feedback on the weighted_random gateway's config.
# The rsbalancer gateways run with `limit.slow_factor` 0 here (see below: valgrind's
# slowdown makes a node look slow at warm-up, which a healthy pool never does).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
die() { echo "bench-instructions: $*" >&2; exit 1; }
. scripts/bench-overhead-setup.sh
overhead_need valgrind callgrind_control wrk nginx
SECS="${RSB_BENCH_IR_S:-4}"

trap overhead_cleanup EXIT
overhead_setup
cd "$RUN"

port=21400  # below the ephemeral range (32768-60999), where clients' local ports live
native=""
floor=""
measured=()
printf '\n== instructions per request (callgrind, 1 nginx process, wrk -c4 %ss, GET /)\n' "$SECS"
printf '   %-36s %10s %12s %9s\n' contender requests "instr/req" "vs native"
floor2=""
for name in ovh-gw0 ovh-gw1 ovh-gw2 ovh-gw3 ovh-floor0 ovh-floor1 ovh-floor2 ovh-spread ovh-bare ovh-least; do
    conf="$name.conf"
    [ -f "$conf" ] || continue
    case " ${RSB_BENCH_IR_ONLY:-$name} " in *" $name "*) ;; *) continue ;; esac
    port=$(overhead_port_from $((port + 1)))
    overhead_one_worker "$name" "cg-$name" "$port"
    # The pool config an rsbalancer contender loads (ovh-least loads ovh-gw2's).
    json=$(grep -o "$RUN/ovh-[a-z0-9]*\.json" "$conf" | head -1 || true)
    json=${json##*/}
    if [ -n "$json" ]; then
        # Under valgrind every answer takes ~50x as long, and the first JIT compilations
        # hundreds of milliseconds: the node a warm-up request went to then looks slow
        # (5 ms and 2x over the fastest, src/balancer/local.rs) for many seconds, and
        # the picks measure the slow-node pass (redraws, scans), which a healthy pool at
        # full speed never runs. Slow nodes as overflow are off here (`limit.slow_factor`
        # 0); docs/benchmarks.md gives the figure with them on.
        grep -q '"limit"' "$json" && die "$json has a limit already: merge slow_factor 0 into it"
        sed -e 's/^\( *\)"algorithm": \("[a-z_0-9]*"\),$/\1"algorithm": \2,\n\1"limit": { "slow_factor": 0 },/' \
            "$json" >"cg-$name.json"
        grep -q '"slow_factor": 0' "cg-$name.json" || die "$json: no \"algorithm\" line to add slow_factor 0 after"
        sed -i "s|$RUN/$json|$RUN/cg-$name.json|" "cg-$name.conf"
        grep -q "cg-$name.json" "cg-$name.conf" || die "cg-$name.conf does not load $json"
    fi
    out="$RUN/cg-$name.out"
    valgrind --tool=callgrind --smc-check=all-non-file --callgrind-out-file="$out" \
        nginx -p "$RUN" -c "$RUN/cg-$name.conf" -g 'daemon off; master_process off;' \
        >"cg-$name.log" 2>&1 &
    vp=$!
    up=""
    for _ in $(seq 1 300); do
        curl -s -o /dev/null "http://127.0.0.1:$port/" && { up=1; break; }
        kill -0 "$vp" 2>/dev/null || break
        sleep 0.2
    done
    [ -n "$up" ] || { cat "cg-$name.log" "$RUN/$name-error.log" 2>/dev/null | tail -20; die "$name did not start under valgrind"; }
    wrk -t1 -c4 -d3s "http://127.0.0.1:$port/" >/dev/null
    callgrind_control -z "$vp" >/dev/null 2>&1
    reqs=$(wrk -t1 -c4 -d"${SECS}s" "http://127.0.0.1:$port/" | awk '/requests in/ {print $1}')
    callgrind_control -d "$vp" >/dev/null 2>&1
    kill "$vp"; wait "$vp" 2>/dev/null || true
    f=$(grep -l "Trigger: dump" "$out"* | head -1)
    ir=$(awk '/^summary:/ {print $2; exit}' "$f")
    [ -n "${RSB_BENCH_IR_KEEP:-}" ] && mkdir -p "$RSB_BENCH_IR_KEEP" && cp "$f" "$RSB_BENCH_IR_KEEP/$name.callgrind"
    rm -f "$out"*
    per=$((ir / reqs))
    [ -z "$native" ] && native=$per
    [ "$name" = ovh-floor1 ] && floor=$per
    [ "$name" = ovh-floor2 ] && floor2=$per
    measured+=("$name:$per")
    what="$(overhead_label "$conf")"
    printf '   %-36s %10s %12s %8.1f%%\n' "$what" "$reqs" "$per" \
        "$(awk -v a="$per" -v n="$native" 'BEGIN { print 100 * a / n }')"
done
echo "   instructions of the gateway process (nginx, Lua, rsbalancer, libc; not the kernel) between"
echo "   the counter reset and the dump, divided by the requests wrk completed in that time."
if [ -n "$floor" ]; then
    # The issue-15 target: at most floor + 2,000 instructions per request.
    printf '\n   gap to the floor (floor + empty log_by_lua, %s per request; target: at most +2,000)\n' "$floor"
    [ -n "$floor2" ] && printf '   and to floor2 (the same + the Lua locations, %s): rsbalancer'"'"'s own cost\n' "$floor2"
    for m in "${measured[@]}"; do
        name=${m%%:*}
        per=${m#*:}
        case "$name" in ovh-floor0 | ovh-floor1) continue ;; esac
        printf '   %-36s %+10d' "$(overhead_label "$name.conf")" $((per - floor))
        [ -n "$floor2" ] && [ "$name" != ovh-floor2 ] && printf ' %+10d' $((per - floor2))
        echo
    done
fi
