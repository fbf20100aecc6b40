-- resty.rsbalancer: what nginx.conf calls.
--
--   init_by_lua_block        { require("resty.rsbalancer").init("/etc/nginx/rsbalancer.json") }
--   init_worker_by_lua_block { require("resty.rsbalancer").init_worker() }
--   balancer_by_lua_block    { require("resty.rsbalancer").balance("deepseek") }
--   header_filter_by_lua_block { require("resty.rsbalancer").header_filter() }
--   body_filter_by_lua_block { require("resty.rsbalancer").body_filter() }
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
local bit = require "bit"
local native = require "rsbalancer"

local C_ffi_string = ffi.string
local type, tostring, tonumber, error = type, tostring, tonumber, error
local byte, sub, find, match = string.byte, string.sub, string.find, string.match
local ngx_now = ngx and ngx.now

local _M = { version = native.version }

-- The C ABI, generated from include/rsbalancer.h by `make header` (declared once).
require "resty.rsbalancer.cdef"

-- Load the .so that `require "rsbalancer"` loaded: same path, same dlopen handle.
local function find_library()
    local path, err = package.searchpath("rsbalancer", package.cpath)
    if not path then
        error("rsbalancer: cannot find rsbalancer.so on package.cpath:" .. err, 2)
    end
    return ffi.load(path), path
end

local C, so_path = find_library()
local admission = require "resty.rsbalancer.admission"
local ASK_NONE = admission.ask_key(nil) -- the ask of a request with nothing to tell
_M.library_path = so_path
local canary = require "resty.rsbalancer.canary"

local C_pick, C_report, C_generation = C.rsb_pick, C.rsb_report, C.rsb_generation
local C_pick_ask, C_pick_retry, C_inspect = C.rsb_pick_ask, C.rsb_pick_retry, C.rsb_inspect
local C_may_retry, C_available = C.rsb_may_retry, C.rsb_available
local C_report_llm, C_sse_first = C.rsb_report_llm, C.rsb_sse_first
local C_usage_event, C_answer_tail = C.rsb_usage_event, C.rsb_answer_tail
local MAX_TRIES = 32
-- Why rsb_may_retry refused (enum rsb_retry_denied), as X-RSB-Admission says it; "no
-- node free now" is not a refusal for a request that may take another round.
local RETRY_NO_NODE = C.RSB_RETRY_DENIED_NO_NODE
local RETRY_REASON = {
    [C.RSB_RETRY_DENIED_MAX_TRIES] = "max_tries",
    [C.RSB_RETRY_DENIED_DEADLINE] = "deadline",
    [C.RSB_RETRY_DENIED_BUDGET] = "retry_budget",
}
local tried_buf = ffi.new("uint32_t[?]", MAX_TRIES)
local out_buf = ffi.new("uint32_t[2]")
local wait_buf = ffi.new("uint64_t[1]")
local err_buf = ffi.new("char[?]", 512)
-- Stream signals (src/stream.rs): what body_filter() and log() hand the library.
local sig_buf = ffi.new("rsb_signals[1]")
local tail_buf = ffi.new("rsb_tail[1]")
local range_buf = ffi.new("uint64_t[2]")
local SIG_USAGE, SIG_CUT = C.RSB_SIGNAL_FLAG_USAGE, C.RSB_SIGNAL_FLAG_CUT
local SIG_ENDED = bit.bor(C.RSB_SIGNAL_FLAG_FINISHED, C.RSB_SIGNAL_FLAG_DONE)
local band = bit.band
-- Numbers shared with the library (src/abi.rs, include/rsbalancer.h), read once.
local RSB_OK, RSB_NO_NODE = C.RSB_OK, C.RSB_NO_NODE
local PREFER_PROBE = C.RSB_PREFER_PROBE
local WEIGHT_MIN, WEIGHT_MAX = C.RSB_WEIGHT_MIN, C.RSB_WEIGHT_MAX
local PRIORITY_MIN, PRIORITY_MAX = C.RSB_PRIORITY_MIN, C.RSB_PRIORITY_MAX
local ceil = math.ceil

local bal          -- mlua balancer object
local handle       -- its `rsb_balancer *`
local gen_word     -- where its generation is kept (rsb_generation_word)
local stage        -- the config init() staged, made live by init_worker()
local generation = -1
local pools = {}   -- name -> pool index
local policy = {}  -- name -> { no_node_status=, non_idempotent=, rounds=, deadline_s=, size=, ... }
local peers = {}   -- node slot -> { ip, port, id, pool }
local budgeted = {} -- node slot -> true for a node with a tpm or rpm budget
-- Which rate-limit headers a node sends (see note_headroom): slot -> HR_OPENAI,
-- HR_ANTHROPIC, or false after HR_MISSES responses with none; responses with none
-- running; and, for a node that sends none, responses left before the next probe
-- (0 for every other node: sync() fills it for every slot).
local hr_style, hr_miss, hr_skip = {}, {}, {}

local function last_error()
    C.rsb_last_error(err_buf, 512)
    return C_ffi_string(err_buf)
end

local function not_initialized(fn)
    error("rsbalancer: " .. fn .. " called before init()", 3)
end

-- Refresh the Lua-side name and address tables after a topology change. The check on
-- every request reads the shared generation word (no call); a change is confirmed by
-- rsb_generation, whose atomic read orders the topology reads below after it.
local function sync()
    if tonumber(gen_word[0]) == generation then
        return
    end
    local g = tonumber(C_generation(handle))
    if g == generation then
        return
    end
    local topo = {}
    local new_peers = {}
    local new_policy = {}
    local new_budgeted = {}
    local configs = {}
    local names = bal:pool_names()
    for i = 1, #names do
        local name = names[i]
        topo[name] = bal:pool_index(name)
        local cfg = bal:pool_config(name)
        configs[name] = cfg
        new_policy[name] = {
            no_node_status = cfg.no_node_status,
            non_idempotent = cfg.retry.non_idempotent,
            rounds = cfg.retry.rounds,
            deadline_s = cfg.retry.deadline_ms / 1000,
            size = #bal:nodes(name),
            health = cfg.health,
            admission = cfg.admission,
            -- Slow nodes as overflow: admit() holds a faster node's slot first (not
            -- with chash or prefix: the key decides the node, the load guard spreads).
            hold_faster = cfg.limit.slow_factor > 0 and cfg.algorithm ~= "chash"
                and cfg.algorithm ~= "prefix",
            inspect = cfg.tokens.inspect_body,
            add_usage = cfg.stream.add_usage,
        }
        local with_provider = false
        for j = 1, #cfg.nodes do
            local nc = cfg.nodes[j]
            if nc.provider then with_provider = true end
            if nc.tpm or nc.rpm then new_budgeted[nc.slot] = true end
        end
        new_policy[name].providers = with_provider
        local nodes = bal:nodes(name)
        for j = 1, #nodes do
            local n = nodes[j]
            -- set_current_peer wants an IPv6 address in brackets.
            local ip = find(n.ip, ":", 1, true) and "[" .. n.ip .. "]" or n.ip
            new_peers[n.slot] = { ip, n.port, n.id, name, n.host }
        end
    end
    local new_skip = {}
    for slot in pairs(new_peers) do new_skip[slot] = 0 end
    canary.sync(configs, topo)
    pools, peers, policy, generation = topo, new_peers, new_policy, g
    budgeted = new_budgeted
    -- A slot may hold another node now: what its headers looked like is relearned.
    hr_style, hr_miss, hr_skip = {}, {}, new_skip
