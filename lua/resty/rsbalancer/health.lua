-- resty.rsbalancer.health: active HTTP health checks.
--
-- Every worker runs a timer per pool that has a "health" section, but only the
-- worker holding the lease in shared memory probes: the lease is renewed on every
-- tick and expires after three intervals, and a holder that died is replaced at
-- once (its pid is gone), so probing moves to another worker when its worker is
-- killed. Results go to the shared node slots (bal:health_report), so every worker
-- sees a node go down or come back on its next pick. A passing probe does not cut a
-- 429 cooldown or an ejection short: health is a separate state.
--
-- Probes are HTTP/1.0 GETs over cosockets (resty.rsbalancer.http), run concurrently
-- (one light thread per node), each bounded by timeout_ms. A node with a provider
-- (resty.rsbalancer.provider) is probed as its requests are sent: over TLS for
-- `https` (SNI = its host; the certificate checked against lua_ssl_trusted_certificate
-- unless tls_verify is false), with its Host and its headers, so a path that needs
-- the API key (/v1/models) works. Header values are never logged.

local ngx = ngx
local http = require "resty.rsbalancer.http"
local spawn, wait = ngx.thread.spawn, ngx.thread.wait
local random = math.random

local _M = {}

-- The TLS name of a Host value: without its port, none for an IP address.
local function sni_of(host)
    local name = host:match("^%[.*%]") or host:match("^[^:]*")
    if name:find("^%[") or name:find("^[%d.]+$") then return nil end
    return name
end
_M.sni_of = sni_of

-- The text and TLS options of a GET of `path` from a node, sent as its requests are
-- (Host, headers, TLS): `host` overrides the Host, `req` is the node's provider request
-- (resty.rsbalancer.provider.request) or nil. Also used by resty.rsbalancer.scrape.
local function get_request(node, path, host, agent, req)
    host = host or (req and req.host) or node.host
    local extra, tls = "", nil
    if req then
        local h = req.headers
        for i = 1, #h do
            extra = extra .. h[i][1] .. ": " .. h[i][2] .. "\r\n"
        end
        if req.scheme == "https" then
            tls = { sni = sni_of(req.host), verify = req.tls_verify }
        end
    end
    return "GET " .. path .. " HTTP/1.0\r\nHost: " .. host .. "\r\nUser-Agent: " .. agent
        .. "\r\n" .. extra .. "Connection: close\r\n\r\n", tls
end
_M.get_request = get_request

-- One probe: true when the node answered with an expected status. `req`: the node's
-- provider request (resty.rsbalancer.provider.request), or nil.
local function probe(node, cfg, req)
    local request, tls = get_request(node, cfg.path, cfg.host, "rsbalancer-health", req)
    local code, err = http.status(node.ip, node.port, cfg.timeout_ms, request, tls)
    if not code then
        return false, err
    end
    for i = 1, #cfg.statuses do
        if cfg.statuses[i] == code then
            return true
        end
    end
    return false, "status " .. code
end
_M.probe = probe

-- Probe every node of a pool once (lease holder only).
local function check_pool(bal, pool, cfg)
    local nodes = bal:nodes(pool)
    if not nodes then return end
    local provider = require "resty.rsbalancer.provider"
    local threads = {}
    for i = 1, #nodes do
        threads[i] = spawn(probe, nodes[i], cfg, provider.request(nodes[i].slot))
    end
    for i = 1, #nodes do
        local _, passed, why = wait(threads[i])
        local n = nodes[i]
        local flip = bal:health_report(n.slot, passed and true or false)
        -- One line per flip, from the lease holder only (the same shape as the
        -- library's cooling / ejected / back lines, src/notice.rs).
        if flip == "down" then
            ngx.log(ngx.NOTICE, "rsbalancer: pool ", pool, " node ", n.id, " (", n.ip, ":", n.port,
                    ") down until ", cfg.healthy, " health checks pass: ", cfg.unhealthy,
                    " consecutive health checks failed (", why, ")")
        elseif flip == "up" then
            ngx.log(ngx.NOTICE, "rsbalancer: pool ", pool, " node ", n.id, " (", n.ip, ":", n.port,
                    ") back: ", cfg.healthy, " consecutive health checks passed (slow start)")
        end
    end
end

-- One tick of a leased timer (see leased_timers).
local function tick(premature, job, pool, cfg)
    if premature then return end
    local interval_ms = cfg[job.interval]
    -- Lease for three intervals: the holder renews it each tick.
    if job.bal:health_lease(interval_ms * 3) then
        local ok, err = pcall(job.work, job.bal, pool, cfg)
        if not ok then
            ngx.log(ngx.ERR, "rsbalancer: ", job.what, " of pool ", pool, " failed: ", err)
        end
    end
    -- Jitter of up to 10% so that probes do not line up with other periodic work.
    local delay = interval_ms * (1 + random() * 0.1) / 1000
    local ok, err = ngx.timer.at(delay, tick, job, pool, cfg)
    if not ok and err ~= "process exiting" then
        ngx.log(ngx.ERR, "rsbalancer: cannot schedule ", job.what, " of pool ", pool, ": ", err)
    end
end

--- leased_timers(bal, section, interval, what, work): in init_worker, one timer per
-- pool whose config has `section`: every cfg[interval] ms (jittered), the worker that
-- holds the health-check lease runs work(bal, pool, cfg). `what` names it in errors.
-- Also used by resty.rsbalancer.scrape.
function _M.leased_timers(bal, section, interval, what, work)
    local job = { bal = bal, interval = interval, what = what, work = work }
    local names = bal:pool_names() or {}
    for i = 1, #names do
        local cfg = bal:pool_config(names[i])[section]
        if cfg then
            local ok, err = ngx.timer.at(random() * cfg[interval] / 1000, tick, job, names[i], cfg)
            if not ok then
                return nil, err
            end
        end
    end
    return true
end

--- start(bal): in init_worker. One timer per pool with a health section.
function _M.start(bal)
    return _M.leased_timers(bal, "health", "interval_ms", "health check", check_pool)
end

return _M
