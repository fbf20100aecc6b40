-- resty.rsbalancer.provider: a node's provider applied to the request, in the access
-- phase, once the node of the round is known.
--
-- nginx builds the upstream request (Host, headers, body) once per client request, so
-- the node whose provider it is for must be picked before proxy_pass, and every try
-- of one round must go to a node of the same provider (`others`). Per node (pool
-- config, src/config/provider.rs): scheme, host (Host header and TLS SNI), headers
-- (API keys: values live in process memory only), model (the JSON body's top-level
-- "model" rewritten).
--
--   server {
--       set $rsb_scheme http;     # server level: a named location keeps them
--       set $rsb_host   "";
--       set $rsb_model  "";       # the client's model, for a later round's node without one
--       location /v1/ {
--           access_by_lua_block {
--               -- slot: the node this round's tries go to, picked and held here (the
--               -- rounds code of resty.rsbalancer; nginx-conf/example-deepseek.conf
--               -- has a stand-in with one node per request)
--               assert(require("resty.rsbalancer.provider").apply(slot))
--           }
--           proxy_pass $rsb_scheme://llm;             # `upstream llm` with balancer_by_lua
--           proxy_set_header Host $rsb_host;
--           proxy_ssl_server_name on;
--           proxy_ssl_name $rsb_host;
--           proxy_ssl_verify on;                      # per node: see tls_verify below
--           proxy_ssl_trusted_certificate /etc/ssl/certs/ca-certificates.crt;
--       }
--   }
--
-- API (node slots are the numbers pick() and balance() use):
--   apply(slot)   -> true | nil, err   sets $rsb_scheme and $rsb_host, clears the headers
--                                      other providers of the pool set, sets this node's,
--                                      rewrites the body's model (node's, or back to the
--                                      client's from $rsb_model)
--   group(slot)   -> number | nil      nodes with equal scheme, host, TLS check, headers
--                                      and model share a number (per generation)
--   others(slot)  -> array | false | nil   the pool's slots of other groups (to pass as
--                                      "tried" so a retry stays with this provider;
--                                      pick() takes at most 32 tried slots);
--                                      false when the whole pool is one provider;
--                                      one shared table per group: do not change it
--   request(slot) -> table | nil       { scheme=, host=, tls_verify=, headers={{n, v}}, model= }
--                                      (health checks); holds secrets: never log it
--   groups(pool)  -> number            how many providers the pool has (0: unknown pool)
--   apply_pool(pool) -> true | false | nil, err   a pool of one provider (groups(pool)
--                                      == 1) needs no node picked first: its provider
--                                      applied as apply() would for any of its nodes;
--                                      false (nothing done) when the pool has several
--
-- tls_verify: nginx's proxy checks certificates per location (proxy_ssl_verify and
-- proxy_ssl_trusted_certificate take no variables, and there is no CA per peer), so the
-- proxied request follows the location; health checks honour the node's tls_verify.
--
-- Everything is computed once per topology generation; apply() on a pool without
-- providers sets two variables and allocates nothing.

local ffi = require "ffi"
local rsb = require "resty.rsbalancer"
local native = require "rsbalancer"

local ngx = ngx
local type, tostring, tonumber, error, pairs = type, tostring, tonumber, error, pairs
local lower, concat = string.lower, table.concat
local rewrite_model = native.rewrite_model

local _M = { version = rsb.version }

require "resty.rsbalancer.cdef"
local C = ffi.load(rsb.library_path)

local bal, handle
local generation = -1
local nodes = {} -- slot -> entry
local pools = {} -- name -> { groups = n, any = an entry of the pool }

local function log_missing(pool, slot, missing)
    if ngx and #missing > 0 then
        ngx.log(ngx.ERR, "rsbalancer: pool ", pool, " node slot ", slot,
                ": no value in this worker for header(s) ", concat(missing, ", "),
                " (not sent; declare the variable with nginx's `env` directive)")
    end
end