end

--- init(config [, name]): in init_by_lua. `config` is a path to a JSON file, a JSON
-- string (starting with "{") or a Lua table. Raises on a bad config, so nginx
-- refuses to start (or to reload, keeping the running gateway). On reload the
-- existing shared region is kept and the new config is checked against it and
-- staged: nginx runs init_by_lua before it knows whether the reload succeeds, so the
-- config goes live only when the first new worker runs init_worker(). A reload that
-- nginx then refuses leaves the running gateway exactly as it was; after one that
-- succeeds, the old workers finish their requests on the tables they began with.
function _M.init(config, name)
    name = name or "default"
    if type(name) ~= "string" then
        error("bad argument #2 to 'init' (string expected, got " .. type(name) .. ")", 2)
    end
    local b, err
    local t = type(config)
    if t == "string" and not find(config, "^%s*{") then -- not JSON text: a file path
        b, err = native.stage_file(name, config)
    elseif t == "string" or t == "table" then
        b, err = native.stage(name, config)
    else
        error("bad argument #1 to 'init' (path, JSON string or table expected, got " .. t .. ")", 2)
    end
    if not b then
        error("rsbalancer: " .. err, 2)
    end
    bal, handle, generation, stage = b, ffi.cast("const struct rsb_balancer *", b:handle()), -1, err
    gen_word = C.rsb_generation_word(handle)
    canary.bind(C, handle)
    if b:stage_is_live(stage) then
        sync() -- the first start: live at once; a reload's config waits for init_worker()
    end
    return true
end

-- Make the config init() staged live (the first new worker after a reload does; the
-- others find it live), then build the Lua tables from it.
local function apply_stage()
    local applied, err = bal:apply_stage(stage)
    if ngx and applied == nil then
        -- Checked in init() against the same region: only a race with a run-time change
        -- (slots taken meanwhile) gets here. The gateway goes on with the config it has.
        ngx.log(ngx.ERR, "rsbalancer: the reloaded config cannot be applied, still serving the previous one: ", err)
    elseif ngx and applied then
        ngx.log(ngx.NOTICE, "rsbalancer: the reloaded config is live")
    end
    generation = -1
    sync()
end

