-- resty.rsbalancer.metrics() (the mlua `metrics` method): Prometheus text of the
-- shared counters, through the wrapper.

local T = require "harness"
local F = require "fixtures"
local rsb = require "resty.rsbalancer"

local test, eq, ok = T.test, T.eq, T.ok

-- The value of the one sample line starting with `prefix` (name and labels).
local function value(text, prefix)
    local found
    for line in text:gmatch("[^\n]+") do
        if line:sub(1, #prefix) == prefix then
            ok(not found, "one sample " .. prefix)
            found = tonumber(line:match(" (%S+)$"))
        end
    end
    ok(found, "sample " .. prefix)
    return found
end

test("metrics() renders the counters of picks and reports", function()
    eq(rsb.init(F.config("weighted_random", { 1, 1 }), F.name("metrics")), true, "init")
    local tried = {}
    for i = 1, 10 do
        local s = assert(rsb.pick("llm"))
        tried[#tried + 1] = s
        assert(rsb.report(s, i <= 3 and 429 or 200, 0.020))
    end
    assert(rsb.pick("llm", nil, { tried[1] })) -- a retry, still in flight
    local text = assert(rsb.metrics())
    ok(text:find("# TYPE rsbalancer_node_requests_total counter\n", 1, true), "TYPE line")
    eq(value(text, 'rsbalancer_pool_requests_total{pool="llm",arm="primary"}'), 10)
    eq(value(text, 'rsbalancer_pool_retries_total{pool="llm",arm="primary"}'), 1)
    local ok2xx = value(text, 'rsbalancer_node_requests_total{pool="llm",node="a",arm="primary",class="2xx"}')
        + value(text, 'rsbalancer_node_requests_total{pool="llm",node="b",arm="primary",class="2xx"}')
    eq(ok2xx, 7, "2xx tries")
    local busy = value(text, 'rsbalancer_node_429_total{pool="llm",node="a",arm="primary"}')
        + value(text, 'rsbalancer_node_429_total{pool="llm",node="b",arm="primary"}')
    eq(busy, 3, "429s")
    local inflight = value(text, 'rsbalancer_node_inflight{pool="llm",node="a",arm="primary"}')
        + value(text, 'rsbalancer_node_inflight{pool="llm",node="b",arm="primary"}')
    eq(inflight, 1, "the retry in flight")
end)

T.done()
