-- Timing helpers shared by the Lua benchmarks (benches/lua/bench.lua, run by
-- luajit; benches/nginx/pick_bench.lua, run inside an nginx worker): a ns clock,
-- warm-up and run sizing, medians, and the seed's pure-Lua weighted random.
--
--   local timing = require("timing").new{ target_s = 0.15, min_n = 20000,
--                                         max_n = 2000000, runs = 5, clock = "cpu" }
--   local med, iters, lo, hi = timing.measure(fn, ...)   -- fn(iterations, ...)
--   local med, iters, lo, hi = timing.measure_fresh(function() return timing.make_seed(n) end)
local ffi = require "ffi"

local _M = {}

pcall(ffi.cdef, [[
typedef struct { long tv_sec; long tv_nsec; } rsb_bench_timespec;
int clock_gettime(int clk_id, rsb_bench_timespec *tp);
]])

-- CLOCK_PROCESS_CPUTIME_ID (what os.clock measures; on a busy machine it counts only
-- the time this process ran), or CLOCK_MONOTONIC.
local CLOCKS = { cpu = 2, monotonic = 1 }

-- Node i's weight in every benchmark pool: 30 / 50 / 20, repeated.
function _M.weight(i)
    return ({ 30, 50, 20 })[(i - 1) % 3 + 1]
end

-- The seed, as written there (ipairs walks, node.current counts picks). It is compiled
-- afresh (loadstring) for each use: LuaJIT keeps traces per function prototype, so a
-- shared prototype would run the 1,000-node case on traces recorded at 3 nodes, and
-- even one size's trace shape varies from process to process (it decides whether
-- the short walk loop gets a trace of its own). Each timed run gets a fresh copy and
-- the median is taken over them.
local SEED_SRC = [[
local upstreams, random = ...
local function select_node()
    local total_weight = 0
    for _, node in ipairs(upstreams) do
        total_weight = total_weight + node.weight
    end
    local rand = random() * total_weight
    local weight_sum = 0
    for _, node in ipairs(upstreams) do
        weight_sum = weight_sum + node.weight
        if rand <= weight_sum then
            node.current = node.current + 1
            return node.name
        end
    end
end
local function loop(n)
    for _ = 1, n do
        select_node()
    end
end
return loop
]]

-- A fresh seed over n nodes: returns its timing loop, loop(iterations).
function _M.make_seed(n)
    local upstreams = {}
    for i = 1, n do
        upstreams[i] = { name = "node" .. i, weight = _M.weight(i), current = 0 }
    end
    return assert(loadstring(SEED_SRC, "=seed"))(upstreams, math.random)
end

local function median(samples)
    table.sort(samples)
    return samples[math.floor((#samples + 1) / 2)], samples[1], samples[#samples]
end

-- A timer with its own run sizes: target_s (clock time of one timed run), min_n /
-- max_n (iterations per run), runs (timed runs; the median is reported), clock.
function _M.new(opts)
    local T = {}
    local clock_id = CLOCKS[opts.clock or "cpu"] or error("clock must be cpu or monotonic")
    local ts = ffi.new("rsb_bench_timespec")
    local function now_ns()
        ffi.C.clock_gettime(clock_id, ts)
        return tonumber(ts.tv_sec) * 1e9 + tonumber(ts.tv_nsec)
    end
    T.now_ns = now_ns

    -- Warm fn up (JIT) and size a run to ~target_s.
    local function calibrate(fn, ...)
        local n = opts.min_n / 4
        local t0 = now_ns()
        fn(n, ...)
        local per = (now_ns() - t0) / n
        t0 = now_ns()
        fn(n, ...)
        per = math.min(per, (now_ns() - t0) / n)
        n = math.floor(opts.target_s * 1e9 / math.max(per, 1))
        return math.max(opts.min_n, math.min(opts.max_n, n))
    end

    -- ns per iteration of fn(n, ...): median of `runs` runs, after warm-up.
    -- Returns median, iterations per run, min, max.
    function T.measure(fn, ...)
        local n = calibrate(fn, ...)
        local samples = {}
        for r = 1, opts.runs do
            collectgarbage("collect")
            local t = now_ns()
            fn(n, ...)
            samples[r] = (now_ns() - t) / n
        end
        local med, lo, hi = median(samples)
        return med, n, lo, hi
    end

    -- Same, with a fresh function from make() for each run (each warmed up alone).
    function T.measure_fresh(make)
        local samples, n = {}, nil
        for r = 1, opts.runs do
            local fn = make()
            local want = calibrate(fn)
            n = n or want
            collectgarbage("collect")
            local t = now_ns()
            fn(n)
            samples[r] = (now_ns() - t) / n
        end
        local med, lo, hi = median(samples)
        return med, n, lo, hi
    end

    return T
end

return _M