-- Timer: log the node transitions this worker announced (cooling, ejected, back:
-- src/notice.rs), one notice line each, rate-limited per node in the library.
local function log_notices()
    local lines, dropped = bal:take_notices()
    for i = 1, #lines do
        ngx.log(ngx.NOTICE, "rsbalancer: ", lines[i])
    end
    if dropped > 0 then
        ngx.log(ngx.NOTICE, "rsbalancer: ", dropped, " more node transition lines dropped",
                " (more than ", #lines, " in one second in this worker)")
    end
end

--- init_worker(): in init_worker_by_lua. Claims this worker's in-flight slot,
-- reclaims counts left by a killed worker, and starts the health-check timers and
-- the timer that logs node transitions.
function _M.init_worker()
    if not bal then not_initialized("init_worker") end
    apply_stage()
    local id = ngx and ngx.worker and ngx.worker.id() or 0
    local slot, err = bal:attach_worker(id or 0)
    if not slot then
        ngx.log(ngx.ERR, "rsbalancer: ", err)
        return nil, err
    end
    if ngx and ngx.timer then
        math.randomseed(ngx.worker.pid() * 7919 + ngx.now() * 1000)
        local ok, herr = require("resty.rsbalancer.health").start(bal)
        if not ok then
            ngx.log(ngx.ERR, "rsbalancer: cannot start health checks: ", herr)
        end
        ok, herr = require("resty.rsbalancer.scrape").start(bal)
        if not ok then
            ngx.log(ngx.ERR, "rsbalancer: cannot start queue scrapes: ", herr)
        end
        ok, herr = canary.start(bal)
        if not ok then
            ngx.log(ngx.ERR, "rsbalancer: cannot start the canary timer: ", herr)
        end
        local eok, eerr = require("resty.rsbalancer.emergency").start(bal)
        if not eok then
            ngx.log(ngx.ERR, "rsbalancer: cannot start the emergency detector: ", eerr)
        end
        local sync_ms = bal:cluster_sync_ms()
        if sync_ms then
            -- Cluster mode: the worker holding the lease runs the Redis sync thread.
            local cok, cerr = ngx.timer.every(sync_ms / 1000, function(premature)
                if premature then return end
                local line, alerts = bal:cluster_tick()
                if line then ngx.log(ngx.WARN, "rsbalancer: ", line) end
                if alerts then
                    -- Emergency transitions this gateway won for the whole fleet.
                    local em = require "resty.rsbalancer.emergency"
                    for i = 1, #alerts do em.announce(bal, alerts[i]) end
                end
            end)
            if not cok then
                ngx.log(ngx.ERR, "rsbalancer: cannot start the cluster sync: ", cerr)
            end
        end
        if bal:has_discovery() then
            -- Service discovery: the worker holding the lease runs the sources'
            -- threads; the first tick at once, so a pool that starts empty fills in.
            local tick = function(premature)
                if premature then return end
                local lines = bal:discovery_tick()
                for i = 1, #lines do ngx.log(ngx.WARN, "rsbalancer: ", lines[i]) end
            end
            local dok, derr = ngx.timer.at(0, tick)
            if dok then dok, derr = ngx.timer.every(1, tick) end
            if not dok then
                ngx.log(ngx.ERR, "rsbalancer: cannot start service discovery: ", derr)
            end
        end
        local nok, nerr = ngx.timer.every(1, log_notices)
        if not nok then
            ngx.log(ngx.ERR, "rsbalancer: cannot start the node transition log: ", nerr)
        end
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
        if type(tried) ~= "table" then
            error("bad argument #3 to 'pick' (table expected, got " .. type(tried) .. ")", 2)
        end
        n = #tried
        if n > MAX_TRIES then
            error("bad argument #3 to 'pick' (at most " .. MAX_TRIES .. " tried nodes)", 2)
        end
        for i = 1, n do
            local s = tried[i]
            if type(s) ~= "number" then
                error("bad argument #3 to 'pick' (tried[" .. i .. "] is not a node slot)", 2)
            end
            tried_buf[i - 1] = s
        end
    end
    local klen = 0
    if key then
        if type(key) ~= "string" then
            error("bad argument #2 to 'pick' (string expected, got " .. type(key) .. ")", 2)
        end
        klen = #key
    end
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
    if type(latency_s) ~= "number" or latency_s ~= latency_s or latency_s < 0 then
        error("bad argument #3 to 'report' (latency in seconds >= 0 expected, got "
              .. tostring(latency_s) .. ")", 2)
    end
    local us = latency_s * 1e6
    if us > 4294967295 then us = 4294967295 end
    local ra = 0
    if retry_after_s then
        ra = retry_after_s * 1000
        if ra > 4294967295 then ra = 4294967295 elseif not (ra >= 0) then ra = 0 end -- NaN too
    end
    if C_report(handle, slot, status, us, ra) ~= RSB_OK then
        return nil, last_error()
    end
    return true
end

--- peer(slot): ip, port, id, pool, host of a node slot (after a pick); an IPv6 ip in
-- brackets, as set_current_peer wants it.
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

-- The k-th item (1-based) of an nginx upstream list, or nil.
local function item(s, k)
    if not s then return nil end
    local v, i = nil, 1
    for _ = 1, k do
        v, i = next_item(s, i)
        if not i then return nil end
    end
    return v
end

--- report_tries(tried, statuses, times [, first [, retry_after_s [, offset]]]): report
-- tries `first`..#tried of a request (default 1), matching the slots picked (in order)
-- with nginx's comma-separated $upstream_status and $upstream_response_time, where
-- try k is item k + `offset` (default 0; earlier rounds of the request add items);
-- `retry_after_s` is the last try's Retry-After. A try with no matching status is
-- reported as cancelled (499): it releases the try and says nothing about the node.
-- Every pick is released exactly once.
function _M.report_tries(tried, statuses, times, first, retry_after_s, offset)
    if not handle then not_initialized("report_tries") end
    first = first or 1
    offset = offset or 0
    local n = #tried
    for k = first, n do
        local status = item(statuses, k + offset) or 499
        local us = (item(times, k + offset) or 0) * 1e6
        if us > 4294967295 or us ~= us then us = 4294967295 elseif us < 0 then us = 0 end
        local ra = 0
        if k == n and retry_after_s then
            ra = retry_after_s * 1000
            if ra > 4294967295 then ra = 4294967295 elseif not (ra >= 0) then ra = 0 end
        end
        if C_report(handle, tried[k], status, us, ra) ~= RSB_OK and ngx then
            ngx.log(ngx.ERR, "rsbalancer: report: ", last_error())
        end
    end
end

-- Retry-After: delay-seconds or an HTTP-date, parsed and bounded in Rust
-- (src/headers.rs: one day at most; `inf`, `-1`, `1e9` are not Retry-Afters):
-- milliseconds from now, or nil when absent or not a Retry-After.
local ra_buf = ffi.new("uint32_t[1]")
local function retry_after_ms(v)
    if v and v ~= "" and C.rsb_retry_after_ms(v, #v, ra_buf) == RSB_OK then
        return ra_buf[0]
    end
    return nil
end

-- The node's wait as the last response said it: `retry-after-ms` (Azure, OpenAI:
-- milliseconds) when present, else Retry-After. Read only off the fast path.
local function node_retry_after_ms(var)
    local v = var.upstream_http_retry_after_ms
    if v and C.rsb_retry_after_ms_value(v, #v, ra_buf) == RSB_OK then
        return ra_buf[0]
    end
    return retry_after_ms(var.upstream_http_retry_after)
end

-- Provider headroom (src/headroom.rs): what the response of the try on `slot` said of
-- its rate limits, parsed and kept in Rust for every worker's picks. Each
-- $upstream_http_* read allocates a string, so a node is probed by one header of the
-- style it sends; a node that sent none HR_MISSES times running is probed only every
-- HR_PROBE_EVERY-th response (a provider that starts sending them is seen soon): the
-- responses between two probes cost one count down. `var` is ngx.var, or nil to have
-- it looked up only when a header is read.
local HR_OPENAI, HR_ANTHROPIC, HR_MISSES, HR_PROBE_EVERY = 1, 2, 3, 256
local hr_buf = ffi.new("rsb_headroom[1]")
local function note_headroom(var, slot)
    local skip = hr_skip[slot]
    if skip ~= 0 then
        if skip then
            hr_skip[slot] = skip - 1
            return
        end
        hr_skip[slot] = 0 -- a slot sync() has not seen yet
    end
    var = var or ngx.var
    local style = hr_style[slot]
    if style == false then style = nil end -- this response is a probe
    local rr, xr, rt, xt
    if style ~= HR_ANTHROPIC then
        rr = var.upstream_http_x_ratelimit_remaining_requests
        if rr then
            style = HR_OPENAI
            xr = var.upstream_http_x_ratelimit_reset_requests
            rt = var.upstream_http_x_ratelimit_remaining_tokens
            xt = var.upstream_http_x_ratelimit_reset_tokens
        end
    end
    if not rr and style ~= HR_OPENAI then
        rr = var.upstream_http_anthropic_ratelimit_requests_remaining
        if rr then
            style = HR_ANTHROPIC
            xr = var.upstream_http_anthropic_ratelimit_requests_reset
            rt = var.upstream_http_anthropic_ratelimit_tokens_remaining
            xt = var.upstream_http_anthropic_ratelimit_tokens_reset
        end
    end
    if not rr then
        local m = (hr_miss[slot] or 0) + 1
        hr_miss[slot] = m
        if style == nil and m >= HR_MISSES then
            hr_style[slot], hr_skip[slot] = false, HR_PROBE_EVERY - 1
        end
        return
    end
    hr_style[slot], hr_miss[slot] = style, 0
    local h = hr_buf[0]
    h.remaining_requests, h.remaining_requests_len = rr, #rr
    h.reset_requests, h.reset_requests_len = xr, xr and #xr or 0
    h.remaining_tokens, h.remaining_tokens_len = rt, rt and #rt or 0
    h.reset_tokens, h.reset_tokens_len = xt, xt and #xt or 0
    C.rsb_note_headroom(handle, slot, hr_buf)
end

-- Settle the token reservation of the try on `slot` (src/headroom.rs), for a node
-- with a budget: a served try keeps its estimate or takes the response's usage when
-- known (st.usage_prompt + st.usage_completion, set by the body filter); a refused
-- or failed one gives its tokens back.
local function settle(st, slot, status)
    if not budgeted[slot] then return end
    local reserved = st.tokens or 0
    local actual = 0
    if status >= 200 and status < 300 then
        if not st.usage_prompt then return end -- keeps the estimate
        actual = st.usage_prompt + (st.usage_completion or 0)
        if actual > 4294967295 then actual = 4294967295 end
    end
    if actual == reserved then return end
    local age = st.picked and (ngx_now() - st.picked) * 1000 or 0
    if age < 0 then age = 0 end
    C.rsb_settle(handle, slot, reserved, actual, age)
end

-- Ending a try in balancer_by_lua: lua-nginx-module turns ngx.exit(<HTTP status>) into
-- NGX_ERROR, which nginx answers with 500 whatever the status. NGX_BUSY instead makes
-- nginx's upstream see "no live upstreams" and answer 502 Bad Gateway, the truthful
-- status for a request that has no node left to go to (admit() answers the pool's
-- no_node_status with Retry-After before the request ever gets here; this is the rare
-- case of a node taken between admit and the pick, or a retry refused by the policy).
local NGX_BUSY = -3

local IDEMPOTENT = { GET = true, HEAD = true, OPTIONS = true, PUT = true, DELETE = true, TRACE = true }
local ngx_balancer
-- ngx.balancer.set_more_tries's FFI function, called directly with the request balance()
-- has at hand (its signature is the same in every lua-nginx-module release), and where
-- it would put a warning.
local C_more_tries
local more_tries_err = ffi.new("char *[1]")

-- The request's address: the same in every location it goes through (a new round is
-- an internal redirect, which empties ngx.ctx but keeps the request).
-- Also returns the request itself, for lua-nginx-module's own FFI functions, called
-- directly below (what ngx.req.start_time() and ngx.status do, without their look-ups:
-- ngx.status goes through a metatable and a getter table).
local get_request, C_start_time, C_resp_status
local uintptr_t = ffi.typeof("uintptr_t") -- parsed once, not per request
local function request_key()
    if not get_request then
        -- lua-nginx-module's FFI API, in nginx's own symbols; resty.core declares both.
        require "resty.core.request"
        require "resty.core.misc"
        local NGX = ffi.C
        C_start_time, C_resp_status = NGX.ngx_http_lua_ffi_req_start_time, NGX.ngx_http_lua_ffi_get_resp_status
        get_request = require("resty.core.base").get_request
    end
    local r = get_request()
    return tonumber(ffi.cast(uintptr_t, r)), r
end

-- The response status of request r (ngx.status).
local function resp_status(r)
    local status = C_resp_status(r)
    if status < 0 then return ngx.status end -- not in this phase: ngx.status raises
    return status
end

-- Every request with state, by address, from the phase that makes the state until
-- log(): round() finds it there in the new location, whatever ended the last round
-- (so no try of it is left unreported, whether or not the pool has rounds).
local by_request = {}
local warned_rounds = false -- log() said once that rounds lack their location

-- The request's state, or nil: by_request by the request's address, not ngx.ctx (whose
-- table, made on a request's first use and released at its end, cost more than all
-- of rsbalancer's own per-request work measured by scripts/bench-instructions.sh).
-- An entry older than the request is one a request at the same address left behind
-- (its log phase never ran): not this request's.
local made_one = false -- a request has made a state (until then, no look-up)
local function current_state()
    local k, r = request_key()
    local st = by_request[k]
    if st and st.start < tonumber(C_start_time(r)) then
        by_request[k] = nil
        return nil, k, r
    end
    return st, k, r
end

-- States log() is done with, for the next requests: a table and its `tried` list made
-- per request, and the garbage collection they drive, cost about 900 instructions per
-- request (scripts/bench-instructions.sh). At most FREE_MAX kept.
--
-- A state's keys are of two kinds. Its core, which every request sets, is never nil
-- (false for "not yet"): stores to a key a table holds are cheap, while adding a key
-- goes through LuaJIT's lj_tab_newkey (about 60 instructions each, 10 per request
-- when the core was re-added to an emptied table). Any other key a phase adds (admission,
-- retries, rounds, stream signals: off the plain 2xx path) goes through STATE_MT's
-- __newindex, which marks the state dirty; recycle() empties a dirty state and seeds
-- its core again, and only resets the core of a clean one. A clean state thus has no
-- other key, and the plain path's phases read `dirty` instead of looking up each key
-- they would find absent (an absent key costs a hash-chain walk and a metatable check).
local clear_tab = require "table.clear"
local rawset, setmetatable = rawset, setmetatable
local FREE_MAX = 256
local free_states, nfree = {}, 0
local STATE_MT = {
    __newindex = function(t, k, v)
        rawset(t, k, v)
        t.dirty = true -- a core key: a plain store
    end,
}

-- The core keys of a state (request_state() sets their values).
local function seed(st, tried)
    st.tried, st.pool, st.n, st.reported, st.start = tried, false, 0, 0, 0
    st.arm, st.arm_pool, st.rounds, st.offset = false, false, 0, 0
    st.picked, st.dirty = false, false
    return st
end

-- Resets st for reuse and keeps it; nothing may use it afterwards.
local function recycle(st)
    if nfree >= FREE_MAX then return end
    local tried = st.tried
    if st.dirty then
        clear_tab(tried)
        setmetatable(st, nil)
        clear_tab(st)
        setmetatable(seed(st, tried), STATE_MT)
    else
        local i = 1
        while tried[i] ~= nil do
            tried[i] = nil
            i = i + 1
        end
        st.picked = false
    end
    nfree = nfree + 1
    free_states[nfree] = st
end

-- Request state kept across the balancer and log phases. Tries of the current round
-- are items `first`.. of nginx's upstream lists, shifted by `offset`. Also returns
-- the request.
local function request_state(pool, now)
    made_one = true
    local st, k, r = current_state()
    if not st then
        if nfree > 0 then
            st = free_states[nfree]
            free_states[nfree] = nil
            nfree = nfree - 1
        else
            st = setmetatable(seed({}, {}), STATE_MT)
        end
        -- nginx's cached time (updated once per event-loop turn) is precise enough
        -- for a retry deadline; no clock call per request. n is stored although a
        -- recycled state holds 0 already (log() set it): the compiled trace then knows
        -- it. rounds and offset are as seed() left them (only round() changes them, and
        -- it dirties the state); arm_of() and admit() set arm_pool with arm.
        st.pool, st.n, st.reported, st.start = pool, 0, 0, now or ngx_now()
        st.arm = false
        by_request[k] = st
    end
    return st, r
end

-- The request's state in the phases that never make it (log, filters).
-- Also returns the request (for resp_status) and its key in by_request.
local function state()
    if not made_one then return nil end
    local st, k, r = current_state()
    return st, r, k
end

-- The arm of this request (pool index and name to pick from: `pool` or its canary),
-- chosen once per request so that admit(), balance() and every retry agree.
local function arm_of(st, pool, idx)
    local aidx = st.arm
    if aidx then
        return aidx, st.arm_pool
    end
    local apool
    aidx, apool = canary.choose(pool, idx)
    st.arm, st.arm_pool = aidx, apool
    return aidx, apool
end

local function fill_tried(tried, n)
    for i = 1, n do
        tried_buf[i - 1] = tried[i]
    end
end

-- After the n tried slots in tried_buf: the pool's nodes of other providers than this
-- round's (provider.others), which a try of the round cannot go to. Returns the count.
local function add_others(st, n)
    local o = st.others
    if not o then return n end
    for i = 1, #o do
        if n >= MAX_TRIES then break end
        tried_buf[n] = o[i]
        n = n + 1
    end
    return n
end

-- resty.rsbalancer.provider, loaded when a pool has provider fields (it requires this
-- module itself).
local provider_mod
local function providers()
    if not provider_mod then provider_mod = require "resty.rsbalancer.provider" end
    return provider_mod
end

-- The provider of this round's node applied to the request (Host, scheme, headers,
-- model), and the nodes of other providers noted so that the round's retries stay
-- with it. Returns true, or answers 400 for a body it cannot rewrite.
local function apply_provider(st, slot)
    local P = providers()
    local ok, err = P.apply(slot)
    if not ok then
        ngx.log(ngx.INFO, "rsbalancer: ", err)
        return admission.answer(400, "invalid_body")
    end
    st.others = P.others(slot) or nil
    return true
