#!/usr/bin/env bash
# The Debian package (`make deb`) and the LuaRocks rockspec, checked (`make test-deb`,
# part of `make test`):
#   1. the .deb's control fields (Depends) and its file list;
#   2. `dpkg -x` into a scratch root; Debian's LuaJIT (the luajit binary, and in 4 the
#      lua-nginx-module's) searches the package's Lua and C module directories by default;
#   3. the Perl check (RsbalancerCheck.pm from the root) passes a good pool config and
#      fails a bad one; a C program compiles and links against the root's header and
#      library and prints its version;
#   4. real nginx (2 workers) runs a gateway made of the root's snippets
#      (usr/share/rsbalancer/nginx) in front of the demo's mock nodes and serves a chat
#      completion, the module loaded from the root;
#   5. `luarocks lint` of the rockspec, and `luarocks make` into a scratch tree.
# Everything it needs must be there: a missing tool or file fails it, it never skips.
#
# Usage: scripts/test-deb.sh <path to the .deb>
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

die() { echo "test-deb: FAILED: $*" >&2; exit 1; }
say() { echo "test-deb: $*"; }

[ "$#" -eq 1 ] || die "usage: $0 <rsbalancer.deb>"
DEB="$1"
[ -f "$DEB" ] || die "$DEB not found (make deb)"
for tool in dpkg-deb nginx luajit perl gcc curl luarocks; do
    command -v "$tool" >/dev/null || die "$tool not found (make deps installs it)"
done
MODULES="${NGINX_MODULES:-/usr/lib/nginx/modules}"
for m in ndk_http_module.so ngx_http_lua_module.so; do
    [ -f "$MODULES/$m" ] || die "$MODULES/$m not found (libnginx-mod-http-lua; make deps)"
done
MULTIARCH="$(gcc -print-multiarch)"
VERSION="$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)"

