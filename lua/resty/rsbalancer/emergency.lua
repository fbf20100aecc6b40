-- resty.rsbalancer.emergency: the overload detector's timer and alert delivery.
--
-- Every worker runs `bal:emergency_tick()` once a second (ngx.timer.every). The
-- detector itself is in Rust (src/emergency.rs): it reads each pool's shared sliding
-- window and switches emergency mode on or off with a compare-and-swap on the pool's
-- shared slot, so of all the workers ticking exactly one wins each transition and only
-- that one gets it back here. An operator's forced change (`set_emergency(pool, "on" |
-- "off")`) is announced by the worker that made it.
--
-- Announcing a transition: one line in the error log (warn on entry, notice on exit)
-- and one JSON POST to each of the pool's webhooks. POSTs are never sent from the
-- request path: each delivery is its own ngx.timer.at, which sends an HTTP/1.1 POST
-- (Content-Type: application/json, Connection: close) over a cosocket and reads the
-- status line (resty.rsbalancer.http); a 2xx is success. Failures are retried `retries` times with
-- exponential backoff (0.5 s, 1 s, 2 s, ... at most 30 s). Rate limit: deliveries to
-- one webhook from one worker start at least `min_interval_ms` apart; an alert over
-- the limit waits its turn, it is never dropped.

local ngx = ngx
local http = require "resty.rsbalancer.http"
local find, sub, tonumber, tostring = string.find, string.sub, tonumber, tostring
local min = math.min

local _M = {}

local TICK_S = 1
local MAX_BACKOFF_S = 30

-- url -> when (ngx.now()) the next delivery to it may start, in this worker.
local next_free = {}

-- host (as written, for the Host header), host to connect to, port, path.
local function parse_url(url)
    local _, _, authority, path = find(url, "^http://([^/]+)(.*)$")
    if not authority then return nil end
    if path == "" then path = "/" end
    local host, port
    if sub(authority, 1, 1) == "[" then
        local _, _, h, p = find(authority, "^%[([^%]]+)%]:?(%d*)$")
        host, port = h, p
    else
        local _, _, h, p = find(authority, "^([^:]+):?(%d*)$")
        host, port = h, p
    end
    if not host then return nil end
    return authority, host, tonumber(port) or 80, path
end
_M._parse_url = parse_url

--- post(hook, body): one attempt. true, status; or false, err.
local function post(hook, body)
    local authority, host, port, path = parse_url(hook.url)
    if not host then
        return false, "bad url " .. tostring(hook.url)
    end
    local code, err = http.status(host, port, hook.timeout_ms, "POST " .. path
        .. " HTTP/1.1\r\nHost: " .. authority
        .. "\r\nUser-Agent: rsbalancer-alert\r\nContent-Type: application/json\r\nContent-Length: "
        .. #body .. "\r\nConnection: close\r\n\r\n" .. body)
    if not code then
        return false, err
    end
    if code < 200 or code > 299 then
        return false, "status " .. code
    end
    return true, code
end
_M._post = post

local deliver

local function backoff_s(attempt)
    return min(0.5 * 2 ^ attempt, MAX_BACKOFF_S)
end

-- Timer: one attempt of one alert to one webhook; retries itself.
deliver = function(premature, hook, body, what, attempt)
    local ok, err = post(hook, body)
    if ok then
        if attempt > 0 then
            ngx.log(ngx.NOTICE, "rsbalancer: alert ", what, " delivered to ", hook.url,
                    " after ", attempt, " retries")
        end
        return
    end
    if premature or attempt >= hook.retries then
        ngx.log(ngx.ERR, "rsbalancer: alert ", what, " to ", hook.url, " failed after ",
                attempt + 1, " attempts: ", err)
        return
    end
    ngx.log(ngx.WARN, "rsbalancer: alert ", what, " to ", hook.url, " failed (", err,
            "), retrying")
    local tok, terr = ngx.timer.at(backoff_s(attempt), deliver, hook, body, what, attempt + 1)
    if not tok then
        ngx.log(ngx.ERR, "rsbalancer: cannot retry alert ", what, " to ", hook.url, ": ", terr)
    end
end

-- Queue one delivery, respecting the webhook's rate limit.
local function schedule(hook, body, what)
    local now = ngx.now()
    local at = next_free[hook.url] or now
    if at < now then at = now end
    next_free[hook.url] = at + (hook.min_interval_ms or 0) / 1000
    local ok, err = ngx.timer.at(at - now, deliver, hook, body, what, 0)
    if not ok then
        ngx.log(ngx.ERR, "rsbalancer: cannot queue alert ", what, " to ", hook.url, ": ", err)
    end
end

--- announce(bal, tr): log a transition (from bal:emergency_tick() or
-- bal:set_emergency()) and queue its webhooks. Never sends anything itself.
function _M.announce(bal, tr)
    ngx.log(tr.event == "enter" and ngx.WARN or ngx.NOTICE, "rsbalancer: ", tr.log)
    local cfg = bal:pool_config(tr.pool)
    local hooks = cfg and cfg.emergency and cfg.emergency.webhooks
    if not hooks then return end
    local what = tr.pool .. " " .. tr.event
    for i = 1, #hooks do
        schedule(hooks[i], tr.body, what)
    end
end

local function tick(premature, bal)
    if premature then return end
    local list, err = bal:emergency_tick()
    if not list then
        ngx.log(ngx.ERR, "rsbalancer: emergency detector: ", err)
        return
    end
    for i = 1, #list do
        _M.announce(bal, list[i])
    end
end

--- start(bal): in init_worker. The detector's timer in this worker.
function _M.start(bal)
    return ngx.timer.every(TICK_S, tick, bal)
end

return _M
