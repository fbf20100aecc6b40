-- resty.rsbalancer: what nginx.conf calls.
--
--   init_by_lua_block        { require("resty.rsbalancer").init("/etc/nginx/rsbalancer.json") }
--   init_worker_by_lua_block { require("resty.rsbalancer").init_worker() }
--   balancer_by_lua_block    { require("resty.rsbalancer").balance("deepseek") }
--   log_by_lua_block         { require("resty.rsbalancer").log() }
--
-- Per-request calls (pick, report) go through LuaJIT's FFI into librsbalancer.so and
-- JIT-compile; everything else goes through the mlua module `require "rsbalancer"`
-- (the same .so, found on package.cpath, so both views share one library instance).
--
-- Conventions (lua-resty-core): misuse raises "bad argument #n to 'fn' (...)";
-- runtime failures return nil, err; C functions are cached in locals; buffers are
-- allocated once per module, never per call.

local ffi = require "ffi"
local native = require "rsbalancer"

local C_ffi_string = ffi.string
local type, tostring, tonumber, error = type, tostring, tonumber, error
local byte, sub = string.byte, string.sub

local _M = { version = native.version }

if not pcall(ffi.typeof, "struct rsb_balancer") then
    -- Kept identical to include/rsbalancer.h (tests/lua/cdef_test.lua checks it).
    ffi.cdef [[
typedef enum rsb_result {
  RSB_OK = 0,
  RSB_NULL_ARGUMENT = 1,
  RSB_INVALID_ARGUMENT = 2,
  RSB_CONFIG = 3,
  RSB_NO_NODE = 4,
  RSB_SHM = 5,
  RSB_PANIC = 6,
} rsb_result;
typedef struct rsb_balancer rsb_balancer;
typedef struct rsb_node_stats {
  uint32_t weight;
  uint32_t inflight;
  uint64_t picks;
  uint64_t requests;
  uint64_t failures;
  uint64_t busy;
  uint64_t latency_sum_us;
  double ewma_us;
  int backup;
} rsb_node_stats;
enum rsb_result rsb_attach_worker(const struct rsb_balancer *b, uint32_t worker, uint32_t *out_slot);
enum rsb_result rsb_pick(const struct rsb_balancer *b, uint32_t pool, const char *key, size_t key_len, const uint32_t *tried, size_t ntried, uint32_t *out_node);
enum rsb_result rsb_report(const struct rsb_balancer *b, uint32_t node, uint32_t status, uint32_t latency_us, uint32_t retry_after_ms);
enum rsb_result rsb_set_weight(const struct rsb_balancer *b, uint32_t node, uint32_t weight);
uint64_t rsb_generation(const struct rsb_balancer *b);
size_t rsb_last_error(char *buf, size_t cap);
]]
end

-- Load the .so that `require "rsbalancer"` loaded: same path, same dlopen handle.
local function find_library()
    local path, err = package.searchpath("rsbalancer", package.cpath)
    if not path then
        error("rsbalancer: cannot find rsbalancer.so on package.cpath:" .. err, 2)
    end
    return ffi.load(path), path
end

local C, so_path = find_library()
_M.library_path = so_path

local C_pick, C_report, C_generation = C.rsb_pick, C.rsb_report, C.rsb_generation
local MAX_TRIES = 32
local tried_buf = ffi.new("uint32_t[?]", MAX_TRIES)
local out_buf = ffi.new("uint32_t[1]")
local err_buf = ffi.new("char[?]", 512)
local RSB_OK, RSB_NO_NODE = 0, 4

local bal          -- mlua balancer object
local handle       -- its `rsb_balancer *`
local generation = -1
local pools = {}   -- name -> pool index
local peers = {}   -- node slot -> { ip, port, id, pool }

local function last_error()
    C.rsb_last_error(err_buf, 512)
    return C_ffi_string(err_buf)
end

local function not_initialized(fn)
    error("rsbalancer: " .. fn .. " called before init()", 3)
end

