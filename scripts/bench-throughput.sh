#!/usr/bin/env bash
# Gateway throughput against the floor contenders, in one run (issue 15's "within 3%
# of the floor"): native upstream, the floor (a balancer_by_lua that only sets a
# fixed peer), the floor + an empty log_by_lua, that + the Lua locations the
# rsbalancer gateways have (floor2, scripts/bench-overhead-setup.sh), the seed's Lua
# weighted random and rsbalancer p2c_ewma and weighted_random, all the gateways of
# scripts/bench-gateway.sh's overhead scenario (static nodes answering a small 200;
# scripts/bench-overhead-setup.sh), and three references that split the gap: the floor
# + empty log_by_lua going round robin to the three nodes, the same with the least
# shared-memory feedback in C, not rsbalancer (ovh-bare: a weighted random pick counted
# in flight, a report feeding a latency average), and rsbalancer's least feedback (one
# library pick and one report per request, on the gateway's config).
#
# Each gateway runs as one nginx worker pinned to CPU 0; wrk (-t1) and the static
# nodes share CPU 1 (on 2 cores that side, client and node, can be the bottleneck:
# the "busy" column shows how loaded the gateway's core was). Rounds alternate the
# contenders (the order rotates each round), so a change in what else the machine
# runs touches every contender alike; prints each one's median req/s, min..max, the
# ratio of the medians to the floor + empty log_by_lua, the median of the per-round
# ratios to it (robust to slow drifts) with their middle half (the first to third
# quartile: how far apart two contenders must be for a run to tell them apart), and
# the ratio to native. It also prints the
# gateway worker's CPU time per request (user + system, from /proc/PID/stat, summed
# over the rounds), and its user-space part: what the gateway's core spends on a
# request whatever the load generator's core does, so the figure that spreads least
# between runs. Timings are printed, never asserted.
#
#   scripts/bench-throughput.sh               (make bench runs it)
#   RSB_BENCH_TP_ROUNDS=7 RSB_BENCH_TP_S=3 RSB_BENCH_TP_CONNS=32   (the defaults)
#   RSB_BENCH_TP_ONLY="ovh-gw1 ovh-floor1"     some contenders only
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
die() { echo "bench-throughput: $*" >&2; exit 1; }
. scripts/bench-overhead-setup.sh
overhead_need wrk nginx taskset curl
ROUNDS="${RSB_BENCH_TP_ROUNDS:-7}"
SECS="${RSB_BENCH_TP_S:-3}"
CONNS="${RSB_BENCH_TP_CONNS:-32}"
cpus=$(nproc)
gw_cpu=0
load_cpu=$((cpus > 1 ? 1 : 0))

trap overhead_cleanup EXIT
overhead_setup
cd "$RUN"

names=()
ports=()
wpids=()
port=21600
for name in ovh-gw0 ovh-floor0 ovh-floor1 ovh-floor2 ovh-spread ovh-bare ovh-gw3 ovh-least ovh-gw1 ovh-gw2; do
    [ -f "$name.conf" ] || continue
    case " ${RSB_BENCH_TP_ONLY:-$name} " in *" $name "*) ;; *) continue ;; esac
    port=$(overhead_port_from $((port + 1)))
    overhead_one_worker "$name" "tp-$name" "$port"
    taskset -c "$gw_cpu" nginx -p "$RUN" -c "$RUN/tp-$name.conf" -g 'daemon on;' 2>"tp-$name.stderr" ||
        { cat "tp-$name.stderr"; die "$name did not start"; }
    up=""
    for _ in $(seq 1 100); do
        curl -s -o /dev/null "http://127.0.0.1:$port/" && { up=1; break; }
        sleep 0.1
    done
    [ -n "$up" ] || die "$name does not answer on port $port"
    names+=("$name")
    ports+=("$port")
    # The worker: the only child of the master.
    wpid=$(pgrep -P "$(cat "$RUN/tp-$name.pid")" | head -1)
    [ -n "$wpid" ] || die "$name: no worker process"
    wpids+=("$wpid")
