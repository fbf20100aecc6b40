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
--   preamble_ms     > 0: a streamed reply sends its headers at once, then holds the
--                   request "queued" this long with `: keep-alive` comments and blank
--                   lines (DeepSeek's style, one every 50 ms) before its first token
--   tokens          > 0: completion tokens of a reply (content chunks of a stream, and
--                   usage.completion_tokens); else the request's "max_tokens" (at most
--                   4096), else 10. chunk_ms is the time per token of a stream.
--   busy_ms         > 0: a 429 over max_conc is answered after this long (a server that
--                   takes a while to refuse; the refused request stays in flight meanwhile)
--   no_done         "1": a streamed reply ends (cleanly) after its content chunks, with
--                   no finish_reason and no `data: [DONE]` (a node that lost the stream)
--
-- Per request: a chat body with "mock_hold_ms": N is answered after N ms instead of
-- latency_ms (one long request among short ones). A chat reply carries X-Mock-Seq: the
-- request's rank among those the node received (1, 2, ...): the order the gateways
-- let them through.
--
-- Usage, as OpenAI sends it: a JSON reply always carries "usage"; a stream carries it
-- in one last chunk ("choices":[]) before [DONE] when the request has
-- "stream_options": {"include_usage": true}.
--
-- GET /metrics: the node's Prometheus gauges as a self-hosted server exposes them
-- (not counted in flight or in "received"):
--   metrics_style   "vllm" (default): vllm:num_requests_running / _waiting and
--                   vllm:kv_cache_usage_perc, with engine and model_name labels, the
--                   waiting queue split over two model_name label sets as a server
--                   with two models would; "sglang": sglang:num_running_reqs,
--                   sglang:num_queue_reqs, sglang:token_usage; "vllm_old": the usage as
--                   vllm:gpu_cache_usage_perc
--   queue_waiting   requests the node says wait in its queue (default 0: another
--                   client's load, as a shared node has); running is its real count of
--                   chat requests in flight
--   kv_usage        the KV-cache usage it reports, 0..1 (default: running / 100, at most 1)
--   metrics_fail    "" | "503" | "close" (drop the connection) | "garbage" (a 200 with
--                   an HTML page) | "slow" (answer after 3 s) | "huge" (a valid page
--                   padded with comments to 2 MiB)
-- The vLLM styles end the body by closing the connection; "sglang" sends a
-- Content-Length.
-- A provider's per-minute rate limits (runtime knobs too): the node keeps real request
-- and token counts of the last 60 s across its workers (one bucket per second in the
-- shared dict, changed under a lock), charging each chat request its prompt bytes / 4
-- plus its max_tokens (1024 when it names none), as providers count max_tokens
-- against TPM at admission. A request arriving while the window holds rpm_limit
-- requests or tpm_limit tokens or more gets 429 (Retry-After: until the oldest
-- second leaves the window; "window_rejected" in /mock/state).
--   limit_style     "" (no limits) | "openai": x-ratelimit-{limit,remaining,reset}-
--                   {requests,tokens}, resets as durations (`1.5s`, `1m0s`) |
--                   "anthropic": anthropic-ratelimit-{requests,tokens}-{limit,remaining,
--                   reset}, resets as RFC 3339 times | "hidden": DeepSeek, no headers
--   rpm_limit, tpm_limit  the limits (0 or unset: none)
--   ra_ms           "1": the window's 429s carry `retry-after-ms` instead of Retry-After
--   hdr_remaining_requests, hdr_reset_requests, hdr_remaining_tokens, hdr_reset_tokens
--                   scripted headers: sent (in limit_style's names) instead of what the
--                   counts say; a reset "+N" is N seconds from now in the style's format
--
-- Runtime overrides (all workers, until changed back; "" or "default" clears one):
--   POST /mock/set?fail=503&latency_ms=500&max_conc=2   (keys: the names above minus mock_)
--   POST /mock/set?reset_peak=1   peak_inflight starts over from the requests in flight now
--   GET  /mock/state   -> {"node":..,"inflight":..,"served":..,"rejected":..,"received":..,
--                          "health_checks":..,"last_retry_after":..,"knobs":{..}}
--     received: requests other than /health, /mock/set and /mock/state (every try a gateway
--     sent, whatever the answer); health_checks: GET /health requests; last_retry_after: the
--     Retry-After of the latest 429 ("" if none yet); last_model, last_host: the "model" of
--     the latest chat request and the Host of the latest request; last_sni: its TLS server
--     name ("" over plain HTTP); unauthorized: the 401s
--     and 421s of require_key and require_host; scrapes: GET /metrics requests;
--     scrapers: how many distinct User-Agents sent them; last_scraper: the latest one;
--     last_include_usage: whether the latest
--     chat request asked for usage in its stream (stream_options.include_usage); peak_inflight: the most
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
    preamble_ms = "mock_preamble_ms", tokens = "mock_tokens", no_done = "mock_no_done",
    require_host = "mock_require_host", require_key = "mock_require_key",
    metrics_style = "mock_metrics_style", queue_waiting = "mock_queue_waiting",
    kv_usage = "mock_kv_usage", metrics_fail = "mock_metrics_fail",
    limit_style = "mock_limit_style", rpm_limit = "mock_rpm_limit", tpm_limit = "mock_tpm_limit",
    ra_ms = "mock_ra_ms", busy_ms = "mock_busy_ms",
    hdr_remaining_requests = "mock_hdr_remaining_requests",
    hdr_reset_requests = "mock_hdr_reset_requests",
    hdr_remaining_tokens = "mock_hdr_remaining_tokens",
    hdr_reset_tokens = "mock_hdr_reset_tokens",
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

-- shared dicts have no compare-and-swap: a read-modify-write is guarded by a short
-- lock made with add() (atomic, expiring). Returns the lock's key, for delete().
local function lock(key)
    for _ = 1, 200 do
        if dict:add(key, true, 0.05) then break end
        ngx.sleep(0.001)
    end
    ngx.update_time()
    return key
end

-- Token bucket shared by the node's workers (under lock()).
-- Returns true, or false and the seconds until a token is available.
local function take_token(node, rps, burst)
    if burst <= 0 then burst = max(rps, 1) end
    local lock_key = lock("qlock:" .. node)
    local now = ngx.now()
    local tokens = dict:get("qtok:" .. node) or burst
    local stamp = dict:get("qts:" .. node) or now
    tokens = min(burst, tokens + (now - stamp) * rps)
    local ok = tokens >= 1
    if ok then tokens = tokens - 1 end
    dict:set("qtok:" .. node, tokens)
    dict:set("qts:" .. node, now)
    dict:delete(lock_key)
    if ok then return true end
    return false, max(1, ceil((1 - tokens) / rps))
end

-- ---------------------------------------------------------------------------------
-- Per-minute rate limits (limit_style): a 60 s window of one-second buckets.

local WINDOW_S = 60

local function window_sums(node, now_s)
    local t, r, oldest = 0, 0, nil
    for sec = now_s - WINDOW_S + 1, now_s do
        local rv = dict:get("wr:" .. node .. ":" .. sec)
        if rv then
            r = r + rv
            t = t + (dict:get("wt:" .. node .. ":" .. sec) or 0)
            oldest = oldest or sec
        end
    end
    return t, r, oldest
end

-- A reset `secs` from now as the style writes it.
local function reset_text(style, secs)
    if style == "anthropic" then
        return os.date("!%Y-%m-%dT%H:%M:%SZ", ceil(ngx.now() + secs))
    end
    if secs >= 60 then
        return string.format("%dm%ds", floor(secs / 60), floor(secs % 60))
    end
    return string.format("%.3fs", secs)
end

local function scripted(node, style, name, computed, is_reset)
    local v = knob(node, "hdr_" .. name)
    if v == nil or v == "" then return computed end
    if is_reset and v:sub(1, 1) == "+" then
        return reset_text(style, tonumber(v:sub(2)) or 0)
    end
    return v
end

local function limit_headers(node, style, rpm, tpm, r, t, reset_s)
    local h = {}
    local reset = reset_text(style, reset_s)
    local vals = {
        limit_requests = rpm, limit_tokens = tpm,
        remaining_requests = scripted(node, style, "remaining_requests", max(0, rpm - r)),
        remaining_tokens = scripted(node, style, "remaining_tokens", max(0, tpm - t)),
        reset_requests = scripted(node, style, "reset_requests", reset, true),
        reset_tokens = scripted(node, style, "reset_tokens", reset, true),
    }
    for k, v in pairs(vals) do
        local what, dim = k:match("^(%a+)_(%a+)$")
        if style == "anthropic" then
            h["anthropic-ratelimit-" .. dim .. "-" .. what] = v
        else
            h["x-ratelimit-" .. what .. "-" .. dim] = v
        end
    end
    return h
end

-- Charges a chat request to the window; returns the headers to send, or answers 429.
local function rate_limit(node, body)
    local style = knob(node, "limit_style")
    if not style or style == "" then return nil end
    local rpm, tpm = num(node, "rpm_limit"), num(node, "tpm_limit")
    local mt = tonumber(body:match('"max_tokens"%s*:%s*(%d+)')) or 1024
    local charge = floor(#body / 4) + mt
    local lock_key = lock("wlock:" .. node)
    local now = ngx.now()
    local now_s = floor(now)
    local t, r, oldest = window_sums(node, now_s)
    local full = (rpm > 0 and r >= rpm) or (tpm > 0 and t >= tpm)
    if not full then
        dict:incr("wr:" .. node .. ":" .. now_s, 1, 0, WINDOW_S + 2)
        dict:incr("wt:" .. node .. ":" .. now_s, charge, 0, WINDOW_S + 2)
        t, r = t + charge, r + 1
        oldest = oldest or now_s
        if t > (dict:get("maxwt:" .. node) or 0) then dict:set("maxwt:" .. node, t) end
        if r > (dict:get("maxwr:" .. node) or 0) then dict:set("maxwr:" .. node, r) end
    end
    dict:delete(lock_key)
    local reset_s = max(0.001, oldest + WINDOW_S - now)
    local h = style ~= "hidden" and limit_headers(node, style, rpm, tpm, r, t, reset_s) or {}
    if full then
        dict:incr("rejected:" .. node, 1, 0)
        dict:incr("wrejected:" .. node, 1, 0)
        h["X-Node"] = node
        if knob(node, "ra_ms") == "1" then
            h["retry-after-ms"] = tostring(ceil(reset_s * 1000))
        else
            h["Retry-After"] = tostring(ceil(reset_s))
        end
        return send_json(429, error_body("Rate limit reached for node " .. node .. ".", "tokens",
                                         "rate_limit_exceeded"), h)
    end
    return h
end

local WORDS = { "Hello", " from", " mock", " node", " %s.", " This", " is", " a", " canned", " reply." }

-- `count` tokens of the canned reply (its words, repeated).
local function words(node, count)
    local out = {}
    for i = 1, count do
        local w = WORDS[(i - 1) % #WORDS + 1]
        out[i] = w:gsub("%%s", node)
    end
    return out
end

-- Completion tokens of a reply: the `tokens` knob, else the body's max_tokens, else 10.
local function token_count(node, body)
    local n = num(node, "tokens")
    if n > 0 then return n end
    n = tonumber(body:match('"max_tokens"%s*:%s*(%d+)'))
    if n and n > 0 then return min(n, 4096) end
    return #WORDS
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
    local limit_h = rate_limit(node, body) -- answers 429 when the window is full
    if limit_h then
        for k, v in pairs(limit_h) do ngx.header[k] = v end
    end
    local model = body:match('"model"%s*:%s*"([^"]*)"') or "mock-llm"
    dict:set("model:" .. node, model)
    local stream = body:find('"stream"%s*:%s*true') ~= nil
    local include_usage = body:find('"include_usage"%s*:%s*true') ~= nil
    dict:set("include_usage:" .. node, include_usage)

    local latency = tonumber(body:match('"mock_hold_ms"%s*:%s*(%d+)')) or num(node, "latency_ms")
    if latency > 0 then ngx.sleep(latency / 1000) end

    local n = dict:incr("served:" .. node, 1, 0)
    local id = "chatcmpl-" .. node .. "-" .. n
    local created = floor(ngx.time())
    local parts = words(node, token_count(node, body))
    local prompt = max(1, floor(#body / 4))
    ngx.header["X-Node"] = node
    ngx.header["X-Mock-Seq"] = ngx.ctx.mock_seq
    if not stream then
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
    local preamble = num(node, "preamble_ms") / 1000
    if preamble > 0 then
        -- Queued: headers now, keep-alives until the first token (DeepSeek's style).
        ngx.send_headers()
        ngx.flush(true)
        local t0, i = ngx.now(), 0
        repeat
            ngx.print(i % 2 == 0 and ": keep-alive\n\n" or "\n")
            ngx.flush(true)
            i = i + 1
            ngx.sleep(min(0.05, preamble))
            ngx.update_time()
        until ngx.now() - t0 >= preamble
    end
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
    if knob(node, "no_done") == "1" then
        return ngx.exit(200) -- ends cleanly, but without a finish_reason or [DONE]
    end
    ngx.print(chunk(id, created, model, "{}", "stop"))
    if include_usage then
        ngx.print("data: {\"id\":" .. q(id) .. ",\"object\":\"chat.completion.chunk\",\"created\":"
            .. created .. ",\"model\":" .. q(model) .. ",\"choices\":[],\"usage\":{\"prompt_tokens\":"
            .. prompt .. ",\"completion_tokens\":" .. #parts .. ",\"total_tokens\":"
            .. (prompt + #parts) .. "}}\n\n")
    end
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

-- GET /metrics (knobs in the header comment).
local function metrics(node)
    dict:incr("scrapes:" .. node, 1, 0)
    local agent = ngx.var.http_user_agent or ""
    if dict:add("scraper:" .. node .. ":" .. agent, true) then
        dict:incr("scrapers:" .. node, 1, 0)
    end
    dict:set("last_scraper:" .. node, agent)
    local fail = knob(node, "metrics_fail")
    if fail == "slow" then
        ngx.sleep(3)
    elseif fail == "503" then
        return send_json(503, error_body("metrics unavailable", "server_error", "unavailable"))
    elseif fail == "close" then
        return ngx.exit(444)
    elseif fail == "garbage" then
        ngx.header["Content-Type"] = "text/html"
        ngx.print("<html><body>502 Bad Gateway</body></html>\n")
        return ngx.exit(200)
    end
    local running = dict:get("conc:" .. node) or 0
    local waiting = num(node, "queue_waiting")
    local kv = tonumber(knob(node, "kv_usage")) or min(1, running / 100)
    local style = knob(node, "metrics_style") or "vllm"
    local out = {}
    local function gauge(name, help, samples)
        out[#out + 1] = "# HELP " .. name .. " " .. help .. "\n# TYPE " .. name .. " gauge\n"
        for i = 1, #samples, 2 do
            local v = samples[i + 1]
            -- Whole numbers as vLLM prints them ("3.0"), fractions in full.
            out[#out + 1] = name .. "{" .. samples[i] .. "} "
                .. string.format(v == floor(v) and "%.1f" or "%.6g", v) .. "\n"
        end
    end
    if style == "sglang" then
        local l = 'model_name="mock-llm"'
        gauge("sglang:num_running_reqs", "The number of running requests.", { l, running })
        gauge("sglang:num_queue_reqs", "The number of requests in the waiting queue.", { l, waiting })
        gauge("sglang:token_usage", "The token usage.", { l, kv })
        gauge("sglang:gen_throughput", "The generation throughput (token/s).", { l, 123.4 })
    else
        local a, b = 'engine="0",model_name="mock-llm"', 'engine="0",model_name="mock-llm-b"'
        local half = floor(waiting / 2)
        gauge("vllm:num_requests_running", "Number of requests in model execution batches.",
              { a, running, b, 0 })
        gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.",
              { a, waiting - half, b, half })
        gauge(style == "vllm_old" and "vllm:gpu_cache_usage_perc" or "vllm:kv_cache_usage_perc",
              "KV-cache usage. 1 means 100 percent usage.", { a, kv, b, 0 })
        out[#out + 1] = 'vllm:prompt_tokens_total{engine="0",model_name="mock-llm"} 4242.0\n'
    end
    if fail == "huge" then
        out[#out + 1] = string.rep("# " .. string.rep("x", 1021) .. "\n", 2048)
    end
    local text = concat(out)
    ngx.header["Content-Type"] = "text/plain; version=0.0.4; charset=utf-8"
    if style == "sglang" then
        ngx.header["Content-Length"] = #text
    end
    ngx.print(text)
    return ngx.exit(200)
end

local function set_knobs(node)
    local args = ngx.req.get_uri_args()
    local changed = {}
    if args.reset_peak then
        -- Measure peak_inflight from now: the requests in flight now are its start.
        dict:set("peak:" .. node, dict:get("conc:" .. node) or 0)
        changed[#changed + 1] = q("reset_peak")
    end
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
        .. ',"scrapes":' .. (dict:get("scrapes:" .. node) or 0)
        .. ',"scrapers":' .. (dict:get("scrapers:" .. node) or 0)
        .. ',"last_scraper":' .. q(dict:get("last_scraper:" .. node) or "")
        .. ',"window_rejected":' .. (dict:get("wrejected:" .. node) or 0)
        .. ',"max_window_tokens":' .. (dict:get("maxwt:" .. node) or 0)
        .. ',"max_window_requests":' .. (dict:get("maxwr:" .. node) or 0)
        .. ',"last_include_usage":' .. tostring(dict:get("include_usage:" .. node) or false)
        .. ',"knobs":{' .. concat(fields, ",") .. "}}")
end

--- content_by_lua_block { require("mock_llm").handle() }
function _M.handle()
    local node = ngx.var.mock_node
    local uri = ngx.var.uri
    if uri == "/mock/set" then return set_knobs(node) end
    if uri == "/mock/state" then return state(node) end
    if uri == "/metrics" then return metrics(node) end

    -- Counted before anything else, so that log() can always decrement.
    local inflight = dict:incr("conc:" .. node, 1, 0)
    ngx.ctx.mock_counted = node
    if uri == "/health" then
        dict:incr("health:" .. node, 1, 0)
    else
        -- Its rank among the node's requests, as it arrived: X-Mock-Seq of the reply.
        ngx.ctx.mock_seq = dict:incr("received:" .. node, 1, 0)
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
        local busy_ms = num(node, "busy_ms")
        if busy_ms > 0 then ngx.sleep(busy_ms / 1000) end
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
