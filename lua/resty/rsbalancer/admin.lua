-- resty.rsbalancer.admin: the admin HTTP API and the status page, one content handler.
--
--   location /rsbalancer/ {
--       allow 127.0.0.1;  deny all;          # never public: it changes live routing
--       content_by_lua_block {
--           require("resty.rsbalancer.admin").serve({ prefix = "/rsbalancer/", token = "..." })
--       }
--   }
--
-- Routes (JSON in and out; <prefix> as given):
--   GET    <prefix>, <prefix>status          state of every pool and node as JSON; the
--                                             status page when Accept prefers text/html
--   GET    <prefix>pools/<pool>              one pool
--   GET    <prefix>pools/<pool>/nodes/<id>   one node
--   PUT    <prefix>pools/<pool>/nodes/<id>   {"weight": 1..10000} and/or {"drain": true|false}
--   POST   <prefix>pools/<pool>/nodes        {"id", "addr" [, "weight"] [, "backup"]}
--   DELETE <prefix>pools/<pool>/nodes/<id>
--   PUT    <prefix>pools/<pool>/canary       {"share": 0..1}
--   PUT    <prefix>pools/<pool>/emergency    {"mode": "on" | "off" | "auto"}
--
-- A change is applied in the shared region, so every worker uses it at its next pick;
-- it lasts until the next reload (which loads the config file again). A request body
-- (up to 16 KiB, in memory or spooled to a file by nginx) is parsed and validated whole
-- by the library (`admin_body`: one object, no repeated key, known keys, types,
-- ranges) before anything is applied: a refused request changes nothing and gets 400,
-- 404, 405, 409 or 413 with {"error": "..."} naming the problem. Every change is logged at notice level as
-- "rsbalancer admin: ...".
--
-- With `token`, every route but the status page's HTML wants `Authorization: Bearer
-- <token>` (compared in constant time: every byte of the expected token is always
-- compared); otherwise 401 with WWW-Authenticate. The page itself holds no data: its
-- script sends the token, taken from the URL fragment (`status#token=...`) or asked for.

local rsb = require "resty.rsbalancer"
local native = require "rsbalancer"
local page = require "resty.rsbalancer.status_page"
local bit = require "bit"

local ngx = ngx
local type, tostring, tonumber, error = type, tostring, tonumber, error
local io_open = io.open
local byte, sub, find, match, gmatch, lower = string.byte, string.sub, string.find, string.match, string.gmatch, string.lower
local bor, bxor = bit.bor, bit.bxor
local json_encode, admin_body = native.json_encode, native.admin_body

local _M = {}

-- The largest request body accepted (admin::body::MAX_BODY); over it, 413.
local MAX_BODY = native.admin_body_max

local function send(status, text, ctype)
    ngx.status = status
    ngx.header["Content-Type"] = ctype or "application/json"
    ngx.header["Cache-Control"] = "no-store"
    ngx.header["X-Content-Type-Options"] = "nosniff"
    ngx.print(text)
    return ngx.exit(status)
end

local function reply(status, body)
    return send(status, json_encode(body) .. "\n")
end

local function refuse(status, msg)
    return reply(status, { error = msg })
end

local STATUS_OF = { not_found = 404, conflict = 409, invalid = 400, failed = 500 }

-- The q-value a request's Accept gives the media type `want` ("text/html"): that of
-- the most specific range that matches it (`text/html` over `text/*` over `*/*`, as
-- RFC 9110 12.5.1 says), 0 if none does. A q outside 0..1 is clamped.
local function accept_q(accept, want)
    local wtype = match(want, "^([^/]+)/")
    local best_q, best_rank = 0, 0
    for item in gmatch(accept, "[^,]+") do
        local mtype = lower(match(item, "^%s*([^;%s]+)") or "")
        local rank = (mtype == want and 3)
            or (mtype == wtype .. "/*" and 2)
            or (mtype == "*/*" and 1)
            or 0
        if rank > best_rank then
            local q = tonumber(match(item, ";%s*[qQ]%s*=%s*([%d.]+)")) or 1
            best_q, best_rank = q > 1 and 1 or q, rank
        end
    end
    return best_q
end

-- The status page or JSON: the page only when the client prefers text/html to
-- application/json (a browser: text/html listed, JSON not or lower). No Accept, `*/*`
-- (curl), or a tie gets JSON.
local function wants_page(accept)
    if not accept then return false end
    return accept_q(accept, "text/html") > accept_q(accept, "application/json")
end

local function send_page(prefix)
    ngx.header["Content-Security-Policy"] = "default-src 'none'; script-src 'unsafe-inline'; "
        .. "style-src 'unsafe-inline'; connect-src 'self'; form-action 'none'; base-uri 'none'"
    return send(200, page.render(prefix), "text/html; charset=utf-8")
