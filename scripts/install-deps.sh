#!/usr/bin/env bash
# Install what `make run`, `make test` and `make bench` need, skipping what is present.
# Debian 12: nginx with lua-nginx-module, OpenResty's LuaJIT fork (which the module
# links against; plain `luajit` conflicts with it), valgrind for the C test, wrk for
# benchmarks, chromium for the status page test (headless). Rust comes from rustup
# and is expected on PATH.
set -euo pipefail

want=(nginx-core libnginx-mod-http-lua lua-resty-core luajit2 libluajit2-5.1-dev
      gcc make valgrind wrk curl chromium)
[ "$#" -gt 0 ] && want+=("$@")

missing=()
for p in "${want[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

if [ "${#missing[@]}" -gt 0 ]; then
    echo "install-deps: installing ${missing[*]}"
    SUDO=""
    [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The packaged nginx starts a service on install; we run our own instances.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet nginx 2>/dev/null; then
    systemctl stop nginx || true
fi

command -v cargo >/dev/null || { echo "install-deps: cargo not found (install Rust with rustup)" >&2; exit 1; }
command -v nginx >/dev/null || { echo "install-deps: nginx missing after install" >&2; exit 1; }
command -v luajit >/dev/null || { echo "install-deps: luajit missing after install" >&2; exit 1; }
echo "install-deps: ok"
