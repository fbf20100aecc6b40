-- resty.rsbalancer.scrape: queue depth of self-hosted nodes (vLLM, SGLang).
--
-- Every worker runs a timer per pool that has a "scrape" section, but only the worker
-- holding the health-check lease in shared memory scrapes (the lease of
-- resty.rsbalancer.health: renewed on every tick, replaced at once when its holder
-- dies). Every `scrape_ms` it GETs each node's metrics path (on `scrape.port` when
-- set, else the node's port; as the node's requests are sent: Host, headers, TLS),
-- concurrently, each bounded by `timeout_ms`, reads at most `max_bytes` of body, and
-- hands it to bal:queue_report, which parses it in Rust and stores the figures in the
-- node's shared slot (src/scrape.rs: what the cost does with them).
--
-- A failed scrape (no connection, a status other than 200, a body too long or without
-- the metrics) never takes a node out: it is reported as such, and the node's last
-- figures are ignored once three intervals old. One log line per transition (scrapes
-- failing / working again, figures stale / fresh), from the lease holder. The
-- User-Agent names the scraping worker's pid.

local ngx = ngx
local http = require "resty.rsbalancer.http"
local health = require "resty.rsbalancer.health"
local spawn, wait = ngx.thread.spawn, ngx.thread.wait

local _M = {}

-- One scrape: the body of a 200, or nil, err.
local function scrape(node, cfg, req, agent)
    local request, tls = health.get_request(node, cfg.path, nil, agent, req)
    local code, body = http.fetch(node.ip, cfg.port or node.port, cfg.timeout_ms, request,
                                  cfg.max_bytes, tls)
    if not code then
        return nil, body
    end
    if code ~= 200 then
        return nil, "status " .. code
    end
    return body
end

local function note(pool, n, what, why)
    local where = "rsbalancer: pool " .. pool .. " node " .. n.id .. " (" .. n.ip .. ":" .. n.port .. ")"
    if what == "failing" then
        ngx.log(ngx.NOTICE, where, " queue scrapes failing (", why or "?",
                "): its last queue figures are ignored once three intervals old")
    elseif what == "working" then
        ngx.log(ngx.NOTICE, where, " queue scrapes work again")
    elseif what == "stale" then
        ngx.log(ngx.NOTICE, where, " queue figures stale (older than three scrape intervals): ignored")
    elseif what == "fresh" then
        ngx.log(ngx.NOTICE, where, " queue figures fresh: counted in its cost")
    end
end

-- Scrape every node of a pool once (lease holder only).
local function scrape_pool(bal, pool, cfg)
    local nodes = bal:nodes(pool)
    if not nodes then return end
    local provider = require "resty.rsbalancer.provider"
    local agent = "rsbalancer-scrape (worker " .. ngx.worker.pid() .. ")"
    local threads = {}
    for i = 1, #nodes do
        threads[i] = spawn(scrape, nodes[i], cfg, provider.request(nodes[i].slot), agent)
    end
    for i = 1, #nodes do
        local ok, body, err = wait(threads[i])
        if not ok then
            body, err = nil, body
        end
        local n = nodes[i]
        local fresh, failing, why = bal:queue_report(n.slot, body)
        if fresh == nil then
            ngx.log(ngx.ERR, "rsbalancer: queue report of pool ", pool, " node ", n.id, ": ", failing)
        else
            note(pool, n, failing, err or why)
            note(pool, n, fresh)
        end
    end
end

--- start(bal): in init_worker. One timer per pool with a scrape section, every
-- scrape_ms (jittered by up to 10%), run by the health-check lease holder.
function _M.start(bal)
    return health.leased_timers(bal, "scrape", "scrape_ms", "queue scrape", scrape_pool)
end

return _M