end

-- Constant time in the token's length: every byte of `expected` is compared, whatever
-- `given` is, and the length difference is folded into the same accumulator.
local function same_token(given, expected)
    local diff = #given == #expected and 0 or 1
    for i = 1, #expected do
        diff = bor(diff, bxor(byte(expected, i), byte(given, i) or 0))
    end
    return diff == 0
end

local function authorized(token)
    local h = ngx.var.http_authorization
    local given = h and match(h, "^%s*[Bb][Ee][Aa][Rr][Ee][Rr]%s+(%S+)%s*$")
    if given and same_token(given, token) then
        return true
    end
    ngx.header["WWW-Authenticate"] = given
        and 'Bearer realm="rsbalancer", error="invalid_token"'
        or 'Bearer realm="rsbalancer"'
    return false
end

-- The raw request body: from memory, or from the temp file nginx spooled it to (a body
-- over client_body_buffer_size), reading at most MAX_BODY + 1 bytes; or nil, status,
-- message.
local function raw_body()
    local len = tonumber(ngx.var.http_content_length)
    if len and len > MAX_BODY then
        return nil, 413, "request body of " .. len .. " bytes is over the limit of " .. MAX_BODY
    end
    ngx.req.read_body()
    local data = ngx.req.get_body_data()
    if data then return data end
    local path = ngx.req.get_body_file()
    if not path then return "" end
    local f, err = io_open(path, "rb")
    if not f then
        return nil, 500, "cannot read the spooled request body: " .. tostring(err)
    end
    data = f:read(MAX_BODY + 1)
    f:close()
    if data and #data > MAX_BODY then
        -- Only the first MAX_BODY + 1 bytes were read: the size is not known here.
        return nil, 413, "request body is over the limit of " .. MAX_BODY .. " bytes"
    end
    return data or ""
end

-- The body of `route` ("node", "add_node", "canary", "emergency") parsed and validated
-- whole by the library (admin::body::parse): a table of its keys, or nil, status
-- (400, 413), message naming the key and value.
local function body_of(route)
    local data, status, err = raw_body()
    if not data then return nil, status, err end
    local body, perr, pstatus = admin_body(route, data)
    if not body then return nil, pstatus, perr end
    return body
end

local function notice(...)
    ngx.log(ngx.NOTICE, "rsbalancer admin: ", ...)
end

local function find_node(pool_state, id)
    local nodes = pool_state.nodes
    for i = 1, #nodes do
        if nodes[i].id == id then return nodes[i] end
    end
end

-- The pool's state, or nil after answering 404.
local function pool_or_404(pool)
    local st = rsb.state(pool)
    if not st then
        refuse(404, "unknown pool \"" .. pool .. "\"")
        return nil
    end
    return st
end

local function node_or_404(pool, id)
    local st = pool_or_404(pool)
    if not st then return nil end
    local n = find_node(st, id)
    if not n then
        refuse(404, "unknown node \"" .. id .. "\" in pool \"" .. pool .. "\"")
        return nil
    end
    return n
end

local function method_not_allowed(method, allow)
    ngx.header["Allow"] = allow
    return refuse(405, method .. " not allowed here (allowed: " .. allow .. ")")
end

local function change_node(pool, id)
    local body, status, err = body_of("node")
    if not body then return refuse(status, err) end
    local before = node_or_404(pool, id)
    if not before then return end
    local who = ngx.var.remote_addr
    if body.weight ~= nil then
        local ok, werr = rsb.set_weight(pool, id, body.weight)
        if not ok then return refuse(404, werr) end
        notice("weight of node ", id, " in pool ", pool, " set to ", body.weight,
               " (was ", before.weight, ") by ", who)
    end
    if body.drain ~= nil then
        local ok, derr = rsb.drain(pool, id, body.drain)
        if not ok then return refuse(404, derr) end
        notice(body.drain and "draining node " or "undrained node ", id, " in pool ", pool,
               " by ", who)
    end
    return reply(200, find_node(rsb.state(pool), id))
end

local function add_node(pool)
    local body, status, err = body_of("add_node")
    if not body then return refuse(status, err) end
    if not pool_or_404(pool) then return end
    local slot, aerr, kind = rsb.add_node(pool, body)
    if not slot then return refuse(STATUS_OF[kind] or 500, aerr) end
    notice("added node ", body.id, " (", body.addr, ", weight ", body.weight or 1,
           body.backup and ", backup" or "", ") to pool ", pool, " by ", ngx.var.remote_addr)
    return reply(201, find_node(rsb.state(pool), body.id))
