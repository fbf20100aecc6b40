-- mock_llm: a busy OpenAI-compatible endpoint, for the demo, the tests and benchmarks.
--
-- One nginx `server` per node; each sets its knobs with `set` (see mock-nodes.conf):
--
--   set $mock_node        a;      # name, sent back as X-Node and in the reply
--   set $mock_latency_ms  20;     # delay before the first byte
--   set $mock_chunk_ms    10;     # delay between SSE chunks ("stream": true)
--   set $mock_max_conc    0;      # > 0: beyond this many requests in flight, 429
--   set $mock_retry_after 0;      # > 0: Retry-After (s) sent with that 429
--   set $mock_quota_rps   0;      # > 0: token bucket refilled at this rate (tokens/s) ...
--   set $mock_quota_burst 0;      #      ... holding this many (default: rps); empty: 429
--   set $mock_fail        "";     # "" | "503" (answer 503) | "close" (drop the connection)
--                                 # | "429" (chat requests answer 429, Retry-After as below)
--
-- Knobs without a `set` default (runtime only, through /mock/set):
--   health_fail     "" | "503" | "close": only GET /health fails (chat requests still served)
--   retry_after_at  > 0: the 429s carry `Retry-After: <HTTP-date of this Unix time>` instead
--                   of delay-seconds
--   retry_after_raw this exact text as the 429s' Retry-After (a misbehaving upstream:
--                   `inf`, `99999999999`, a date in 2099), before the two above
--   cut_after       > 0: a streamed reply ("stream": true) drops the connection after this
--                   many content chunks, with no final chunk (a node dying mid-stream)
--   require_host    a provider's name: any request (/health too) whose Host differs gets 421
--   require_key     a provider's API key: any request (/health too) without
--                   `Authorization: Bearer <key>` gets 401 (counted in "unauthorized")
--
-- Runtime overrides (all workers, until changed back; "" or "default" clears one):
--   POST /mock/set?fail=503&latency_ms=500&max_conc=2   (keys: the names above minus mock_)
--   GET  /mock/state   -> {"node":..,"inflight":..,"served":..,"rejected":..,"received":..,
--                          "health_checks":..,"last_retry_after":..,"knobs":{..}}
--     received: requests other than /health, /mock/set and /mock/state (every try a gateway
--     sent, whatever the answer); health_checks: GET /health requests; last_retry_after: the
--     Retry-After of the latest 429 ("" if none yet); last_model, last_host: the "model" of
--     the latest chat request and the Host of the latest request; last_sni: its TLS server
--     name ("" over plain HTTP); unauthorized: the 401s
--     and 421s of require_key and require_host; peak_inflight: the most
--     requests (other than /health) it has had in flight at once (a get-then-set across
--     workers: it may miss a peak when two workers race, never overstates one).
--
-- Requests in flight are counted across the node's workers in lua_shared_dict
-- `mock_llm` (incr in content, decr in log_by_lua, which runs on every exit path:
-- normal end, 429, 503, closed connection, client abort). A worker killed with
-- SIGKILL leaks its count: this is test equipment.
--
-- The request body is not parsed as JSON (lua-cjson is not part of Debian's
-- lua-nginx-module): "stream": true and "model" are found with patterns.

local ngx = ngx
local dict = ngx.shared.mock_llm
local concat, floor, ceil, max, min = table.concat, math.floor, math.ceil, math.max, math.min
local tonumber, tostring = tonumber, tostring

local _M = {}

local KNOBS = {
    latency_ms = "mock_latency_ms", chunk_ms = "mock_chunk_ms", max_conc = "mock_max_conc",
    retry_after = "mock_retry_after", quota_rps = "mock_quota_rps",
    quota_burst = "mock_quota_burst", fail = "mock_fail",
    health_fail = "mock_health_fail", retry_after_at = "mock_retry_after_at",
    retry_after_raw = "mock_retry_after_raw",
    cut_after = "mock_cut_after",
    require_host = "mock_require_host", require_key = "mock_require_key",
}

