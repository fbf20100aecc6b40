-- resty.rsbalancer.admission: priorities, the shared admission queue and shedding,
-- behind resty.rsbalancer's admit() and log(). The queue itself lives in Rust
-- (src/admit.rs) in the shared region; this module waits in the access phase:
--
--   rsb_admit      go on at once, be queued, or be refused (shed, full, no node)
--   rsb_admit_poll every 1-2 ms (ngx.sleep, jittered) until admitted or refused
--   rsb_admit_leave when the client goes away while waiting (ngx.on_abort, which
--                  needs `lua_check_client_abort on`; else the log phase does it)
--   rsb_admit_release in the log phase, for every admission held
--   hold_faster    once let on, with limit.slow_factor: take a slot on a node that is
--                  not slow (rsb_pick_prefer, "not slow only"), waiting for one while
--                  only slow nodes have a free slot, at most as long as a slow node
--                  would add to the latency (rsb_slow_wait)
--
-- Refusals answer 429 with a Retry-After estimated from the queue, never a hang;
-- "no node" (every node cooling, ejected or down) answers the pool's no_node_status.

local ffi = require "ffi"
require "resty.rsbalancer.cdef"
local C = ffi.C

local tonumber, tostring, type, random = tonumber, tostring, type, math.random
local ngx = ngx

local _M = {}

-- Verdicts (enum rsb_verdict: src/admission/mod.rs Verdict), read once.
local GO, PASS, QUEUED = C.RSB_VERDICT_GO, C.RSB_VERDICT_PASS, C.RSB_VERDICT_QUEUED
local WAIT, NO_NODE = C.RSB_VERDICT_WAIT, C.RSB_VERDICT_NO_NODE
local GO_PROBE = C.RSB_VERDICT_GO_PROBE -- as GO, into a probe slot: balance() prefers nodes at their probe
local REASON = {
    [C.RSB_VERDICT_SHED] = "shed",
    [C.RSB_VERDICT_FULL] = "queue_full",
    [C.RSB_VERDICT_TIMED_OUT] = "timeout",
    [C.RSB_VERDICT_EVICTED] = "evicted",
}
local PRIORITY_MIN, PRIORITY_MAX = C.RSB_PRIORITY_MIN, C.RSB_PRIORITY_MAX
-- rsb_pick_prefer's bits (enum rsb_prefer).
local PREFER_PROBE, NOT_SLOW_ONLY = C.RSB_PREFER_PROBE, C.RSB_PREFER_NOT_SLOW
local RSB_OK = C.RSB_OK

-- What a pick is told of the request (rsb_ask): filled before each rsb_pick_ask.
local ask_buf = ffi.new("rsb_ask[1]")

-- The ask of a request with nothing to tell (no key, no estimate, no limit): filled
-- once, never written, so that the plain request's pick writes no field.
local ask_none = ffi.new("rsb_ask[1]")

--- ask_key([key]): as ask() for a request with no affinity key, token estimate or
-- completion limit of its own.
function _M.ask_key(key)
    if key == nil then return ask_none end
    local a = ask_buf[0]
    a.key, a.key_len = key, #key
    a.tokens, a.max_tokens = 0, 0
    return ask_buf
end

--- ask(st [, key]): the request `st` as rsb_pick_ask takes it: its key (`key`, else
-- the affinity key admit() found, st.key), token estimate and completion limit (from
-- rsb_inspect in admit(); 0 when unknown). Valid until the next call.
function _M.ask(st, key)
    key = key or st.key
    local a = ask_buf[0]
    a.key, a.key_len = key, key and #key or 0
    a.tokens, a.max_tokens = st.tokens or 0, st.max_tokens or 0
    return ask_buf
end

--- read_body(): the request body as a string (nil when there is none), reading a body
-- nginx buffered to a file; nil, err when that file cannot be read.
function _M.read_body()
    ngx.req.read_body()
    local body = ngx.req.get_body_data()
    if body then return body end
    local path = ngx.req.get_body_file()
    if not path then return nil end
    local f, err = io.open(path, "rb")
    if not f then return nil, "cannot read the buffered request body: " .. tostring(err) end
    body = f:read("*a")
    f:close()
    return body
end

local verdict_buf = ffi.new("uint32_t[1]")
local entry_buf = ffi.new("uint32_t[1]")
local value_buf = ffi.new("uint64_t[1]")
local ms_buf = ffi.new("uint32_t[1]")
local slot_buf = ffi.new("uint32_t[1]")
local others_buf = ffi.new("uint32_t[1]")

