#!/usr/bin/env bash
# Validate a pool config the way init() will (nginx -t cannot: lua-nginx-module skips
# init_by_lua under -t). Exit 0 and "ok", or 1 and the error naming field and value.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
[ $# -eq 1 ] || { echo "usage: $0 path/to/rsbalancer.json" >&2; exit 2; }
exec luajit - "$1" <<LUA
package.cpath = "$ROOT/build/lib/?.so;" .. package.cpath
local ok, err = require("rsbalancer").check_file(arg[1])
if not ok then io.stderr:write(arg[1], ": ", err, "\n") os.exit(1) end
print(arg[1] .. ": ok")
LUA