end

local function remove_node(pool, id)
    if not node_or_404(pool, id) then return end
    local ok, err, kind = rsb.remove_node(pool, id)
    if not ok then return refuse(STATUS_OF[kind] or 500, err) end
    notice("removed node ", id, " from pool ", pool, " by ", ngx.var.remote_addr)
    return reply(200, { removed = id, pool = pool })
end

-- PUT pools/<pool>/<setting>: a body of one key (checked by admin_body), then one setter.
local POOL_SETTINGS = {
    canary = {
        route = "canary", key = "share", what = "canary share", set = rsb.set_canary_share,
        was = function(st) return st.canary_share end,
    },
    emergency = {
        route = "emergency", key = "mode", what = "emergency mode", set = rsb.set_emergency,
        was = function(st) return st.emergency and st.emergency.mode or "?" end,
    },
}

local function set_pool(pool, setting)
    local body, status, err = body_of(setting.route)
    if not body then return refuse(status, err) end
    local key = setting.key
    local before = pool_or_404(pool)
    if not before then return end
    local ok, serr = setting.set(pool, body[key])
    -- The pool exists (checked above): a refusal is about its state, e.g. a canary
    -- share for a pool that has no canary.
    if not ok then return refuse(409, serr) end
    notice(setting.what, " of pool ", pool, " set to ", body[key], " (was ", setting.was(before),
           ") by ", ngx.var.remote_addr)
    return reply(200, rsb.state(pool))
end

local function route(method, rest)
    local get = method == "GET" or method == "HEAD"
    local pool, tail = match(rest, "^pools/([^/]+)(.*)$")
    if not pool then
        return refuse(404, "no admin route " .. ngx.var.uri)
    end
    if tail == "" or tail == "/" then
        if not get then return method_not_allowed(method, "GET") end
        local st = pool_or_404(pool)
        if st then return reply(200, st) end
        return
    end
    if tail == "/nodes" or tail == "/nodes/" then
        if method ~= "POST" then return method_not_allowed(method, "POST") end
        return add_node(pool)
    end
    local id = match(tail, "^/nodes/([^/]+)$")
    if id then
        if get then
            local n = node_or_404(pool, id)
            if n then return reply(200, n) end
            return
        elseif method == "PUT" then
            return change_node(pool, id)
        elseif method == "DELETE" then
            return remove_node(pool, id)
        end
        return method_not_allowed(method, "GET, PUT, DELETE")
    end
    local setting = POOL_SETTINGS[match(tail, "^/(%a+)$") or ""]
    if setting then
        if method ~= "PUT" then return method_not_allowed(method, "PUT") end
        return set_pool(pool, setting)
    end
    return refuse(404, "no admin route " .. ngx.var.uri)
end

--- serve({ prefix = "/rsbalancer/" [, token = "..."] }): in content_by_lua.
function _M.serve(opts)
    if opts == nil then opts = {} end
    if type(opts) ~= "table" then
        error("bad argument #1 to 'serve' (table expected, got " .. type(opts) .. ")", 2)
    end
    local prefix, token = opts.prefix or "/rsbalancer/", opts.token
    if type(prefix) ~= "string" or not find(prefix, "^/[%w/._~-]*$") or sub(prefix, -1) ~= "/" then
        error("bad argument #1 to 'serve' (prefix: a path of [A-Za-z0-9/._~-] starting and "
              .. "ending with / expected, got " .. tostring(prefix) .. ")", 2)
    end
    if token ~= nil and (type(token) ~= "string" or token == "") then
        error("bad argument #1 to 'serve' (token: non-empty string expected)", 2)
    end
    local uri = ngx.var.uri
    local rest
    if uri == sub(prefix, 1, -2) then
        rest = ""
    elseif sub(uri, 1, #prefix) == prefix then
        rest = sub(uri, #prefix + 1)
    else
        return refuse(404, "no admin route " .. uri .. " (prefix " .. prefix .. ")")
    end
    local method = ngx.req.get_method()
    local get = method == "GET" or method == "HEAD"
    if rest == "" or rest == "status" then
        if not get then return method_not_allowed(method, "GET") end
        ngx.header["Vary"] = "Accept"
        if wants_page(ngx.var.http_accept) then return send_page(prefix) end
    end
    if token and not authorized(token) then
        return refuse(401, "a valid bearer token is required (Authorization: Bearer <token>)")
    end
    if rest == "" or rest == "status" then
        local text, err = rsb.status_json()
        if not text then return refuse(500, err) end
        return send(200, text .. "\n")
    end
    return route(method, rest)
end

_M._same_token = same_token
_M._accept_q = accept_q
_M._wants_page = wants_page

return _M