--- priority(value [, opts]): a priority 1..10 from an untrusted value (a header, a
-- query argument): a whole number is clamped into 1..(opts.max or 10); anything else
-- (absent, garbage) gives opts.default (nil when not given: admit() then uses the
-- pool's default_priority).
function _M.priority(value, opts)
    if opts ~= nil and type(opts) ~= "table" then
        error("bad argument #2 to 'priority' (table expected, got " .. type(opts) .. ")", 2)
    end
    local default = opts and opts.default
    local max = opts and opts.max or PRIORITY_MAX
    local range = PRIORITY_MIN .. ".." .. PRIORITY_MAX
    if default ~= nil and (type(default) ~= "number" or default % 1 ~= 0 or default < PRIORITY_MIN
                           or default > PRIORITY_MAX) then
        error("bad argument #2 to 'priority' (default: integer " .. range .. " expected, got "
              .. tostring(default) .. ")", 2)
    end
    if type(max) ~= "number" or max % 1 ~= 0 or max < PRIORITY_MIN or max > PRIORITY_MAX then
        error("bad argument #2 to 'priority' (max: integer " .. range .. " expected, got "
              .. tostring(max) .. ")", 2)
    end
    local n = tonumber(value)
    if not n or n ~= n or n % 1 ~= 0 then
        return default
    end
    if n < PRIORITY_MIN then return PRIORITY_MIN end
    if n > max then return max end
    return n
end

-- What each gateway-made answer says (the reason is X-RSB-Admission and the code).
local MESSAGE = {
    shed = "Shed while the service is overloaded.",
    queue_full = "Too many requests are waiting.",
    timeout = "Waited too long for capacity.",
    evicted = "Made room for a request of higher priority.",
    no_node = "No upstream can take requests right now.",
    round = "Every upstream is busy.",
    rounds = "Every upstream stayed busy.",
    tried_all = "Every upstream was tried and is busy.",
    deadline = "The request's deadline passed while upstreams were busy.",
    max_tries = "The request used all its tries while upstreams were busy.",
    retry_budget = "Retries are paused while upstreams are busy.",
    upstream_failed = "The upstream failed to answer.",
    invalid_body = "The request body is not a JSON object.",
}

-- OpenAI's error types by status.
local TYPE = { [400] = "invalid_request_error", [429] = "rate_limit_error" }

--- answer(status, reason [, retry_after_ms]): a gateway-made answer and the end of the
-- request: an OpenAI-shaped error body ({"error": {"message", "type", "code"}}, code =
-- reason, no pool or node named), X-RSB-Admission: reason, and with retry_after_ms a
-- Retry-After in whole seconds (at least 1).
function _M.answer(status, reason, ms)
    reason = reason or "round"
    ngx.status = status
    local h = ngx.header
    h["Content-Type"] = "application/json"
    h["X-RSB-Admission"] = reason
    local wait = ""
    if ms then
        local secs = math.ceil(tonumber(ms) / 1000)
        if secs < 1 then secs = 1 end
        h["Retry-After"] = secs
        wait = " Retry after " .. secs .. " s."
    end
    ngx.say('{"error":{"message":"', MESSAGE[reason] or "Refused.", wait, '","type":"',
            TYPE[status] or "server_error", '","code":"', reason, '"}}')
    return ngx.exit(status)
end

local function refuse(status, ms, reason)
    return _M.answer(status, reason, ms)
end

--- admit(C, handle, idx, pool, priority, st, no_node_status): the access-phase
-- decision. Returns true when the request goes on; else answers and exits.
function _M.admit(C, handle, idx, pool, priority, st, no_node_status, last_error)
    if C.rsb_admit(handle, idx, priority, verdict_buf, entry_buf, value_buf) ~= RSB_OK then
        -- A bug or a dead region: do not turn it into an outage; let the request on.
        ngx.log(ngx.ERR, "rsbalancer: admit: ", last_error())
        return true
    end
    local v = verdict_buf[0]
    if v == GO or v == GO_PROBE then
        -- An admission is held either way: the log phase gives it back.
        st.adm, st.probe = idx, v == GO_PROBE
        return true
    elseif v == PASS then
        return true
    elseif v == NO_NODE then
        return refuse(no_node_status, value_buf[0], "no_node")
    elseif v ~= QUEUED then
        return refuse(429, value_buf[0], REASON[v] or "refused")
    end
    -- Queued: keep the ticket where the log phase finds it, should this thread die.
    local entry, ticket = entry_buf[0], value_buf[0]
    st.q_entry, st.q_ticket, st.q_pool = entry, ticket, idx
    ngx.on_abort(function() st.aborted = true end) -- nil, err without lua_check_client_abort
    while true do
        ngx.sleep(0.001 + random() * 0.001)
        if st.aborted then
            C.rsb_admit_leave(handle, idx, entry, ticket, nil)
            st.q_entry = nil
            return ngx.exit(499)
        end
        if C.rsb_admit_poll(handle, idx, entry, ticket, verdict_buf, value_buf) ~= RSB_OK then
            ngx.log(ngx.ERR, "rsbalancer: admit_poll: ", last_error())
            C.rsb_admit_leave(handle, idx, entry, ticket, nil)
            st.q_entry = nil
            return true
        end
        v = verdict_buf[0]
        if v ~= WAIT then
            st.q_entry = nil
            if v == GO or v == GO_PROBE then
                st.adm, st.probe = idx, v == GO_PROBE
                return true
            end
            return refuse(429, value_buf[0], REASON[v] or "refused")
        end
    end
end

--- hold_faster(C, handle, idx, st): with limit.slow_factor, after the request was let
-- on: take a slot on a node of pool `idx` that is not slow, waiting for one (polling
-- every 1-2 ms) while only slow nodes have a free slot, and for no longer than what
-- a slow node would add to the latency. The slot is taken here, in the access phase,
-- so that requests arriving meanwhile cannot race this one to the slot it waited for:
-- it becomes the request's first try (st.tried[1], st.held), which balance() sends
-- and the log phase reports like any other. If no such slot comes, the request goes
-- on without one and balance() picks as usual (the slow node, as overflow). A
-- newcomer that finds others waiting lets them poll first (one 1-2 ms sleep), so it
-- does not take the slot they have been waiting for.
function _M.hold_faster(C, handle, idx, st)
    local prefer = NOT_SLOW_ONLY + (st.probe and PREFER_PROBE or 0)
    if C.rsb_slow_wait(handle, idx, ms_buf, others_buf) ~= RSB_OK then
        return
    end
    local start = ngx.now()
    if others_buf[0] ~= 0 then
        -- Others wait for a faster node: let them poll first, rather than take the
        -- slot they wait for.
        ngx.sleep(0.001 + random() * 0.001)
    end
    local again
    while true do
        if C.rsb_pick_ask(handle, idx, _M.ask(st), nil, 0, prefer, slot_buf) == RSB_OK then
            st.n, st.tried[1], st.held = 1, slot_buf[0], true
            return
        end
        if C.rsb_slow_wait(handle, idx, ms_buf, others_buf) ~= RSB_OK then
            return
        end
        if ms_buf[0] == 0 then
            -- Nothing slow to avoid, or a faster node's slot freed since the pick
            -- above: one more pick, then on without a held slot.
            if again then return end
            again = true
        else
            if (ngx.now() - start) * 1000 >= ms_buf[0] then
                return
            end
            ngx.sleep(0.001 + random() * 0.001)
        end
    end
end

--- wait_pick(C, handle, idx, st, tried, n, key, until_s): a new round's first try:
-- a hold on a node of pool `idx` not among the `n` slots of `tried`, polling (2 ms,
-- doubling to 50 ms, jittered) while none is free, until `until_s` (ngx.now() time).
-- Returns the slot, or nil and why ("deadline": time ran out or no node is back before
-- it; the client left: ends the request with 499).
function _M.wait_pick(C, handle, idx, st, tried, n, key, until_s)
    local prefer = st.probe and PREFER_PROBE or 0
    local delay = 0.002
    if not st.aborted then
        pcall(ngx.on_abort, function() st.aborted = true end) -- once per location
    end
    while true do
        if C.rsb_pick_ask(handle, idx, _M.ask(st, key), tried, n, prefer, slot_buf) == RSB_OK then
            return slot_buf[0]
        end
        -- (ngx.now() moves on only when the event loop turns: every sleep below is
        -- at least 1 ms, a timer, so it does.)
        local left = until_s - ngx.now()
        if left < 0.001 then return nil, "deadline" end
        if C.rsb_available(handle, idx, value_buf) ~= RSB_OK and tonumber(value_buf[0]) > left * 1000 then
            return nil, "deadline" -- no node is back before the deadline
        end
        ngx.sleep(math.max(0.001, math.min(delay * (0.5 + random()), left)))
        if st.aborted then return ngx.exit(499) end
        if delay < 0.05 then delay = delay * 2 end
    end
end

--- release(C, handle, st): in the log phase: give back the admission the request
-- holds, and take it out of the queue if it never left it (the access phase was cut
-- short: client gone with no on_abort handler, worker exiting).
function _M.release(C, handle, st)
    if st.q_entry then
        C.rsb_admit_leave(handle, st.q_pool, st.q_entry, st.q_ticket, nil)
        st.q_entry = nil
    end
    if st.adm then
        C.rsb_admit_release(handle, st.adm)
        st.adm = nil
    end
end

return _M