end

-- A retry call of balance(): reports the previous try's failure and applies the retry
-- policy. Returns true when another try may start now; else false, with st.busy set
-- when the request may wait for a new round (the try was answered busy, or sent
-- nothing) and st.fail (the status to answer) when it may not.
local function retry_allowed(st, aidx, apool, tried, n)
    -- nginx reports ("failed", 429) for a 429 under proxy_next_upstream http_429,
    -- 502 for a connect error or bad response, 504 for a timeout: keep the code.
    local _, code = ngx_balancer.get_last_failure()
    local status = code or 0
    local var = ngx.var
    note_headroom(var, tried[n])
    settle(st, tried[n], status)
    C_report(handle, tried[n], status, 0, node_retry_after_ms(var) or 0)
    st.reported = n
    local busy = status == 429 or status == 503
    if not busy then
        -- A request that may have reached the node is not repeated unless allowed.
        local sent = item(ngx.var.upstream_bytes_sent, n + st.offset)
        busy = not (sent and sent > 0)
        if not busy and not IDEMPOTENT[ngx.var.request_method] and not policy[apool].non_idempotent then
            st.fail = status
            return false
        end
    end
    if not st.unasked then
        return true -- balance() granted this try only after rsb_may_retry said yes
    end
    -- With rounds left, balance() granted nginx this try unasked: decide it now.
    st.unasked = nil
    fill_tried(tried, n)
    if C_may_retry(handle, aidx, tried_buf, n, (ngx_now() - st.start) * 1000, out_buf) ~= RSB_OK
       or out_buf[0] == 0 then
        return true
    end
    local why = out_buf[0]
    if not busy then
        st.fail = status
    else
        st.busy = why == RETRY_NO_NODE and "round" or RETRY_REASON[why]
    end
    return false