-- A knob: the runtime override if any, else the server's `set` value (nil when the
-- server has no `set` for it: reading an undefined nginx variable gives nil).
local function knob(node, name)
    local v = dict:get("cfg:" .. node .. ":" .. name)
    if v == nil then v = ngx.var[KNOBS[name]] end
    return v
end

local function num(node, name)
    return tonumber(knob(node, name)) or 0
end

-- Minimal JSON string escaping (enough for names, models and error messages).
local function q(s)
    s = tostring(s):gsub('[%c"\\]', function(c)
        if c == '"' then return '\\"' elseif c == "\\" then return "\\\\" end
        return string.format("\\u%04x", c:byte())
    end)
    return '"' .. s .. '"'
end

local function send_json(status, body, headers)
    ngx.status = status
    ngx.header["Content-Type"] = "application/json"
    if headers then
        for k, v in pairs(headers) do ngx.header[k] = v end
    end
    ngx.print(body)
    return ngx.exit(status)
end

-- The Retry-After of a 429: `seconds` (nil or <= 0: none), or the HTTP-date of the
-- retry_after_at knob when set. Remembered for /mock/state.
local function retry_after(node, seconds)
    local at = tonumber(knob(node, "retry_after_at")) or 0
    local raw = knob(node, "retry_after_raw")
    local v
    if raw and raw ~= "" then
        v = raw
    elseif at > 0 then
        v = ngx.http_time(floor(at))
    elseif seconds and seconds > 0 then
        v = tostring(seconds)
    end
    dict:set("last_ra:" .. node, v or "")
    return v
end

local function error_body(message, typ, code)
    return '{"error":{"message":' .. q(message) .. ',"type":' .. q(typ) .. ',"param":null,"code":'
        .. q(code) .. "}}"
end

-- Token bucket shared by the node's workers. shared dicts have no compare-and-swap, so
-- the read-modify-write is guarded by a short lock made with add() (atomic, expiring).
-- Returns true, or false and the seconds until a token is available.
local function take_token(node, rps, burst)
    if burst <= 0 then burst = max(rps, 1) end
    local lock = "qlock:" .. node
    for _ = 1, 100 do
        if dict:add(lock, true, 0.05) then break end
        ngx.sleep(0.001)
    end
    ngx.update_time()
    local now = ngx.now()
    local tokens = dict:get("qtok:" .. node) or burst
    local stamp = dict:get("qts:" .. node) or now
    tokens = min(burst, tokens + (now - stamp) * rps)
    local ok = tokens >= 1
    if ok then tokens = tokens - 1 end
    dict:set("qtok:" .. node, tokens)
    dict:set("qts:" .. node, now)
    dict:delete(lock)
    if ok then return true end
    return false, max(1, ceil((1 - tokens) / rps))
end

local WORDS = { "Hello", " from", " mock", " node", " %s.", " This", " is", " a", " canned", " reply." }

local function words(node)
    local out = {}
    for i = 1, #WORDS do out[i] = WORDS[i]:gsub("%%s", node) end
    return out
end

local function chunk(id, created, model, delta, finish)
    return "data: {\"id\":" .. q(id) .. ",\"object\":\"chat.completion.chunk\",\"created\":" .. created
        .. ",\"model\":" .. q(model) .. ",\"choices\":[{\"index\":0,\"delta\":" .. delta
        .. ",\"finish_reason\":" .. (finish and q(finish) or "null") .. "}]}\n\n"
end