-- The group key of an entry: everything that makes the upstream request differ.
local function key_of(e)
    local parts = { e.scheme, e.host, tostring(e.tls_verify), e.model or "" }
    for i = 1, #e.headers do
        local h = e.headers[i]
        parts[#parts + 1] = lower(h[1]) .. "\0" .. h[2]
    end
    return concat(parts, "\n")
end

local function build(pool)
    local reqs, err = bal:node_requests(pool)
    if not reqs then return nil, err end
    local names, slots, groups, any_model = {}, {}, {}, false
    for slot, e in pairs(reqs) do
        slots[#slots + 1] = slot
        for i = 1, #e.headers do
            names[lower(e.headers[i][1])] = true
        end
        if e.model then any_model = true end
        log_missing(pool, slot, e.missing)
    end
    local ngroups = 0
    for i = 1, #slots do
        local e = reqs[slots[i]]
        local k = key_of(e)
        local g = groups[k]
        if not g then
            ngroups = ngroups + 1
            g = ngroups
            groups[k] = g
        end
        e.group = g
        -- Headers other nodes of the pool set and this one does not.
        local own = {}
        for j = 1, #e.headers do own[lower(e.headers[j][1])] = true end
        local clear = {}
        for name in pairs(names) do
            if not own[name] then clear[#clear + 1] = name end
        end
        e.clear = clear
        e.body = any_model -- a model somewhere in the pool: the body may need rewriting
        e.pool = pool
    end
    -- One "other providers" list per group, shared by its nodes.
    local others = {}
    for g = 1, ngroups do
        local list = false
        if ngroups > 1 then
            list = {}
            for j = 1, #slots do
                if reqs[slots[j]].group ~= g then list[#list + 1] = slots[j] end
            end
        end
        others[g] = list
    end
    for i = 1, #slots do
        local e = reqs[slots[i]]
        e.others = others[e.group]
        nodes[slots[i]] = e
    end
    pools[pool] = { groups = ngroups, any = reqs[slots[1]] }
    return true
end

local function sync()
    local b = rsb.balancer()
    if not b then
        error("rsbalancer: provider used before init()", 3)
    end
    if b ~= bal then
        bal, handle, generation = b, ffi.cast("const struct rsb_balancer *", b:handle()), -1
    end
    local g = tonumber(C.rsb_generation(handle))
    if g == generation then return end
    nodes, pools = {}, {}
    local names = bal:pool_names() or {}
    for i = 1, #names do
        local ok, err = build(names[i])
        if not ok and ngx then
            ngx.log(ngx.ERR, "rsbalancer: provider tables of pool ", names[i], ": ", err)
        end
    end
    generation = g
end

local function entry(slot, fn)
    if type(slot) ~= "number" then
        error("bad argument #1 to '" .. fn .. "' (node slot expected, got " .. type(slot) .. ")", 3)
    end
    sync()
    return nodes[slot]
end

--- group(slot): the provider group of a node slot (equal numbers: same upstream
-- request), or nil for a slot no pool has.
function _M.group(slot)
    local e = entry(slot, "group")
    return e and e.group
end

--- others(slot): the slots of the node's pool that belong to other providers, false
-- when the pool is one provider, nil for an unknown slot. The same table every call
-- (per generation): do not change it.
function _M.others(slot)
    local e = entry(slot, "others")
    if not e then return nil end
    return e.others
end

--- request(slot): what is sent to the node (secrets included: never log it).
function _M.request(slot)
    return entry(slot, "request")
end

local read_body = require("resty.rsbalancer.admission").read_body

-- Rewrite the body's model to the node's (or back to the client's) when needed.
local function apply_model(e, var)
    local want = e.model
    local saved = var.rsb_model -- nil when not declared
    if not want then
        -- Only a body an earlier round rewrote needs its client's model back.
        if not saved or saved == "" then return true end
        want = saved
    end
    local body, err = read_body()
    if not body then return err == nil, err end
    local new, previous = rewrite_model(body, want)
    if not new then return nil, previous end
    if saved == "" and previous then
        var.rsb_model = previous
    end
    if new ~= body then
        ngx.req.set_body_data(new)
    end
    return true
end

-- The provider of entry `e` applied to this request.
local function apply_entry(e)
    local var = ngx.var
    var.rsb_scheme = e.scheme
    var.rsb_host = e.host
    local clear = e.clear
    for i = 1, #clear do
        ngx.req.clear_header(clear[i])
    end
    local h = e.headers
    for i = 1, #h do
        ngx.req.set_header(h[i][1], h[i][2])
    end
    if e.body then
        return apply_model(e, var)
    end
    return true
end

--- apply(slot): in the access phase, the provider of node `slot` for this round:
-- $rsb_scheme, $rsb_host, request headers, body model. true, or nil, err (the request
-- cannot go to this node: an unknown slot, a body that is not JSON).
function _M.apply(slot)
    local e = entry(slot, "apply")
    if not e then return nil, "unknown node slot " .. slot end
    return apply_entry(e)
end

local function pool_of(pool, fn)
    if type(pool) ~= "string" then
        error("bad argument #1 to '" .. fn .. "' (pool name expected, got " .. type(pool) .. ")", 3)
    end
    sync()
    return pools[pool]
end

--- groups(pool): how many providers (groups) the pool's nodes form; 0 for a pool
-- that does not exist.
function _M.groups(pool)
    local p = pool_of(pool, "groups")
    return p and p.groups or 0
end

--- apply_pool(pool): for a pool of one provider, apply() without a node picked first
-- (every node would give the same request): true, or nil, err. false, with nothing
-- done, when the pool has several providers: then hold the round's node and apply(slot).
function _M.apply_pool(pool)
    local p = pool_of(pool, "apply_pool")
    if not p then return nil, "unknown pool \"" .. pool .. "\"" end
    if p.groups ~= 1 then return false end
    return apply_entry(p.any)
end

return _M
