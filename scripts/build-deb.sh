#!/usr/bin/env bash
# Builds the Debian package rsbalancer_<version>-1_<arch>.deb (`make deb`) from a
# staged tree with dpkg-deb: no network, no debhelper. Run after `make build`.
#
# Where it installs, and why (Debian 12's nginx-core + libnginx-mod-http-lua, whose
# LuaJIT is libluajit2-5.1-2; `luajit -e 'print(package.path, package.cpath)'` shows
# its default search paths, which lua-nginx-module keeps without lua_package_path):
#   /usr/share/lua/5.1/resty/rsbalancer.lua, resty/rsbalancer/*.lua
#       on LuaJIT's default package.path, next to lua-resty-core's resty/core.lua
#   /usr/lib/<multiarch>/lua/5.1/rsbalancer.so
#       on LuaJIT's default package.cpath (Debian's place for Lua C modules);
#       resty.rsbalancer ffi.load()s the file `require "rsbalancer"` found
#   /usr/lib/<multiarch>/librsbalancer.so, /usr/include/rsbalancer.h
#       the C library (no Lua symbols) and its header, for C programs
#   /usr/share/perl5/RsbalancerCheck.pm
#       on the system Perl's @INC (Debian's vendor directory), which nginx's Perl module
#       uses: `perl_require` needs no `perl_modules` line (nginx-conf/perl)
#   /usr/share/rsbalancer/nginx/*.conf
#       the snippets (nginx-conf/snippets), included by absolute path. Not
#       /etc/nginx/snippets: files under /etc are conffiles, kept as edited on upgrade
#       (and asked about), while these are meant to be included unedited and to change
#       with the module they call; what is site-specific (pool name, config path,
#       locations) lives in the site's own files.
# Depends: nginx-core, libnginx-mod-http-lua, lua-resty-core, and the shared libraries
# the two .so files link (libc6 at the newest symbol version they use, libgcc-s1).
#
# Usage: scripts/build-deb.sh <output .deb path>
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

die() { echo "build-deb: $*" >&2; exit 1; }

[ "$#" -eq 1 ] || die "usage: $0 <output.deb>"
OUT="$1"
command -v dpkg-deb >/dev/null || die "dpkg-deb not found (package dpkg)"
command -v objdump >/dev/null || die "objdump not found (package binutils: make deps)"
command -v strip >/dev/null || die "strip not found (package binutils: make deps)"
command -v gcc >/dev/null || die "gcc not found (make deps)"
for f in build/lib/rsbalancer.so build/lib/librsbalancer.so; do
    [ -f "$f" ] || die "$f is missing: run 'make build' first"
done

VERSION="$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)"
[ -n "$VERSION" ] || die "no version in Cargo.toml"
ARCH="$(dpkg --print-architecture)"
MULTIARCH="$(gcc -print-multiarch)"
[ -n "$MULTIARCH" ] || die "gcc -print-multiarch printed nothing"

STAGE="$(mktemp -d "${TMPDIR:-/tmp}/rsbalancer-deb.XXXXXX")"
trap 'rm -rf "$STAGE"' EXIT
PKG="$STAGE/rsbalancer"

"${MAKE:-make}" --no-print-directory -s install DESTDIR="$PKG" PREFIX=/usr \
    LUA_LDIR=/usr/share/lua/5.1 \
    LUA_CDIR="/usr/lib/$MULTIARCH/lua/5.1" \
    LIBDIR="/usr/lib/$MULTIARCH" \
    INCLUDEDIR=/usr/include \
    PERL_DIR=/usr/share/perl5 \
    SNIPPET_DIR=/usr/share/rsbalancer/nginx

# Debug information stays out of the package (the build keeps it for profiling).
strip --strip-unneeded "$PKG/usr/lib/$MULTIARCH/lua/5.1/rsbalancer.so" "$PKG/usr/lib/$MULTIARCH/librsbalancer.so"

# Shared-library dependencies of the two .so files (what dpkg-shlibdeps would find).
libs="$PKG/usr/lib/$MULTIARCH/lua/5.1/rsbalancer.so $PKG/usr/lib/$MULTIARCH/librsbalancer.so"
# shellcheck disable=SC2086
glibc="$(objdump -T $libs | grep -o 'GLIBC_[0-9][0-9.]*' | sed 's/GLIBC_//' | sort -V | tail -n 1)"
[ -n "$glibc" ] || die "no GLIBC symbol version found in $libs"
shlibs="libc6 (>= $glibc)"
# shellcheck disable=SC2086
for needed in $(objdump -p $libs | awk '$1 == "NEEDED" { print $2 }' | sort -u); do
    case "$needed" in
        libc.so.6|libm.so.6|libdl.so.2|libpthread.so.0|librt.so.1|ld-linux-*) ;;
        libgcc_s.so.1) shlibs="$shlibs, libgcc-s1" ;;
        *) die "no Debian package known for $needed (a new dependency of the .so files): add it here" ;;
    esac
done

size_kb="$(du -sk "$PKG/usr" | cut -f1)"
mkdir -p "$PKG/DEBIAN"
cat > "$PKG/DEBIAN/control" <<CONTROL
Package: rsbalancer
Version: $VERSION-1
Architecture: $ARCH
Maintainer: rsbalancer maintainers <rsbalancer@localhost>
Installed-Size: $size_kb
Depends: nginx-core, libnginx-mod-http-lua, lua-resty-core, $shlibs
Section: httpd
Priority: optional
Description: upstream selection for nginx in front of LLM APIs
 A balancer for lua-nginx-module (balancer_by_lua) that learns from every
 response through shared memory all nginx workers see: latency, in-flight
 counts, 429s and cooldowns, failures and health checks, with a pool-wide
 retry budget, an admission queue, canary pools and an admin API.
 .
 Lua module: resty.rsbalancer (/usr/share/lua/5.1) with rsbalancer.so; nginx
 snippets in /usr/share/rsbalancer/nginx; C library and header; the Perl
 module RsbalancerCheck, with which nginx -t checks pool configs too.
CONTROL
(cd "$PKG" && find usr -type f -print0 | sort -z | xargs -0 md5sum > DEBIAN/md5sums)

mkdir -p "$(dirname "$OUT")"
dpkg-deb --root-owner-group -Zxz --build "$PKG" "$OUT.tmp" >/dev/null
mv -f "$OUT.tmp" "$OUT"
echo "build-deb: $OUT"