-- Refresh the Lua-side name and address tables after a topology change.
local function sync()
    local g = tonumber(C_generation(handle))
    if g == generation then
        return
    end
    local topo = {}
    local new_peers = {}
    local names = bal:pool_names()
    for i = 1, #names do
        local name = names[i]
        topo[name] = bal:pool_index(name)
        local nodes = bal:nodes(name)
        for j = 1, #nodes do
            local n = nodes[j]
            new_peers[n.slot] = { n.ip, n.port, n.id, name, n.host }
        end
    end
    pools, peers, generation = topo, new_peers, g
end

--- init(config [, name]): in init_by_lua. `config` is a path to a JSON file, a JSON
-- string (starting with "{") or a Lua table. Raises on a bad config, so nginx
-- refuses to start (or to reload, keeping the running gateway). On reload the
-- existing shared region is kept and reconfigured.
function _M.init(config, name)
    name = name or "default"
    if type(name) ~= "string" then
        error("bad argument #2 to 'init' (string expected, got " .. type(name) .. ")", 2)
    end
    local b, err
    local t = type(config)
    if t == "string" and byte(config, 1) ~= 123 then -- not "{": a file path
        b, err = native.load_file(name, config)
    elseif t == "string" or t == "table" then
        b, err = native.shared(name, config)
    else
        error("bad argument #1 to 'init' (path, JSON string or table expected, got " .. t .. ")", 2)
    end
    if not b then
        error("rsbalancer: " .. err, 2)
    end
    bal, handle, generation = b, ffi.cast("const struct rsb_balancer *", b:handle()), -1
    sync()
    return true
end

--- init_worker(): in init_worker_by_lua. Claims this worker's in-flight slot and
-- reclaims counts left by a killed worker.
function _M.init_worker()
    if not bal then not_initialized("init_worker") end
    local id = ngx and ngx.worker and ngx.worker.id() or 0
    local slot, err = bal:attach_worker(id or 0)
    if not slot then
        return nil, err
    end
    return slot
end

--- pick(pool, key, tried): choose a node for one try. `tried` is an array of slots
-- already tried by this request (or nil). Returns slot, or nil, err.
function _M.pick(pool, key, tried)
    if not handle then not_initialized("pick") end
    sync()
    local idx = pools[pool]
    if not idx then
        if type(pool) ~= "string" then
            error("bad argument #1 to 'pick' (string expected, got " .. type(pool) .. ")", 2)
        end
        return nil, "unknown pool \"" .. pool .. "\""
    end
    local n = 0
    if tried then
        n = #tried
        if n > MAX_TRIES then n = MAX_TRIES end
        for i = 1, n do
            tried_buf[i - 1] = tried[i]
        end
    end
    local klen = 0
    if key then klen = #key end
    local rc = C_pick(handle, idx, key, klen, tried_buf, n, out_buf)
    if rc ~= RSB_OK then
        return nil, last_error(), rc == RSB_NO_NODE
    end
    return out_buf[0]
end

--- report(slot, status, latency_s [, retry_after_s]): the outcome of one try.
-- status 0 = no response (connect error, timeout). Returns true, or nil, err.
function _M.report(slot, status, latency_s, retry_after_s)
    if not handle then not_initialized("report") end
    if type(slot) ~= "number" then
        error("bad argument #1 to 'report' (number expected, got " .. type(slot) .. ")", 2)
    end
    if type(status) ~= "number" then
        error("bad argument #2 to 'report' (number expected, got " .. type(status) .. ")", 2)
    end
    if type(latency_s) ~= "number" then
        error("bad argument #3 to 'report' (number expected, got " .. type(latency_s) .. ")", 2)
    end
    local us = latency_s * 1e6
    if us > 4294967295 then us = 4294967295 elseif us < 0 then us = 0 end
    local ra = 0
    if retry_after_s then
        ra = retry_after_s * 1000
        if ra > 4294967295 then ra = 4294967295 elseif ra < 0 then ra = 0 end
    end
    if C_report(handle, slot, status, us, ra) ~= RSB_OK then
        return nil, last_error()
    end
    return true
end

--- peer(slot): ip, port, id, pool, host of a node slot (after a pick).
function _M.peer(slot)
    local p = peers[slot]
    if not p then return nil end
    return p[1], p[2], p[3], p[4], p[5]
end