done
count=${#names[@]}
[ "$count" -gt 0 ] || die "no contender selected"

# req/s and the request count of one wrk run against port $1 for $2 seconds.
load() {
    taskset -c "$load_cpu" wrk -t1 -c"$CONNS" -d"$2s" "http://127.0.0.1:$1/" |
        awk '/requests in/ {n = $1} /^Requests\/sec:/ {r = $2} END {print r, n}'
}
# CPU time of process $1 so far, in clock ticks: utime + stime, then utime alone (the
# fields after the command name, which is in parentheses).
cpu_ticks() { sed 's/^.*) //' "/proc/$1/stat" | awk '{print $12 + $13, $12}'; }
tck=$(getconf CLK_TCK)

echo "bench-throughput: load average $(cut -d' ' -f1-3 /proc/loadavg), $cpus CPUs; gateway on CPU $gw_cpu, wrk and nodes on CPU $load_cpu"
for i in $(seq 0 $((count - 1))); do load "${ports[$i]}" 1 >/dev/null; done # warm-up (JIT traces, keepalive)
declare -A results ticks uticks reqs
for r in $(seq 1 "$ROUNDS"); do
    for k in $(seq 0 $((count - 1))); do
        i=$(((k + r) % count))
        read -r t0 u0 < <(cpu_ticks "${wpids[$i]}")
        read -r v n < <(load "${ports[$i]}" "$SECS")
        read -r t1 u1 < <(cpu_ticks "${wpids[$i]}")
        [ -n "$v" ] && [ -n "$n" ] || die "no result from wrk for ${names[$i]}"
        results[${names[$i]}]+="$v "
        ticks[${names[$i]}]=$((${ticks[${names[$i]}]:-0} + t1 - t0))
        uticks[${names[$i]}]=$((${uticks[${names[$i]}]:-0} + u1 - u0))
        reqs[${names[$i]}]=$((${reqs[${names[$i]}]:-0} + n))
    done
done

# Space-separated numbers on stdin: one per line, in order; then their median, their
# range, and their middle half (first to third quartile by the nearest rank, in %).
sorted() { tr ' ' '\n' | grep -v '^$' | sort -g; }
median() { sorted | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }
range() { sorted | awk 'NR==1 {lo=$1} {hi=$1} END {printf "%.0f..%.0f", lo, hi}'; }
iqr_pct() { sorted | awk '{a[NR]=$1} END { q1 = int((NR + 3) / 4); q3 = NR + 1 - q1; printf "%.1f..%.1f", 100 * a[q1], 100 * a[q3] }'; }
declare -A med
for n in "${names[@]}"; do med[$n]=$(echo "${results[$n]}" | median); done
floor=${med[ovh-floor1]:-}
native=${med[ovh-gw0]:-}
printf '\n== throughput, 1 gateway worker pinned, wrk -t1 -c%s, %s rounds of %s s alternating, GET /\n' "$CONNS" "$ROUNDS" "$SECS"
# The median over rounds of a contender's req/s over the floor's in the same round
# (adjacent runs: what drifts slowly on a shared machine cancels out).
round_ratios() {
    paste -d' ' <(echo "${results[$1]}" | tr ' ' '\n' | grep -v '^$') \
        <(echo "${results[ovh-floor1]}" | tr ' ' '\n' | grep -v '^$') |
        awk '{ printf "%.4f ", $1 / $2 }'
}
round_ratio() { round_ratios "$1" | median; }
# Their spread (the middle half): a target closer to the median than this cannot be
# told apart from the run's noise.
round_iqr() { round_ratios "$1" | iqr_pct; }
# Clock ticks $1 over requests $2, in microseconds per request.
us_per_req() { awk -v t="$1" -v n="$2" -v hz="$tck" 'BEGIN { printf "%.2f", 1e6 * t / hz / n }'; }
# The worker's CPU microseconds per request over all rounds, and the user-space part.
cpu_us() { us_per_req "${ticks[$1]}" "${reqs[$1]}"; }
user_us() { us_per_req "${uticks[$1]}" "${reqs[$1]}"; }
# How busy the worker's core was during the runs: near 100% when the gateway is the
# bottleneck; below, req/s says more of the load generator's core than of the gateway.
busy() { awk -v t="${ticks[$1]}" -v hz="$tck" -v s="$((ROUNDS * SECS))" 'BEGIN { printf "%.0f%%", 100 * t / hz / s }'; }
floor_cpu=$([ -n "$floor" ] && cpu_us ovh-floor1 || echo "")
printf '   %-36s %12s %18s %14s %12s %12s %10s %10s %9s %6s %8s\n' contender "req/s median" "min..max" "vs floor+log" "per round" "rounds IQR" "vs native" "CPU us/req" "vs floor" "busy" "user us"
for n in "${names[@]}"; do
    c=$(cpu_us "$n")
    printf '   %-36s %12.0f %18s %14s %12s %12s %10s %10s %9s %6s %8s\n' "$(overhead_label "$n.conf")" "${med[$n]}" \
        "$(echo "${results[$n]}" | range)" \
        "$([ -n "$floor" ] && awk -v a="${med[$n]}" -v b="$floor" 'BEGIN { printf "%.1f%%", 100 * a / b }' || echo -)" \
        "$([ -n "$floor" ] && awk -v x="$(round_ratio "$n")" 'BEGIN { printf "%.1f%%", 100 * x }' || echo -)" \
        "$([ -n "$floor" ] && round_iqr "$n" || echo -)" \
        "$([ -n "$native" ] && awk -v a="${med[$n]}" -v b="$native" 'BEGIN { printf "%.1f%%", 100 * a / b }' || echo -)" \
        "$c" "$([ -n "$floor_cpu" ] && awk -v a="$c" -v b="$floor_cpu" 'BEGIN { printf "%.1f%%", 100 * a / b }' || echo -)" \
        "$(busy "$n")" "$(user_us "$n")"
done
echo "   vs floor+log: ratio of the medians; per round: median of each round's ratio to the floor"
echo "   + empty log_by_lua. Target (issue 15): rsbalancer at least 97% of that floor."
echo "   rounds IQR: the middle half of those per-round ratios (first to third quartile), %."
echo "   CPU us/req: the gateway worker's user + system CPU time per request over all rounds"
echo "   (clock ticks of $((1000 / tck)) ms); vs floor: against the floor + empty log_by_lua's; busy:"
echo "   that CPU time over the runs' wall time (under 100%: the gateway was not the bottleneck,"
echo "   and CPU us/req is the figure that measures its capacity); user us: the user-space part"
echo "   of CPU us/req (the rest is the kernel's: the same system calls for every contender)."
