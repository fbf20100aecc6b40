-- rsb_admin: the demo gateway's admin locations (stats as JSON, set weight).
--
--   location = /rsbalancer/stats  { content_by_lua_block { require("rsb_admin").stats("llm") } }
--   location = /rsbalancer/weight { content_by_lua_block { require("rsb_admin").weight("llm") } }
--
-- Uses lua-cjson when it is installed; Debian's lua-nginx-module does not bundle it,
-- so a minimal encoder (tables of tables of numbers, strings and booleans) is the
-- fallback.

local rsb = require "resty.rsbalancer"

local type, pairs, tostring, tonumber = type, pairs, tostring, tonumber
local concat, sort, format, floor = table.concat, table.sort, string.format, math.floor

local _M = {}

local function encode_string(s)
    return '"' .. s:gsub('[%c"\\]', function(c)
        if c == '"' then return '\\"' elseif c == "\\" then return "\\\\" end
        return format("\\u%04x", c:byte())
    end) .. '"'
end

local function encode(v)
    local t = type(v)
    if t == "table" then
        local keys = {}
        for k in pairs(v) do keys[#keys + 1] = tostring(k) end
        sort(keys)
        local out = {}
        for i = 1, #keys do
            local k = keys[i]
            local val = v[k]
            if val == nil then val = v[tonumber(k)] end
            out[i] = encode_string(k) .. ":" .. encode(val)
        end
        return "{" .. concat(out, ",") .. "}"
    elseif t == "number" then
        if v ~= v or v == math.huge or v == -math.huge then return "null" end
        if v == floor(v) and v > -2^53 and v < 2^53 then return format("%d", v) end
        return format("%.17g", v)
    elseif t == "boolean" then
        return tostring(v)
    elseif t == "string" then
        return encode_string(v)
    end
    return "null"
end

local ok, cjson = pcall(require, "cjson.safe")
_M.encode = ok and cjson.encode or encode
_M.encode_minimal = encode

local function reply(status, body)
    ngx.status = status
    ngx.header["Content-Type"] = "application/json"
    ngx.say(_M.encode(body))
    return ngx.exit(status)
end

--- stats(pool): GET -> { "<node id>": { weight, inflight, picks, requests, failures, busy, ... } }
function _M.stats(pool)
    local s, err = rsb.stats(ngx.var.arg_pool or pool)
    if not s then return reply(404, { error = err }) end
    return reply(200, s)
end

--- weight(pool): POST ?node=<id>&weight=<1..10000> -> { pool, node, weight }
function _M.weight(pool)
    if ngx.req.get_method() ~= "POST" then
        ngx.header["Allow"] = "POST"
        return reply(405, { error = "use POST ?node=<id>&weight=<1..10000>" })
    end
    pool = ngx.var.arg_pool or pool
    local node, w = ngx.var.arg_node, tonumber(ngx.var.arg_weight)
    if not node or node == "" then return reply(400, { error = "missing ?node=<id>" }) end
    if not w or w % 1 ~= 0 or w < 1 or w > 10000 then
        return reply(400, { error = "weight must be an integer 1..10000" })
    end
    local done, err = rsb.set_weight(pool, node, w)
    if not done then return reply(404, { error = err }) end
    return reply(200, { pool = pool, node = node, weight = w })
end

return _M
