-- Pick + report measured inside an nginx worker (scripts/bench-nginx-pick.sh starts
-- nginx with benches/nginx/pick-bench.conf: 1 worker, JIT on). The content handler
-- loops the public Lua API's pick + report N times per timed run (200, 50 ms) and
-- prints ns per pair, median of 5 runs of process CPU time, for every algorithm at
-- 3 / 100 / 1,000 / 10,000 nodes; in the same run, two baselines: the seed's
-- pure-Lua weighted random (pick only: it has no report and no shared state) and a
-- loop of two no-op Lua calls (the floor of any Lua loop of pick + report).
-- Asserts nothing about timing.
local rsb = require "resty.rsbalancer"
local band = require("bit").band
local T = require "timing"

local _M = {}

_M.ALGORITHMS = { "weighted_random", "p2c_ewma", "round_robin", "least_conn", "chash" }
_M.SIZES = { 3, 100, 1000, 10000 }

local function pool_name(algo, n)
    return algo .. "-" .. n
end

-- One pool per (algorithm, size), as JSON text (a Lua table of 55,000 nodes is more
-- than mlua's conversion takes); node addresses are never contacted.
function _M.config()
    local pools, total = {}, 0
    for _, algo in ipairs(_M.ALGORITHMS) do
        for _, n in ipairs(_M.SIZES) do
            local nodes = {}
            for i = 1, n do
                nodes[i] = string.format('{"id":"n%d","addr":"127.0.%d.%d:8000","weight":%d}',
                    i, math.floor((i - 1) / 250), 1 + (i - 1) % 250, T.weight(i))
            end
            pools[#pools + 1] = string.format('"%s":{"algorithm":"%s","slow_start_ms":0,"nodes":[%s]}',
                pool_name(algo, n), algo, table.concat(nodes, ","))
            total = total + n
        end
    end
    return '{"shm":{"max_nodes":65536,"max_pools":64,"config_bytes":33554432},"pools":{'
        .. table.concat(pools, ",") .. "}}", total
end

local KEYS = {}
for i = 1, 1024 do KEYS[i] = "session-" .. i end

local pick, report = rsb.pick, rsb.report

local function ffi_loop(n, pool)
    for _ = 1, n do
        local slot = pick(pool)
        report(slot, 200, 0.050)
    end
end

local function ffi_loop_key(n, pool, keys)
    for i = 1, n do
        local slot = pick(pool, keys[band(i, 1023) + 1])
        report(slot, 200, 0.050)
    end
end

-- Two calls that do nothing, as the loop above makes two.
local function nop_pick() return 1 end
local function nop_report() end
local function noop_loop(n)
    for _ = 1, n do
        local slot = nop_pick()
        nop_report(slot, 200, 0.050)
    end
end

-- The whole table, as text (one request runs it all: a few minutes).
function _M.run(quick)
    local timing = T.new {
        target_s = quick and 0.015 or 0.1, min_n = quick and 2000 or 20000,
        max_n = quick and 200000 or 2000000, runs = 5, clock = "cpu",
    }
    local out = {}
    local function say(fmt, ...) out[#out + 1] = string.format(fmt, ...) end
    say("pick + report inside an nginx worker (%s, JIT %s), ns per pair, median of 5 runs (process CPU time)%s",
        jit.version, jit.status() and "on" or "OFF", quick and ", QUICK" or "")
    local hdr = string.format("%-18s", "contender")
    for _, n in ipairs(_M.SIZES) do hdr = hdr .. string.format(" %9d", n) end
    say("%s", hdr)
    local row = function(name, f)
        local line = string.format("%-18s", name)
        for _, n in ipairs(_M.SIZES) do
            line = line .. string.format(" %9.1f", f(n))
        end
        say("%s", line)
    end
    row("no-op (2 calls)", function() return (timing.measure(noop_loop)) end)
    row("seed pure-Lua", function(n)
        return (timing.measure_fresh(function() return T.make_seed(n) end))
    end)
    for _, algo in ipairs(_M.ALGORITHMS) do
        row(algo, function(n)
            local pool = pool_name(algo, n)
            if algo == "chash" then
                return (timing.measure(ffi_loop_key, pool, KEYS))
            end
            return (timing.measure(ffi_loop, pool))
        end)
    end
    return table.concat(out, "\n") .. "\n"
end

return _M