WORK="$(mktemp -d "${TMPDIR:-/tmp}/rsbalancer-test-deb.XXXXXX")"
chmod 0755 "$WORK"
PIDS=()
cleanup() {
    local status=$?
    for pid in "${PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
        kill -KILL "$pid" 2>/dev/null || true
    done
    if [ "$status" -eq 0 ]; then
        rm -rf "$WORK"
    else
        echo "test-deb: files and logs kept in $WORK" >&2
        for log in "$WORK"/*.log; do
            [ -f "$log" ] && { echo "--- $log" >&2; tail -n 30 "$log" >&2; }
        done
    fi
}
trap cleanup EXIT

# 1. Control fields and file list.
say "checking $DEB"
[ "$(dpkg-deb -f "$DEB" Package)" = rsbalancer ] || die "Package is not rsbalancer"
[ "$(dpkg-deb -f "$DEB" Version)" = "$VERSION-1" ] || die "Version is not $VERSION-1"
depends="$(dpkg-deb -f "$DEB" Depends)"
for dep in nginx-core libnginx-mod-http-lua lua-resty-core libc6; do
    grep -Eq "(^|, )$dep( |,|$)" <<<"$depends" || die "Depends lacks $dep: $depends"
done
EXPECTED=(
    "usr/share/lua/5.1/resty/rsbalancer.lua"
    "usr/lib/$MULTIARCH/lua/5.1/rsbalancer.so"
    "usr/lib/$MULTIARCH/librsbalancer.so"
    "usr/include/rsbalancer.h"
    "usr/share/perl5/RsbalancerCheck.pm"
)
for f in lua/resty/rsbalancer/*.lua; do
    EXPECTED+=("usr/share/lua/5.1/resty/rsbalancer/$(basename "$f")")
done
for f in nginx-conf/snippets/*.conf; do
    EXPECTED+=("usr/share/rsbalancer/nginx/$(basename "$f")")
done
listed="$(dpkg-deb --fsys-tarfile "$DEB" | tar -t | sed 's|^\./||' | grep -v -e '/$' -e '^$')"
want="$(printf '%s\n' "${EXPECTED[@]}" | sort)"
got="$(sort <<<"$listed")"
[ "$want" = "$got" ] || die "the package's files differ from the expected list:
$(diff <(echo "$want") <(echo "$got") || true)"

# 2. Unpacked into a scratch root, and where Debian's LuaJIT looks (the luajit that
#    RsbalancerCheck runs; nginx's own lua module is asked in 4).
R="$WORK/root"
dpkg -x "$DEB" "$R"
for f in "${EXPECTED[@]}"; do
    [ -f "$R/$f" ] || die "$f missing after dpkg -x"
done
[ -x "$R/usr/lib/$MULTIARCH/lua/5.1/rsbalancer.so" ] || die "rsbalancer.so is not executable"
# shellcheck disable=SC2016
paths="$(env -u LUA_PATH -u LUA_CPATH luajit -e 'io.write(package.path, "\n", package.cpath)')"
grep -q "/usr/share/lua/5.1/?.lua" <<<"$paths" || die "LuaJIT's package.path lacks /usr/share/lua/5.1: $paths"
grep -q "/usr/lib/$MULTIARCH/lua/5.1/?.so" <<<"$paths" ||
    die "LuaJIT's package.cpath lacks /usr/lib/$MULTIARCH/lua/5.1: $paths"

# shellcheck source=scripts/free-port.sh
. "$(dirname "${BASH_SOURCE[0]}")/free-port.sh"
PA="$(free_port)"; PB="$(free_port)"; PC="$(free_port)"; PG="$(free_port)"

cat > "$WORK/pool.json" <<JSON
{ "pools": { "chat": { "algorithm": "p2c_ewma", "nodes": [
    { "id": "a", "addr": "127.0.0.1:$PA" },
    { "id": "b", "addr": "127.0.0.1:$PB" },
    { "id": "c", "addr": "127.0.0.1:$PC" } ] } } }
JSON
echo '{ "pools": { "chat": { "nodes": [ { "id": "a", "addr": "127.0.0.1:1", "weight": 0 } ] } } }' \
    > "$WORK/bad.json"

# 3. The Perl check and the C library, from the root.
LUADIR="$R/usr/lib/$MULTIARCH/lua/5.1"
perl -I "$R/usr/share/perl5" -MRsbalancerCheck -e 'RsbalancerCheck::config($ARGV[0], $ARGV[1])' \
    "$WORK/pool.json" "$LUADIR" || die "RsbalancerCheck refused a good pool config"
if out="$(perl -I "$R/usr/share/perl5" -MRsbalancerCheck -e 'RsbalancerCheck::config($ARGV[0], $ARGV[1])' \
    "$WORK/bad.json" "$LUADIR" 2>&1)"; then
    die "RsbalancerCheck passed a weight of 0"
fi
grep -q "weight" <<<"$out" || die "RsbalancerCheck's error does not name the field: $out"
printf '#include <stdio.h>\n#include <rsbalancer.h>\nint main(void) { puts(rsb_version()); return 0; }\n' \
    > "$WORK/version.c"
gcc -std=c11 -Wall -Werror -I "$R/usr/include" "$WORK/version.c" \
    -L "$R/usr/lib/$MULTIARCH" -lrsbalancer -Wl,-rpath,"$R/usr/lib/$MULTIARCH" -o "$WORK/version" ||
    die "a C program does not build against the package's header and library"
[ "$("$WORK/version")" = "$VERSION" ] || die "rsb_version() is not $VERSION"
say "Perl check and C library ok"

# 4. Mock nodes (the demo's) and a gateway made of the root's snippets.
USER_LINE=""
[ "$(id -u)" -eq 0 ] && USER_LINE="user root;"
mkdir -p "$WORK/tmp"
sed -e "s|@USER@|$USER_LINE|" -e "s|@MODULES@|$MODULES|g" -e "s|@RUNTIME@|$WORK|g" \
    -e "s|@DEMO@|$ROOT/nginx-conf/demo|g" -e "s|@PORT_A@|$PA|g" -e "s|@PORT_B@|$PB|g" \
    -e "s|@PORT_C@|$PC|g" nginx-conf/demo/mock-nodes.conf > "$WORK/mock-nodes.conf"
SNIP="$R/usr/share/rsbalancer/nginx"
cat > "$WORK/gateway.conf" <<CONF
$USER_LINE
load_module $MODULES/ndk_http_module.so;
load_module $MODULES/ngx_http_lua_module.so;
worker_processes 2;
pid $WORK/gateway.pid;
error_log $WORK/gateway-error.log info;
events { worker_connections 256; }
http {
    access_log $WORK/gateway-access.log;
    client_body_temp_path $WORK/tmp/body;
    proxy_temp_path $WORK/tmp/proxy;
    fastcgi_temp_path $WORK/tmp/fastcgi;
    uwsgi_temp_path $WORK/tmp/uwsgi;
    scgi_temp_path $WORK/tmp/scgi;
    # The scratch root in front of Debian's default paths (checked above to be
    # usr/share/lua/5.1 and usr/lib/$MULTIARCH/lua/5.1 of /).
    lua_package_path  "$R/usr/share/lua/5.1/?.lua;;";
    lua_package_cpath "$LUADIR/?.so;;";
    include $SNIP/rsbalancer-http.conf;
    server {
        listen 127.0.0.1:$PG;
        set \$rsb_pool chat;
        recursive_error_pages on;
        location /v1/ {
            access_by_lua_block { rsbalancer.admit(ngx.var.rsb_pool) }
            include $SNIP/rsbalancer-proxy.conf;
            proxy_pass http://rsbalancer;
        }
        location @rsb_round {
            access_by_lua_block { rsbalancer.round(ngx.var.rsb_pool) }
            include $SNIP/rsbalancer-proxy.conf;
            proxy_pass http://rsbalancer;
        }
        location = /library {
            content_by_lua_block { ngx.say(require("resty.rsbalancer").library_path) }
        }
        location = /paths {
            content_by_lua_block { ngx.say(package.path, "\n", package.cpath) }
        }
    }
}
CONF

start_nginx() { # name conf port
    nginx -p "$WORK" -c "$2" -g 'daemon off; master_process on;' 2> "$WORK/$1-stderr.log" &
    PIDS+=("$!")
    for _ in $(seq 1 300); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$3") 2>/dev/null; then return 0; fi
        kill -0 "$!" 2>/dev/null || die "$1 nginx exited before listening on $3: $(cat "$WORK/$1-stderr.log")"
        sleep 0.05
    done
    die "$1 nginx does not listen on $3 after 15 s"
}
start_nginx mocks "$WORK/mock-nodes.conf" "$PA"
# rsbalancer-http.conf reads the pool config's path from nginx's environment.
export RSBALANCER_CONFIG="$WORK/pool.json"
start_nginx gateway "$WORK/gateway.conf" "$PG"
unset RSBALANCER_CONFIG

lib="$(curl -sS "http://127.0.0.1:$PG/library")" || die "GET /library failed"
[ "$lib" = "$LUADIR/rsbalancer.so" ] || die "the module was loaded from $lib, not from the package"
body='{"model":"mock-llm","messages":[{"role":"user","content":"Say hello."}]}'
for i in 1 2 3; do
    out="$(curl -sS -o "$WORK/chat.json" -w '%{http_code}' -H 'Content-Type: application/json' \
        -d "$body" "http://127.0.0.1:$PG/v1/chat/completions")" || die "chat $i: curl failed"
    [ "$out" = 200 ] || die "chat $i: status $out: $(cat "$WORK/chat.json")"
    grep -q '"choices"' "$WORK/chat.json" || die "chat $i: no choices: $(cat "$WORK/chat.json")"
done
say "the gateway of the package's snippets served chat completions ($lib)"
# What `;;` stands for in nginx's own lua module: the package's directories of /.
paths="$(curl -sS "http://127.0.0.1:$PG/paths")" || die "GET /paths failed"
grep -q ";/usr/share/lua/5.1/?.lua;" <<<"$paths" || die "nginx's default package.path lacks /usr/share/lua/5.1: $paths"
grep -q ";/usr/lib/$MULTIARCH/lua/5.1/?.so" <<<"$paths" ||
    die "nginx's default package.cpath lacks /usr/lib/$MULTIARCH/lua/5.1: $paths"

# 5. The rockspec.
ROCKSPEC="rsbalancer-$VERSION-1.rockspec"
[ -f "$ROCKSPEC" ] || die "$ROCKSPEC missing (the rockspec's version follows Cargo.toml)"
luarocks lint "$ROCKSPEC" || die "luarocks lint $ROCKSPEC failed"
# And installed into a tree of its own (`make build` is up to date: the install step).
TREE="$WORK/rocks"
luarocks make --tree "$TREE" "$ROCKSPEC" > "$WORK/luarocks-make.log" 2>&1 ||
    die "luarocks make failed: $(cat "$WORK/luarocks-make.log")"
for f in lib/lua/5.1/rsbalancer.so share/lua/5.1/resty/rsbalancer.lua share/lua/5.1/resty/rsbalancer/cdef.lua; do
    [ -f "$TREE/$f" ] || die "luarocks make did not install $f"
done
luajit -e "package.cpath = '$TREE/lib/lua/5.1/?.so'
           assert(require('rsbalancer').check_file, 'no check_file in the rock\'s rsbalancer.so')" ||
    die "the rock's rsbalancer.so does not load"
say "luarocks lint and luarocks make $ROCKSPEC ok"
say "all passed"
