#!/usr/bin/env bash
# `make demo-load`: concurrent load on the running demo (`make run` in another
# terminal), so that what the balancer does becomes visible: weights, node a's
# learned limit (8 in flight), node b's quota (20 req/s, 429 + Retry-After), the slow
# node c (1.5 s) taking only overflow, and node b failing with 503 for a while.
#
# Environment (all optional): GATEWAY_PORT=8080 NODE_B_PORT=9002 CLIENTS=24
#   PHASE_S=15 (seconds per phase)
# Watch http://127.0.0.1:$GATEWAY_PORT/rsbalancer/status in a browser meanwhile.
set -euo pipefail

GATEWAY_PORT=${GATEWAY_PORT:-8080}
NODE_B_PORT=${NODE_B_PORT:-9002}
CLIENTS=${CLIENTS:-24}
PHASE_S=${PHASE_S:-15}
G="http://127.0.0.1:$GATEWAY_PORT"
BODY='{"model":"mock-llm","max_tokens":64,"messages":[{"role":"user","content":"Hello"}]}'

command -v curl >/dev/null || { echo "demo-load: curl not found (make deps installs it)" >&2; exit 1; }
curl -s -o /dev/null "$G/rsbalancer/stats" ||
    { echo "demo-load: no gateway on $G: start it with \`make run\` in another terminal" >&2; exit 1; }

OUT=$(mktemp -d)
trap 'curl -s -o /dev/null -X POST "127.0.0.1:$NODE_B_PORT/mock/set?fail=" || true; rm -rf "$OUT"' EXIT

# CLIENTS loops, each sending one request after another for PHASE_S seconds; every
# answer is one line "<status> <node>" (node "-" when the gateway answered itself).
phase() { # title
    echo
    echo "== $1 ($CLIENTS concurrent clients, ${PHASE_S} s)"
    local end=$((SECONDS + PHASE_S)) i
    : >"$OUT/answers"
    for i in $(seq "$CLIENTS"); do
        (
            while [ "$SECONDS" -lt "$end" ]; do
                curl -s -o /dev/null -w '%{http_code} %header{x-node}\n' --max-time 30 \
                    -H 'Content-Type: application/json' -d "$BODY" "$G/v1/chat/completions" \
                    >>"$OUT/answers.$i" || true
            done
        ) &
    done
    wait
    cat "$OUT"/answers.* >"$OUT/answers"
    rm -f "$OUT"/answers.*
    local total ok
    total=$(wc -l <"$OUT/answers")
    ok=$(grep -c '^200 ' "$OUT/answers" || true)
    echo "   $total answers, $ok x 200 ($((total > 0 ? ok * 100 / total : 0))%), $((total / PHASE_S)) per second"
    echo "   answers by status and node (a=30 b=50 c=20 by weight):"
    awk '{ n = ($2 == "" ? "-" : $2); c[$1 " " n]++ } END { for (k in c) print c[k], k }' \
        "$OUT/answers" | sort -k3,3 -k2,2 | awk '{ printf "     %-6s node %-2s %6d\n", $2, $3, $1 }'
}

echo "demo-load: $G (status page: $G/rsbalancer/status)"
phase "1. steady load: limits and quotas decide, not only weights"
cat <<'EOF'
   Node a takes at most 8 requests at once (its learned limit: 429 above it),
   node b about 20 per second (its quota; a 429 with Retry-After cools it), node c
   is slow (1.5 s) and gets only what a and b cannot take. Clients see 200s; the
   429s were retried on another node or waited in the admission queue.
EOF

curl -s -o /dev/null -X POST "127.0.0.1:$NODE_B_PORT/mock/set?fail=503"
phase "2. node b answers 503"
cat <<'EOF'
   Node b's 503s are retried on a and c within the same request; after 5 in a row
   b is ejected (the status page shows it out, then probed back).
EOF
curl -s -o /dev/null -X POST "127.0.0.1:$NODE_B_PORT/mock/set?fail="

phase "3. node b back"
echo
echo "demo-load: done. Per-node totals: curl -s $G/rsbalancer/stats"
