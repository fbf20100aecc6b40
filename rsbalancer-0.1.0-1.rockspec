-- LuaRocks rockspec: `luarocks make` (in a checkout) or `luarocks install` builds the
-- Rust library with `make build` (needs cargo and a C toolchain on PATH) and installs
-- resty/rsbalancer.lua, resty/rsbalancer/*.lua and rsbalancer.so into the rock tree
-- (`make install-lua` with LuaRocks' LUADIR and LIBDIR). The version follows
-- Cargo.toml; `make test-deb` runs `luarocks lint` and `luarocks make --tree <scratch>`
-- on it.
rockspec_format = "3.0"
package = "rsbalancer"
version = "0.1.0-1"

source = {
   url = "git+https://github.com/rsbalancer/rsbalancer.git",
   tag = "v0.1.0",
}

description = {
   summary = "Upstream selection for nginx / OpenResty in front of LLM APIs",
   detailed = [[
A balancer for lua-nginx-module (balancer_by_lua) in one Rust shared library that
learns from every response through shared memory all nginx workers see: latency
(peak EWMA), in-flight counts, 429s (a learned concurrency limit, cooldowns that
honour Retry-After), failures and active health checks, with a pool-wide retry
budget, a shared priority admission queue, canary pools and an admin API.
Lua API: require("resty.rsbalancer") (init, init_worker, admit, balance, round,
header_filter, body_filter, log). Needs LuaJIT with FFI (lua-nginx-module or
OpenResty) and lua-resty-core.
]],
   license = "Apache-2.0",
   homepage = "https://github.com/rsbalancer/rsbalancer",
   labels = { "nginx", "openresty", "balancer", "llm", "ffi" },
}

dependencies = {
   "lua == 5.1",
}

build = {
   type = "make",
   build_target = "build",
   install_target = "install-lua",
   install_variables = {
      LUA_CDIR = "$(LIBDIR)",
      LUA_LDIR = "$(LUADIR)",
   },
}
