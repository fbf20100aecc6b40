-- resty.rsbalancer.canary: the canary split (docs/overload.md, "Canary split").
--
-- Per request, `choose(pool, idx)` decides the arm once (resty.rsbalancer keeps it in
-- the request's state, so admit(), balance() and every retry use the same arm): the share is
-- read from shared memory on every request (rsb_canary, one FFI call, no lock), so a
-- change by any worker, the admin API, the ramp or a rollback applies at once. The
-- request's bucket is crc32(key) % 10000 for a sticky key (a header, a cookie or the
-- client address) or a random draw; the canary takes buckets below the share. A fixed
-- bucket compared with the share keeps a user on one arm, and raising the share only
-- moves users from the primary to the canary. A request without the sticky key (no
-- such header or cookie, or an empty one) is drawn at random.
--
-- Pools without a canary block cost one table lookup. Everything here JIT-compiles
-- (FFI, ngx.var and ngx.crc32_short of lua-resty-core, math.random).
--
-- `start(bal)` runs the ramp and the rollback: every worker ticks about once a second
-- (bal:canary_tick()); each step or rollback is claimed with a compare-and-swap in
-- shared memory, so exactly one worker applies and logs it (rollbacks at error level,
-- ramp steps at notice).

local ffi = require "ffi"
require "resty.rsbalancer.cdef"

local random, match, lower, gsub, pairs = math.random, string.match, string.lower, string.gsub, pairs

local _M = {}

local NO_POOL = 0xFFFFFFFF -- UINT32_MAX (rsb_canary): the pool has no canary
local PARTS = ffi.C.RSB_SHARE_PARTS -- shares are in parts per 10,000 (enum rsb_share)
local pool_buf = ffi.new("uint32_t[1]")
local share_buf = ffi.new("uint32_t[1]")

local C_canary, handle
local specs = {} -- primary pool name -> { var = nginx variable of the sticky key, or false }
local names = {} -- pool index -> pool name

--- bind(C, handle): the FFI library and the `rsb_balancer *` (resty.rsbalancer's init).
function _M.bind(C, h)
    C_canary, handle = C.rsb_canary, h
end

-- The nginx variable holding a sticky key ("header:X-User" -> "http_x_user"), or false.
local function key_var(key)
    if key == "addr" then
        return "binary_remote_addr"
    end
    local kind, name = match(key or "random", "^(%a+):(.+)$")
    if kind == "header" then
        return "http_" .. lower((gsub(name, "-", "_")))
    elseif kind == "cookie" then
        return "cookie_" .. name
    end
    return false
end
_M._key_var = key_var

--- sync(configs, index): rebuild after a topology change; `configs` maps pool names
-- to their pool_config(), `index` pool names to pool indexes.
function _M.sync(configs, index)
    local new_specs, new_names = {}, {}
    for name, cfg in pairs(configs) do
        new_names[index[name]] = name
        if cfg.canary then
            new_specs[name] = { var = key_var(cfg.canary.key) }
        end
    end
    specs, names = new_specs, new_names
end

--- choose(pool, idx): the arm of this request: the pool index and name to pick from
-- (the canary's, or `idx` and `pool` themselves).
function _M.choose(pool, idx)
    local spec = specs[pool]
    if not spec or C_canary(handle, idx, pool_buf, share_buf) ~= 0 then
        return idx, pool
    end
    local share, cidx = share_buf[0], pool_buf[0]
    if share == 0 or cidx == NO_POOL then
        return idx, pool
    end
    local bucket
    local var = spec.var
    if var then
        local key = ngx.var[var]
        if key and key ~= "" then
            bucket = ngx.crc32_short(key) % PARTS
        end
    end
    if not bucket then
        bucket = random(0, PARTS - 1)
    end
    if bucket < share then
        local cname = names[cidx]
        if cname then
            return cidx, cname
        end
    end
    return idx, pool
end

local function tick(premature, bal)
    if premature then return end
    local ok, events, err = pcall(bal.canary_tick, bal)
    if not ok or not events then
        ngx.log(ngx.ERR, "rsbalancer: canary tick failed: ", ok and err or events)
        return
    end
    for i = 1, #events do
        local e = events[i]
        ngx.log(e.rollback and ngx.ERR or ngx.NOTICE, "rsbalancer: ", e.message)
    end
end

--- start(bal [, interval_s]): in init_worker. A timer every `interval_s` (1 s) when
-- some pool's canary has a ramp or a rollback block.
function _M.start(bal, interval_s)
    local pools = bal:pool_names() or {}
    for i = 1, #pools do
        local cfg = bal:pool_config(pools[i])
        local c = cfg and cfg.canary
        if c and (c.ramp or c.rollback) then
            return ngx.timer.every(interval_s or 1, tick, bal)
        end
    end
    return true
end

return _M