end

-- balance()'s pick of the next try: on a retry call first reports the previous try's
-- failure and applies the retry policy, then picks a node not tried yet and records
-- it. Returns the slot, the try count and, below MAX_TRIES, the retry check for after
-- this try (rsb_pick_retry: the pick and rsb_may_retry in one call, `elapsed_ms` after
-- the request began), or nil when this round must end (no node free, or a retry not
-- allowed).
local function pick_next(st, aidx, apool, key, tried, n, elapsed_ms)
    if st.reported < n and not retry_allowed(st, aidx, apool, tried, n) then
        return nil
    end
    fill_tried(tried, n)
    -- A request let in above the confirmed capacity (st.probe) takes a node at its
    -- probe if there is one; any other, a confirmed slot first.
    local ask, nt, prefer
    if st.dirty then
        ask, nt, prefer = admission.ask(st, key), add_others(st, n), st.probe and PREFER_PROBE or 0
    else
        -- A clean state has none of the keys admission, a body or a provider sets
        -- (STATE_MT): no look-up of them.
        ask, nt, prefer = key and admission.ask_key(key) or ASK_NONE, n, 0
    end
    local rc
    if n + 1 < MAX_TRIES then
        rc = C_pick_retry(handle, aidx, ask, tried_buf, nt, n, prefer, elapsed_ms, out_buf)
    else
        rc = C_pick_ask(handle, aidx, ask, tried_buf, nt, prefer, out_buf)
    end
    if rc ~= RSB_OK then
        if rc ~= RSB_NO_NODE then
            ngx.log(ngx.ERR, "rsbalancer: ", last_error())
        end
        -- No node free as the balancer runs: busy, unless a failure ended the round.
        if not st.fail then st.busy = st.busy or "round" end
        return nil
    end
    local slot = out_buf[0]
    n = n + 1
    tried[n] = slot
    st.n = n
    tried_buf[n - 1] = slot
    return slot, n, n < MAX_TRIES and out_buf[1] or nil
end

--- balance(pool [, key]): in balancer_by_lua. Picks a node not yet tried by this
-- request and sets it as the peer; grants nginx one more try only when the retry
-- policy allows (max tries, deadline, pool-wide budget, an untried node free), so a
-- broad proxy_next_upstream list never turns into a retry storm. On a retry call the
-- previous try is reported first (status from get_last_failure(), Retry-After from
-- $upstream_http_retry_after), so its node's cooldown or limit applies to this pick.
function _M.balance(pool, key)
    if not handle then not_initialized("balance") end
    if not ngx_balancer then
        ngx_balancer = require "ngx.balancer" -- its cdef declares the function below
        local NGX = ffi.C -- nginx's own symbols, as in request_key()
        C_more_tries = NGX.ngx_http_lua_ffi_balancer_set_more_tries
    end
    sync()
    local idx = pools[pool]
    if not idx then
        error("bad argument #1 to 'balance' (unknown pool " .. tostring(pool) .. ")", 2)
    end
    local now = ngx_now()
    local st, r = request_state(pool, now)
    local aidx, apool = arm_of(st, pool, idx)
    local tried, n = st.tried, st.n
    local slot, why
    if st.dirty and st.held then
        -- admit() or round() already holds this round's first try.
        st.held = nil
        slot = tried[n]
        fill_tried(tried, n)
    else
        slot, n, why = pick_next(st, aidx, apool, key, tried, n, (now - st.start) * 1000)
        -- Ends the round: with rounds, error_page sends the request to round().
        if not slot then return ngx.exit(NGX_BUSY) end
    end
    if key then st.hkey = key end
    st.picked = now
    local p = peers[slot]
    local ok, perr = ngx_balancer.set_current_peer(p[1], p[2])
    if not ok then
        ngx.log(ngx.ERR, "rsbalancer: set_current_peer ", p[1], ":", p[2], ": ", perr)
        return ngx.exit(ngx.ERROR)
    end
    if n >= MAX_TRIES then return end
    if not why then
        -- The held try: tried_buf holds this request's n tries (filled above).
        if C_may_retry(handle, aidx, tried_buf, n, (now - st.start) * 1000, out_buf) ~= RSB_OK then
            return
        end
        why = out_buf[0]
    end
    if why == 0 then
        C_more_tries(r, 1, more_tries_err)
    elseif why == RETRY_NO_NODE and st.rounds < policy[st.pool].rounds and n < policy[apool].size then
        -- Nothing to retry on now, but rounds left: nginx comes back here should this
        -- try fail, and the next call retries at once, ends the round busy (a new
        -- round waits for a node), or ends it failed. Any other refusal lets the
        -- node's own answer reach the client (header_filter() adds a Retry-After).
        st.unasked = true
        C_more_tries(r, 1, more_tries_err)
    end
end