local function chat(node)
    if ngx.req.get_method() ~= "POST" then
        return send_json(405, error_body("Use POST", "invalid_request_error", "method_not_allowed"),
                         { Allow = "POST" })
    end
    ngx.req.read_body()
    local body = ngx.req.get_body_data() or ""
    local model = body:match('"model"%s*:%s*"([^"]*)"') or "mock-llm"
    dict:set("model:" .. node, model)
    local stream = body:find('"stream"%s*:%s*true') ~= nil

    local latency = num(node, "latency_ms")
    if latency > 0 then ngx.sleep(latency / 1000) end

    local n = dict:incr("served:" .. node, 1, 0)
    local id = "chatcmpl-" .. node .. "-" .. n
    local created = floor(ngx.time())
    local parts = words(node)
    ngx.header["X-Node"] = node
    if not stream then
        local prompt = max(1, floor(#body / 4))
        return send_json(200, "{\"id\":" .. q(id) .. ",\"object\":\"chat.completion\",\"created\":"
            .. created .. ",\"model\":" .. q(model) .. ",\"choices\":[{\"index\":0,\"message\":"
            .. "{\"role\":\"assistant\",\"content\":" .. q(concat(parts)) .. "},\"finish_reason\":\"stop\"}],"
            .. "\"usage\":{\"prompt_tokens\":" .. prompt .. ",\"completion_tokens\":" .. #parts
            .. ",\"total_tokens\":" .. (prompt + #parts) .. "}}")
    end
    ngx.status = 200
    ngx.header["Content-Type"] = "text/event-stream"
    ngx.header["Cache-Control"] = "no-cache"
    local pause = num(node, "chunk_ms") / 1000
    ngx.print(chunk(id, created, model, '{"role":"assistant","content":""}'))
    ngx.flush(true)
    local cut = num(node, "cut_after")
    for i = 1, #parts do
        if i > cut and cut > 0 then
            return ngx.exit(444) -- drop the connection mid-stream
        end
        if pause > 0 then ngx.sleep(pause) end
        ngx.print(chunk(id, created, model, '{"content":' .. q(parts[i]) .. "}"))
        ngx.flush(true)
    end
    ngx.print(chunk(id, created, model, "{}", "stop"))
    ngx.print("data: [DONE]\n\n")
    ngx.flush(true)
    return ngx.exit(200)
end

local function failing(node, uri)
    local fail = knob(node, "fail")
    if uri == "/health" then
        local hf = knob(node, "health_fail")
        if hf == "503" or hf == "close" then fail = hf end
    elseif fail == "429" then
        dict:incr("rejected:" .. node, 1, 0)
        return send_json(429, error_body("Rate limit reached for node " .. node .. ".", "tokens",
                                         "rate_limit_exceeded"),
                         { ["X-Node"] = node, ["Retry-After"] = retry_after(node, num(node, "retry_after")) })
    end
    if fail == "503" then
        return send_json(503, error_body("The server is overloaded or not ready yet.", "server_error",
                                         "service_unavailable"), { ["X-Node"] = node })
    elseif fail == "close" then
        return ngx.exit(444) -- close the connection without a response
    end
end

local function set_knobs(node)
    local args = ngx.req.get_uri_args()
    local changed = {}
    for name in pairs(KNOBS) do
        local v = args[name]
        if type(v) == "string" then
            if v == "" or v == "default" then
                dict:delete("cfg:" .. node .. ":" .. name)
            else
                dict:set("cfg:" .. node .. ":" .. name, v)
            end
            changed[#changed + 1] = q(name)
        end
    end
    return send_json(200, '{"node":' .. q(node) .. ',"changed":[' .. concat(changed, ",") .. "]}")
end

local function state(node)
    local fields = {}
    for name in pairs(KNOBS) do
        fields[#fields + 1] = q(name) .. ":" .. q(knob(node, name) or "")
    end
    return send_json(200, '{"node":' .. q(node) .. ',"inflight":' .. (dict:get("conc:" .. node) or 0)
        .. ',"served":' .. (dict:get("served:" .. node) or 0)
        .. ',"rejected":' .. (dict:get("rejected:" .. node) or 0)
        .. ',"received":' .. (dict:get("received:" .. node) or 0)
        .. ',"peak_inflight":' .. (dict:get("peak:" .. node) or 0)
        .. ',"health_checks":' .. (dict:get("health:" .. node) or 0)
        .. ',"last_retry_after":' .. q(dict:get("last_ra:" .. node) or "")
        .. ',"last_model":' .. q(dict:get("model:" .. node) or "")
        .. ',"last_host":' .. q(dict:get("host:" .. node) or "")
        .. ',"last_sni":' .. q(dict:get("sni:" .. node) or "")
        .. ',"unauthorized":' .. (dict:get("unauthorized:" .. node) or 0)
        .. ',"knobs":{' .. concat(fields, ",") .. "}}")
end

--- content_by_lua_block { require("mock_llm").handle() }
function _M.handle()
    local node = ngx.var.mock_node
    local uri = ngx.var.uri
    if uri == "/mock/set" then return set_knobs(node) end
    if uri == "/mock/state" then return state(node) end

    -- Counted before anything else, so that log() can always decrement.
    local inflight = dict:incr("conc:" .. node, 1, 0)
    ngx.ctx.mock_counted = node
    if uri == "/health" then
        dict:incr("health:" .. node, 1, 0)
    else
        dict:incr("received:" .. node, 1, 0)
        if inflight > (dict:get("peak:" .. node) or 0) then
            dict:set("peak:" .. node, inflight)
        end
    end

    -- A provider: its Host and its API key, as a real one checks them.
    dict:set("host:" .. node, ngx.var.http_host or "")
    dict:set("sni:" .. node, ngx.var.ssl_server_name or "")
    local want_host, want_key = knob(node, "require_host"), knob(node, "require_key")
    if want_host and want_host ~= "" and ngx.var.http_host ~= want_host then
        dict:incr("unauthorized:" .. node, 1, 0)
        return send_json(421, error_body("Misdirected request: this is " .. want_host,
                                         "invalid_request_error", "misdirected"), { ["X-Node"] = node })
    end
    if want_key and want_key ~= "" and ngx.var.http_authorization ~= "Bearer " .. want_key then
        dict:incr("unauthorized:" .. node, 1, 0)
        return send_json(401, error_body("Incorrect API key provided.", "invalid_request_error",
                                         "invalid_api_key"), { ["X-Node"] = node })
    end

    failing(node, uri) -- answers 503/429 or closes the connection (ngx.exit does not return)
    if uri == "/health" then
        return send_json(200, '{"status":"ok","node":' .. q(node) .. "}", { ["X-Node"] = node })
    end
    if uri ~= "/v1/chat/completions" then
        return send_json(404, error_body("Unknown path " .. uri, "invalid_request_error", "not_found"),
                         { ["X-Node"] = node })
    end

    local cap = num(node, "max_conc")
    if cap > 0 and inflight > cap then
        dict:incr("rejected:" .. node, 1, 0)
        return send_json(429, error_body("Too many concurrent requests on node " .. node
            .. " (" .. cap .. " max).", "requests", "rate_limit_exceeded"),
            { ["X-Node"] = node, ["Retry-After"] = retry_after(node, num(node, "retry_after")) })
    end
    local rps = num(node, "quota_rps")
    if rps > 0 then
        local ok, wait = take_token(node, rps, num(node, "quota_burst"))
        if not ok then
            dict:incr("rejected:" .. node, 1, 0)
            return send_json(429, error_body("Rate limit reached for node " .. node .. ": quota of "
                .. rps .. " requests/s exhausted.", "tokens", "rate_limit_exceeded"),
                { ["X-Node"] = node, ["Retry-After"] = retry_after(node, wait) })
        end
    end
    return chat(node)
end

--- log_by_lua_block { require("mock_llm").log() }
function _M.log()
    local node = ngx.ctx.mock_counted
    if node then
        dict:incr("conc:" .. node, -1, 0)
        ngx.ctx.mock_counted = nil
    end
end

return _M
