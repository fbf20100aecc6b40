# Sourced by test scripts: free_port prints a TCP port nothing listens on now on
# 127.0.0.1, below Linux's ephemeral range (32768 and up): a port there can be the
# local end of an outgoing connection, which nothing listens on but which a bind()
# still finds in use (seen here once). Needs a `die` function.
free_port() {
    local p
    for _ in $(seq 1 200); do
        p=$((20000 + RANDOM % 12000))
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
            echo "$p"
            return 0
        fi
    done
    die "no free port found"
}