-- What the request's body costs (rsb_inspect: token estimate, completion limit,
-- streaming), for the picks of every round; a POST only, when the pool reads bodies.
-- A body that is not JSON is the node's to judge: its cost stays unknown. In a prefix
-- pool, the body's prefix key (16 hex digits) becomes st.key, the key of every pick
-- of every round (admission.ask) unless balance() is given one.
local body_buf = ffi.new("rsb_body[1]")
-- With the pool's stream.add_usage, a streamed body that does not say whether it wants
-- usage is asked for it (body_filter() then drops that chunk from the client's copy).
local function inspect(st, aidx, add_usage)
    if ngx.req.get_method() ~= "POST" then return end
    local body = admission.read_body()
    if not body then return end
    if C_inspect(handle, aidx, body, #body, body_buf) ~= RSB_OK then return end
    local b = body_buf[0]
    st.tokens, st.max_tokens = b.tokens, b.max_tokens
    st.stream, st.include_usage = b.stream == 1, b.include_usage
    if b.key_len > 0 then st.key = C_ffi_string(b.key, b.key_len) end
    if add_usage and st.stream and b.include_usage == 0 then
        local new = native.add_include_usage(body)
        if new then
            ngx.req.set_body_data(new)
            st.drop_usage = true
        end
    end
end

-- admit() for a pool with provider fields: the upstream request is the provider's, so
-- with several providers the first round's node is held here (waiting for one to free
-- up within the deadline) and its provider applied; a pool of one provider is applied
-- as a whole.
local function admit_provider(st, aidx, apool)
    local P = providers()
    if st.n == 0 and P.groups(apool) > 1 then
        local slot, why = admission.wait_pick(C, handle, aidx, st, tried_buf, 0, nil,
                                              st.start + policy[apool].deadline_s)
        if not slot then
            return admission.answer(429, why, 1000)
        end
        st.n, st.tried[1], st.held = 1, slot, true
    end
    if st.n > 0 then
        return apply_provider(st, st.tried[st.n])
    end
    local ok, err = P.apply_pool(apool)
    if not ok then
        ngx.log(ngx.INFO, "rsbalancer: ", err)
        return admission.answer(400, "invalid_body")
    end
    return true
end

--- admit(pool [, priority]): in access_by_lua. `priority` is a trusted number 1..10,
-- or a table { priority = n } (trusted) or { untrusted = value } (parsed and capped at
-- the pool's admission.untrusted_max, e.g. a client's X-Priority header); absent:
-- the pool's admission.default_priority. Sheds low priorities in emergency mode;
-- with admission enabled, waits in the pool's shared priority queue while the nodes
-- are at their learned limits, and answers 429 + Retry-After when it cannot be
-- admitted. With no node able to serve at all (cooling, ejected, down) answers at
-- once with the pool's no_node_status and the soonest moment a node frees up.
function _M.admit(pool, priority)
    if not handle then not_initialized("admit") end
    sync()
    local idx = pools[pool]
    if not idx then
        error("bad argument #1 to 'admit' (unknown pool " .. tostring(pool) .. ")", 2)
    end
    -- The priority is the request's, whichever arm serves it: the pool's own mapping.
    local adm = policy[pool].admission
    local t = type(priority)
    if t == "table" then
        if priority.priority ~= nil then
            priority = priority.priority
        else
            priority = admission.priority(priority.untrusted,
                                          { default = adm.default_priority, max = adm.untrusted_max })
        end
        t = type(priority)
    end
    if priority == nil then
        priority = adm.default_priority
    elseif t ~= "number" or priority % 1 ~= 0 or priority < PRIORITY_MIN or priority > PRIORITY_MAX then
        error("bad argument #2 to 'admit' (priority " .. PRIORITY_MIN .. ".." .. PRIORITY_MAX
              .. " expected, got " .. tostring(priority) .. ")", 2)
    end
    local st = request_state(pool)
    st.priority = priority
    local aidx, apool = arm_of(st, pool, idx)
    if aidx ~= idx and C_available(handle, aidx, wait_buf) ~= RSB_OK then
        -- No canary node can take it now: this request goes to the primary.
        st.arm, st.arm_pool = idx, pool
        aidx, apool = idx, pool
    end
    local p = policy[apool]
    if p.inspect and not st.tokens then inspect(st, aidx, p.add_usage) end
    local ok = admission.admit(C, handle, aidx, apool, priority, st, p.no_node_status, last_error)
    if ok == true and p.hold_faster and st.n == 0 then
        admission.hold_faster(C, handle, aidx, st)
    end
    if ok == true and p.providers then
        return admit_provider(st, aidx, apool)
    end
    return ok
end

--- priority(value [, opts]): a priority 1..10 from an untrusted value (a header): a
-- whole number clamped into 1..(opts.max or 10), else opts.default (or nil).
function _M.priority(value, opts)
    return admission.priority(value, opts)
end

--- header_filter(): in header_filter_by_lua. A node's own 429 or 503 that reaches the
-- client (the pool could not retry it) without a Retry-After gets one, so that the
-- client does not come back at once: the seconds (whole, at least 1) until the pool's
-- soonest node is back, with this answer counted first. To count it, the try is
-- reported here rather than in the log phase (its latency since the pick, as log()'s
-- fast path does). Anything else, a 2xx above all, costs one comparison.
function _M.header_filter()
    local status = ngx.status
    if status < 429 then return end
    if status ~= 429 and status ~= 503 then return end
    local st = state()
    if not st or st.n == 0 or not st.arm then return end
    local h = ngx.header
    if h["Retry-After"] then return end
    local n = st.n
    if st.reported == n - 1 and st.picked then
        local us = (ngx_now() - st.picked) * 1e6
        if us < 0 then us = 0 end
        settle(st, st.tried[n], status)
        C_report(handle, st.tried[n], status, us, 0)
        st.reported = n
    end
    local secs = 1
    if C_available(handle, st.arm, wait_buf) == RSB_NO_NODE then
        secs = ceil(tonumber(wait_buf[0]) / 1000)
        if secs < 1 then secs = 1 end
    end
    h["Retry-After"] = secs
end

--- body_filter(): in body_filter_by_lua. Notes whether the response body reached its
-- end (nginx's last buffer); log() then tells a try whose node closed the connection
-- mid-response (the client got a truncated 200, an SSE stream cut short) from a
-- complete one. For a 2xx answer it also measures the stream signals (src/stream.rs):
-- in an SSE stream, the time from the try's pick to the first `data:` event with
-- content (keep-alive comments and blank lines before it are the node queueing the
-- request: that time is noted apart), and in any answer the usage and end markers in
-- its last two non-empty buffers, kept by reference and read once, at its end. After the
-- first token a chunk costs a few branches and two table writes; with the pool's
-- stream.add_usage, a request whose client did not ask for usage has that chunk
-- removed from what the client receives.
-- Status reported for a try whose node cut its response short: a bad response, as
-- nginx's 502 for an upstream that sent an invalid one (a failure of the node).
local TRUNCATED = 502
local SSE, JSON = 1, 2
function _M.body_filter()
    local st = state()
    if not st then return end
    local arg = ngx.arg
    st.eof = arg[2]
    local sig = st.sig
    if sig == nil then
        -- The answer's first buffer: only a 2xx of a try balance() sent is measured.
        sig = false
        local status = ngx.status
        if st.picked and status >= 200 and status < 300 then
            local ct = ngx.header["Content-Type"]
            sig = (type(ct) == "string" and find(ct, "text/event-stream", 1, true)) and SSE or JSON
        end
        st.sig = sig
    end
    if not sig then return end
    -- The buffer as a Lua string (nginx's API has no cheaper view): 2xx answers only.
    local chunk = arg[1]
    if chunk ~= "" then
        if sig == SSE and not st.ttft then
            local now = ngx_now()
            if C_sse_first(chunk, #chunk, range_buf) == RSB_OK and tonumber(range_buf[0]) < #chunk then
                st.ttft = now - st.picked
                st.queue = st.kept_alive and now - st.kept_alive or 0
            elseif not st.kept_alive then
                st.kept_alive = now -- comments or blank lines first: the node holds it queued
            end
        end
        st.prev, st.last = st.last, chunk
        if st.drop_usage and C_usage_event(chunk, #chunk, range_buf) == RSB_OK then
            arg[1] = sub(chunk, 1, tonumber(range_buf[0])) .. sub(chunk, tonumber(range_buf[1]) + 1)
        end
    end
    if st.eof then
        -- The end: its usage and end markers, read once (log() reports them).
        local prev, last = st.prev or "", st.last or ""
        C_answer_tail(prev, #prev, last, #last, tail_buf)
        local t = tail_buf[0]
        st.tail = t.flags
        if band(t.flags, SIG_USAGE) ~= 0 then
            -- For the token budgets: what the node says the answer cost.
            st.usage_prompt, st.usage_completion = t.prompt_tokens, t.completion_tokens
        end
        st.prev, st.last = nil, nil
    end
end

-- log()'s report of a try whose answer body_filter() measured: the try reported with
-- its signals in one call. A stream whose body ended without [DONE] and
-- without a finish_reason, or was cut short, is a failure of its node.
local function report_answer(st, node, status, us, cut)
    local flags, tokens = 0, 0
    local tail = st.tail
    if tail then
        if band(tail, SIG_USAGE) ~= 0 then
            tokens, flags = st.usage_completion, SIG_USAGE
        end
        -- Only a stream the request asked for (a chat completion's body said so): some
        -- other event stream need not end with [DONE].
        cut = st.sig == SSE and st.stream and band(tail, SIG_ENDED) == 0
    end
    if cut then
        status = TRUNCATED
        if st.sig == SSE then flags = SIG_CUT end
    end
    local s = sig_buf[0]
    local ttft = st.ttft
    s.ttft_us = ttft and ttft * 1e6 or 0
    s.queue_us = ttft and st.queue * 1e6 or 0
    s.out_tokens, s.flags = tokens, flags
    C_report_llm(handle, node, status, us, 0, sig_buf)
end


--- log(): in log_by_lua. Reports the tries not reported yet (normally the last).
--
-- Fast path, the common case: every earlier try was reported by balance() and the
-- client got a 2xx, which is the last try's own answer. Its latency is the time since
-- its pick on nginx's cached clock, the same millisecond clock $upstream_response_time
-- is computed from, so no ngx.var is read: three variable reads and their parsing
-- cost more than the rest of the request's Lua (measured: ~1.6 us of CPU per request
-- in the gateway overhead benchmark). Anything else reads nginx's upstream variables.
function _M.log()
    local st, r, k = state()
    if not st then return end
    -- A clean state (STATE_MT) has no key the filters, admission or rounds set: none
    -- is looked up.
    local dirty = st.dirty
    local n = st.n
    if n > 0 then
        local status = resp_status(r)
        -- (st.picked is unset for a try admit() held that balance() never sent.)
        if st.reported == n - 1 and status >= 200 and status < 300 and st.picked then
            local us = (ngx_now() - st.picked) * 1e6
            if us < 0 then us = 0 end
            -- body_filter() saw the body but not its end: cut short, by the node when
            -- nginx still calls the request complete (a client that left makes
            -- $request_completion empty: that try says nothing bad of the node).
            local cut = dirty and st.eof == false and ngx.var.request_completion == "OK"
            local slot = st.tried[n]
            note_headroom(nil, slot)
            if budgeted[slot] then settle(st, slot, cut and TRUNCATED or status) end
            if dirty and st.sig then
                report_answer(st, slot, status, us, cut)
            else
                C_report(handle, slot, cut and TRUNCATED or status, us, 0)
            end
        else
            local var = ngx.var
            local slot = st.tried[n]
            note_headroom(var, slot)
            if budgeted[slot] and st.reported < n then
                settle(st, slot, item(var.upstream_status, n + st.offset) or 0)
            end
            local ra = node_retry_after_ms(var)
            _M.report_tries(st.tried, var.upstream_status, var.upstream_response_time,
                            st.reported + 1, ra and ra / 1000, st.offset)
        end
        st.n = 0
    end
    -- After the report: the slot given to the next waiter is free at the node too.
    if dirty and (st.adm or st.q_entry) then admission.release(C, handle, st) end
    by_request[k] = nil
    if dirty and st.busy and not warned_rounds and policy[st.pool].rounds > 0 then
        -- A round ended busy and round() never ran: the location lacks the error_page.
        warned_rounds = true
        ngx.log(ngx.ERR, "rsbalancer: pool ", st.pool, " has retry.rounds but a busy round ",
                "ended in nginx's 502: add `error_page 502 504 = @rsb_round;` and the ",
                "@rsb_round location (docs/balancing.md, \"Rounds\"), or set retry.rounds to 0")
    end
    recycle(st)
end

-- How many items an nginx upstream list ("429, 502 : 200") holds.
local function count_items(s)
    if not s then return 0 end
    local k, i = 0, 1
    while true do
        local _
        _, i = next_item(s, i)
        if not i then return k end
        k = k + 1
    end
end

-- Ends a request that takes no further round: 429 + Retry-After (the soonest a node
-- of its arm is back, else 1 s) and the reason, or the failure that ended the round.
local function end_rounds(st, reason)
    if st.fail then
        return admission.answer(st.fail == 504 and 504 or 502, "upstream_failed")
    end
    local ms = 1000
    if st.arm and C_available(handle, st.arm, wait_buf) == RSB_NO_NODE then
        ms = tonumber(wait_buf[0])
    end
    return admission.answer(429, reason, ms)
end

--- round(pool): in access_by_lua of the named location a busy round ends in
-- (`error_page 502 504 = @rsb_round;`, see docs/balancing.md, "Rounds"). Reports what the last
-- round left unreported, gives its admission back, then either ends the request
-- (429 + Retry-After + X-RSB-Admission when it cannot wait longer, or the failure that
-- ended the round) or starts a new round: back into the pool's admission queue (same
-- priority) when admission is on, then a hold on a node the request has not tried,
-- waiting for one to free up within the request's deadline. The upstream request is
-- built anew for the round (Host, headers, body).
function _M.round(pool)
    if not handle then not_initialized("round") end
    sync()
    local idx = pools[pool]
    if not idx then
        error("bad argument #1 to 'round' (unknown pool " .. tostring(pool) .. ")", 2)
    end
    local st = by_request[request_key()]
    if not st or st.start < ngx.req.start_time() then
        -- nginx's own 502/504 for a request rsbalancer holds no state of.
        return admission.answer(502, "upstream_failed")
    end
    if st.pool ~= pool then
        error("bad argument #1 to 'round' (the request is in pool " .. st.pool .. ", not " .. pool .. ")", 2)
    end
    local var = ngx.var
    local n = st.n
    if st.reported < n then
        -- nginx ended the round without asking balance() (proxy_next_upstream_tries,
        -- a timeout): report its last try here.
        local statuses = var.upstream_status
        local status = item(statuses, n + st.offset) or 502
        note_headroom(var, st.tried[n])
        settle(st, st.tried[n], status)
        local ra = node_retry_after_ms(var)
        _M.report_tries(st.tried, statuses, var.upstream_response_time, st.reported + 1,
                        ra and ra / 1000, st.offset)
        st.reported = n
        if status == 429 or status == 503 then
            st.busy = "round"
        else
            st.fail = status
        end
    end
    if st.adm or st.q_entry then admission.release(C, handle, st) end
    local busy = st.busy
    st.busy = nil
    if not busy or busy ~= "round" then
        return end_rounds(st, busy)
    end
    local aidx, apool = arm_of(st, pool, idx)
    local p = policy[apool]
    if st.rounds >= policy[pool].rounds then
        return end_rounds(st, "rounds")
    end
    if n >= p.size then
        return end_rounds(st, "tried_all")
    end
    local until_s = st.start + p.deadline_s
    if ngx_now() >= until_s then
        return end_rounds(st, "deadline")
    end
    st.rounds = st.rounds + 1
    if p.admission.enabled then
        admission.admit(C, handle, aidx, apool, st.priority or p.admission.default_priority, st,
                        p.no_node_status, last_error)
    end
    fill_tried(st.tried, n)
    local slot, why = admission.wait_pick(C, handle, aidx, st, tried_buf, n, st.hkey, until_s)
    if not slot then
        return end_rounds(st, why)
    end
    n = n + 1
    st.tried[n], st.n, st.held = slot, n, true
    -- This round's tries follow the items nginx listed so far.
    st.offset = count_items(var.upstream_status) - (n - 1)
    if p.providers then
        return apply_provider(st, slot)
    end
    return true
end

--- arm(): "canary" or "primary" for the current request once admit() or balance()
-- chose its arm, else nil (e.g. for a response header or an access log variable).
function _M.arm()
    local st = state()
    if not st or not st.arm then return nil end
    return st.arm_pool == st.pool and "primary" or "canary"
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
    if type(weight) ~= "number" or weight % 1 ~= 0 or weight < WEIGHT_MIN or weight > WEIGHT_MAX then
        error("bad argument #3 to 'set_weight' (integer weight " .. WEIGHT_MIN .. ".." .. WEIGHT_MAX
              .. " expected, got "
              .. tostring(weight) .. ")", 2)
    end
    return bal:set_weight(pool, id, weight)
end

local function check_string(v, n, fn)
    if type(v) ~= "string" then
        error("bad argument #" .. n .. " to '" .. fn .. "' (string expected, got " .. type(v) .. ")", 3)
    end
end

--- set_canary_share(pool, share): send `share` (0..1) of `pool`'s requests to its
-- canary pool, in every worker from the next request; clears an automatic rollback.
function _M.set_canary_share(pool, share)
    if not bal then not_initialized("set_canary_share") end
    check_string(pool, 1, "set_canary_share")
    if type(share) ~= "number" or share ~= share or share < 0 or share > 1 then
        error("bad argument #2 to 'set_canary_share' (share 0..1 expected, got "
              .. tostring(share) .. ")", 2)
    end
    return bal:set_canary_share(pool, share)
end

--- canary_state(pool): { canary=, share=, key=, rolled_back=, rollbacks=,
-- ramp_next_in_ms= }, false when the pool has no canary, or nil, err.
function _M.canary_state(pool)
    if not bal then not_initialized("canary_state") end
    check_string(pool, 1, "canary_state")
    return bal:canary_state(pool)
end

--- set_emergency(pool, mode): "on" or "off" forces emergency mode; "auto" hands it
-- back to the overload detector. A change of state is logged and alerted (webhooks).
function _M.set_emergency(pool, mode)
    if not bal then not_initialized("set_emergency") end
    check_string(pool, 1, "set_emergency")
    if mode ~= "on" and mode ~= "off" and mode ~= "auto" then
        error("bad argument #2 to 'set_emergency' (\"on\", \"off\" or \"auto\" expected, got "
              .. tostring(mode) .. ")", 2)
    end
    local ok, tr = bal:set_emergency(pool, mode)
    if not ok then return nil, tr end
    -- A change of state is announced (error log, webhooks sent from a timer).
    if tr and ngx and ngx.timer and ngx.get_phase() ~= "init" then
        require("resty.rsbalancer.emergency").announce(bal, tr)
    end
    return true
end

--- drain(pool, id [, on]): stop new tries to a node (in-flight ones finish);
-- drain(pool, id, false) puts it back.
function _M.drain(pool, id, on)
    if not bal then not_initialized("drain") end
    check_string(pool, 1, "drain")
    check_string(id, 2, "drain")
    if on ~= nil and type(on) ~= "boolean" then
        error("bad argument #3 to 'drain' (boolean expected, got " .. type(on) .. ")", 2)
    end
    return bal:set_draining(pool, id, on ~= false)
end

--- stats(pool): { [id] = { weight=, inflight=, requests=, ... } }, or nil, err.
function _M.stats(pool)
    if not bal then not_initialized("stats") end
    return bal:stats(pool)
end

--- status_json(): every pool and node with live state, as JSON text.
function _M.status_json()
    if not bal then not_initialized("status_json") end
    return bal:status_json()
end

--- nodes(pool): the pool's nodes as configured, or nil, err.
function _M.nodes(pool)
    if not bal then not_initialized("nodes") end
    return bal:nodes(pool)
end

--- state([pool]): every pool and node with live state as a table ({ generation=,
-- pools = { [name] = { algorithm=, canary_share=, emergency=, nodes = {...} } } }),
-- or one pool's table; nil, err for an unknown pool. The admin API's GET.
function _M.state(pool)
    if not bal then not_initialized("state") end
    if pool ~= nil then check_string(pool, 1, "state") end
    return bal:state(pool)
end

local NODE_KEYS = { id = "string", addr = "string", weight = "number", backup = "boolean",
                    host = "string", scheme = "string", tls_verify = "boolean", headers = "table",
                    model = "string" } -- provider fields: headers as { Name = { env = "VAR" } } only

-- Phases in which add_node may sleep while a host name resolves; the longest wait.
local YIELDABLE = { rewrite = true, access = true, content = true, timer = true,
                    ssl_cert = true, ssl_session_fetch = true }
local LOOKUP_TIMEOUT_S = 10

--- add_node(pool, { id=, addr= [, weight=] [, backup=] }): add a node at run time,
-- in every worker from its next pick (slow start, nothing learned). Returns its slot,
-- or nil, err, kind ("not_found", "conflict": id exists or no room, "invalid": a bad
-- value or an address that does not resolve). Lasts until the next reload.
function _M.add_node(pool, node)
    if not bal then not_initialized("add_node") end
    check_string(pool, 1, "add_node")
    if type(node) ~= "table" then
        error("bad argument #2 to 'add_node' (table expected, got " .. type(node) .. ")", 2)
    end
    for k, v in pairs(node) do
        local want = NODE_KEYS[k]
        if not want then
            error("bad argument #2 to 'add_node' (unknown key " .. tostring(k) .. ")", 2)
        end
        if type(v) ~= want then
            error("bad argument #2 to 'add_node' (" .. k .. ": " .. want .. " expected, got "
                  .. type(v) .. ")", 2)
        end
    end
    if node.id == nil or node.addr == nil then
        error("bad argument #2 to 'add_node' (id and addr are required)", 2)
    end
    -- A host name is resolved on a thread of the library while this request sleeps
    -- (the worker serves others meanwhile), where the phase lets it sleep.
    local host = match(node.addr, "^(.+):%d+$")
    if host and not match(host, "^[%d.]+$") and not match(host, "^%[")
            and ngx and YIELDABLE[ngx.get_phase()] then
        local ticket, lerr = bal:lookup_start(node.addr)
        if not ticket then return nil, lerr, "conflict" end
        local deadline = ngx.now() + LOOKUP_TIMEOUT_S
        repeat
            ngx.sleep(0.005)
            local addr, aerr = bal:lookup_poll(ticket)
            if addr then return bal:add_node(pool, node, addr) end
            if aerr then return nil, "addr: " .. aerr, "invalid" end
            ngx.update_time()
        until ngx.now() > deadline
        return nil, "addr: " .. node.addr .. " did not resolve within "
                    .. LOOKUP_TIMEOUT_S .. " s", "invalid"
    end
    return bal:add_node(pool, node)
end

--- remove_node(pool, id): stop picking a node; its tries in flight finish. true, or
-- nil, err, kind ("not_found"; "conflict" when the pool would keep no primary node).
function _M.remove_node(pool, id)
    if not bal then not_initialized("remove_node") end
    check_string(pool, 1, "remove_node")
    check_string(id, 2, "remove_node")
    return bal:remove_node(pool, id)
end

--- balancer(): the mlua object, for control-plane calls not wrapped here.
function _M.balancer()
    return bal
end

--- metrics(): every pool and node as Prometheus text exposition (format 0.0.4),
-- or nil, err. Reads the shared counters only; see resty.rsbalancer.metrics.
function _M.metrics()
    if not bal then not_initialized("metrics") end
    return bal:metrics()
end

return _M