-- Parse the next number of an nginx upstream list ("0.012, 0.004 : 0.100") at
-- position i. Returns the value (nil for "-" or garbage) and the next position,
-- or nil, nil at the end. Byte-level so that it JIT-compiles (string.gmatch does not).
local function next_item(s, i)
    local len = #s
    while i <= len do
        local c = byte(s, i)
        if c ~= 32 and c ~= 44 and c ~= 58 then break end -- ' ' ',' ':'
        i = i + 1
    end
    if i > len then return nil, nil end
    local j = i
    while j <= len do
        local c = byte(s, j)
        if c == 32 or c == 44 or c == 58 then break end
        j = j + 1
    end
    return tonumber(sub(s, i, j - 1)), j
end
_M._next_item = next_item

--- report_tries(tried, statuses, times): report every try of a request, matching
-- the slots picked (in order) with nginx's comma-separated $upstream_status and
-- $upstream_response_time. A try with no matching entry is reported as "no
-- response", so every pick is released exactly once.
function _M.report_tries(tried, statuses, times)
    local si, ti = 1, 1
    for k = 1, #tried do
        local status, latency
        if statuses then status, si = next_item(statuses, si) end
        if times then latency, ti = next_item(times, ti) end
        if si == nil then statuses = nil end
        if ti == nil then times = nil end
        C_report(handle, tried[k], status or 0, (latency or 0) * 1e6, 0)
    end
end

local ngx_balancer

--- balance(pool [, key]): in balancer_by_lua. Picks a node not yet tried by this
-- request and sets it as the peer. On a retry, nginx has already counted the
-- previous try; it is reported with the others in log().
function _M.balance(pool, key)
    if not handle then not_initialized("balance") end
    if not ngx_balancer then ngx_balancer = require "ngx.balancer" end
    local ctx = ngx.ctx
    local tried = ctx.rsb_tried
    if not tried then
        tried = {}
        ctx.rsb_tried = tried
        ctx.rsb_pool = pool
        local more = _M.max_tries - 1
        if more > 0 then ngx_balancer.set_more_tries(more) end
    end
    local slot, err = _M.pick(pool, key, tried)
    if not slot then
        ngx.log(ngx.WARN, "rsbalancer: ", err)
        return ngx.exit(503)
    end
    tried[#tried + 1] = slot
    local p = peers[slot]
    local ok, perr = ngx_balancer.set_current_peer(p[1], p[2])
    if not ok then
        ngx.log(ngx.ERR, "rsbalancer: set_current_peer ", p[1], ":", p[2], ": ", perr)
        return ngx.exit(500)
    end
end

--- Tries per request (first try included) that balance() asks nginx for; nginx
-- also caps it with proxy_next_upstream_tries.
_M.max_tries = 3

--- log(): in log_by_lua. Reports every try of the request.
function _M.log()
    local ctx = ngx.ctx
    local tried = ctx.rsb_tried
    if not tried then return end
    local var = ngx.var
    _M.report_tries(tried, var.upstream_status, var.upstream_response_time)
    ctx.rsb_tried = nil
end

--- set_weight(pool, id, weight): change a node's base weight in every worker.
function _M.set_weight(pool, id, weight)
    if not bal then not_initialized("set_weight") end
    if type(pool) ~= "string" then
        error("bad argument #1 to 'set_weight' (string expected, got " .. type(pool) .. ")", 2)
    end
    if type(id) ~= "string" then
        error("bad argument #2 to 'set_weight' (string expected, got " .. type(id) .. ")", 2)
    end
    if type(weight) ~= "number" or weight % 1 ~= 0 or weight < 1 or weight > 10000 then
        error("bad argument #3 to 'set_weight' (integer weight 1..10000 expected, got "
              .. tostring(weight) .. ")", 2)
    end
    return bal:set_weight(pool, id, weight)
end

--- stats(pool): { [id] = { weight=, inflight=, requests=, ... } }, or nil, err.
function _M.stats(pool)
    if not bal then not_initialized("stats") end
    return bal:stats(pool)
end

--- nodes(pool): the pool's nodes as configured, or nil, err.
function _M.nodes(pool)
    if not bal then not_initialized("nodes") end
    return bal:nodes(pool)
end

--- balancer(): the mlua object, for control-plane calls not wrapped here.
function _M.balancer()
    return bal
end

return _M
