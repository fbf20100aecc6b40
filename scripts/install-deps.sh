#!/usr/bin/env bash
# Install what `make run`, `make test` and `make bench` need, skipping what is present.
# Debian 12: nginx with lua-nginx-module, OpenResty's LuaJIT fork (which the module
# links against; plain `luajit` conflicts with it), nginx's Perl module (so that
# `nginx -t` can validate pool configs: nginx-conf/perl), valgrind for the C test, wrk for
# benchmarks, prometheus for promtool (rule tests, `promtool check metrics`) and the
# end-to-end scrape test, chromium for the status page test (headless), g++ for the
# fuzz targets (libfuzzer-sys builds libFuzzer's C++ sources), luarocks for `luarocks
# lint` of the rockspec (make test-deb; dpkg-deb, which builds the .deb, is in dpkg).
# openssl (the CLI) makes the test CA and certificates of tests/nginx_providers.rs.
# redis-server: the cluster tests start their own (tests/cluster.rs, tests/nginx_cluster.rs).
# dnsmasq-base (the binary, without the system service of `dnsmasq`): the DNS
# discovery tests start their own on a high port (tests/nginx_discovery.rs).
# Rust comes from rustup and is expected on PATH.
set -euo pipefail

want=(nginx-core libnginx-mod-http-lua libnginx-mod-http-perl lua-resty-core luajit2 libluajit2-5.1-dev
      gcc g++ make valgrind wrk curl prometheus chromium luarocks openssl redis-server dnsmasq-base)
[ "$#" -gt 0 ] && want+=("$@")

SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"

missing=()
for p in "${want[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

if [ "${#missing[@]}" -gt 0 ]; then
    echo "install-deps: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    # Packages with a service (nginx, prometheus) start it from their postinst when
    # invoke-rc.d allows. A temporary policy-rc.d that refuses (101) keeps them from
    # starting at all, with or without systemd; one already present is left alone.
    policy=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        policy=/usr/sbin/policy-rc.d
        printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null
        $SUDO chmod 0755 "$policy"
    fi
    status=0
    $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null || status=$?
    if [ -n "$policy" ]; then $SUDO rm -f "$policy"; fi
    [ "$status" -eq 0 ] || { echo "install-deps: apt-get install failed ($status)" >&2; exit "$status"; }
fi

# The packaged nginx and prometheus may run as services (installed before, or started
# by systemd despite the policy); we run our own instances on free ports.
for svc in nginx prometheus; do
    if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet "$svc" 2>/dev/null; then
        $SUDO systemctl stop "$svc" || true
    fi
done

command -v cargo >/dev/null || { echo "install-deps: cargo not found (install Rust with rustup)" >&2; exit 1; }
command -v nginx >/dev/null || { echo "install-deps: nginx missing after install" >&2; exit 1; }
command -v luajit >/dev/null || { echo "install-deps: luajit missing after install" >&2; exit 1; }
command -v promtool >/dev/null || { echo "install-deps: promtool missing after install (package prometheus)" >&2; exit 1; }
command -v c++ >/dev/null || { echo "install-deps: c++ missing after install (package g++)" >&2; exit 1; }
command -v luarocks >/dev/null || { echo "install-deps: luarocks missing after install" >&2; exit 1; }
echo "install-deps: ok"
