-- Per-request cost in LuaJIT (JIT on), one process, one run:
--
--   ffi   the wrapper's pick + report (lua/resty/rsbalancer.lua -> LuaJIT FFI)
--   mlua  the mlua object's bal:pick + bal:report (Lua C functions)
--   seed  the seed's pure-Lua weighted random (shared/seed: a table of
--         {name, weight, current}; select_node sums the weights, draws
--         math.random() * total, walks the list, increments node.current). The seed
--         has no report side at all, so its column is its pick alone.
--
-- For each algorithm and 3 / 100 / 1,000 nodes: warm up, then the median of 5 runs of
-- N pick+report pairs (N sized so that one run takes ~150 ms: up to 2M pairs for the
-- cheap cases, fewer for the O(n) ones), timed with clock_gettime: the process's
-- CPU time (os.clock's clock, ns resolution; RSB_BENCH_CLOCK=monotonic for wall time).
-- Every report is a 200 with 50 ms latency. chash gets a key from a set of 1,024.
-- Prints a table; asserts nothing about timing.
--
--   scripts/bench-lua.sh        (or: luajit benches/lua/bench.lua from the repo root)
--   RSB_BENCH_QUICK=1           ~10x fewer iterations, for a smoke run

-- Run by hand from the repo root: find the wrapper and the built library there.
-- (scripts/bench-lua.sh sets LUA_PATH / LUA_CPATH itself.)
if not os.getenv("LUA_PATH") then package.path = "lua/?.lua;benches/lua/?.lua;" .. package.path end
if not os.getenv("LUA_CPATH") then package.cpath = "build/lib/?.so;" .. package.cpath end

local jit = require "jit"
local rsb = require "resty.rsbalancer"
local band = require("bit").band

local ALGORITHMS = { "weighted_random", "round_robin", "least_conn", "p2c_ewma", "chash" }
local SIZES = { 3, 100, 1000 }
local RUNS = 5
local QUICK = os.getenv("RSB_BENCH_QUICK") ~= nil
local TARGET_S = QUICK and 0.015 or 0.15 -- clock time of one timed run
local MIN_N, MAX_N = QUICK and 2000 or 20000, QUICK and 200000 or 2000000
-- The spec's targets for the FFI pick+report pair (ns), by node count.
local TARGETS = {
    weighted_random = { [3] = 100, [1000] = 150 },
    p2c_ewma = { [3] = 100, [1000] = 150 },
}

local timing = require("timing").new {
    target_s = TARGET_S, min_n = MIN_N, max_n = MAX_N, runs = RUNS,
    clock = os.getenv("RSB_BENCH_CLOCK") or "cpu",
}
local CLOCK_NAME = os.getenv("RSB_BENCH_CLOCK") or "cpu"
local make_seed, measure, measure_fresh = require("timing").make_seed, timing.measure, timing.measure_fresh
local now_ns = timing.now_ns
local weight = require("timing").weight

---------------------------------------------------------------------------------------
-- One balancer with a pool per (algorithm, size).

local function pool_name(algo, n)
    return algo .. "-" .. n
end

local function build_config()
    local pools, total = {}, 0
    for _, algo in ipairs(ALGORITHMS) do
        for _, n in ipairs(SIZES) do
            local nodes = {}
            for i = 1, n do
                nodes[i] = {
                    id = "n" .. i,
                    addr = "127.0.0." .. (1 + math.floor((i - 1) / 60000)) .. ":" .. (1024 + (i - 1) % 60000),
                    weight = weight(i),
                }
            end
            pools[pool_name(algo, n)] = { algorithm = algo, slow_start_ms = 0, nodes = nodes }
            total = total + n
        end
    end
    return {
        shm = { max_nodes = 8192, max_pools = 64, config_bytes = 8 * 1024 * 1024 },
        pools = pools,
    }, total
end

local KEYS = {}
for i = 1, 1024 do KEYS[i] = "session-" .. i end

---------------------------------------------------------------------------------------
-- The loops (one function each, so each gets its own traces).

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

local function mlua_loop(n, bal, idx)
    for _ = 1, n do
        local slot = bal:pick(idx)
        bal:report(slot, 200, 0.050)
    end
end

local function mlua_loop_key(n, bal, idx, keys)
    for i = 1, n do
        local slot = bal:pick(idx, keys[band(i, 1023) + 1])
        bal:report(slot, 200, 0.050)
    end
end

---------------------------------------------------------------------------------------

local function cpu_model()
    local f = io.open("/proc/cpuinfo", "r")
    if not f then return "?" end
    for line in f:lines() do
        local m = line:match("^model name%s*:%s*(.+)$")
        if m then f:close() return m end
    end
    f:close()
    return "?"
end

local function main()
    if not jit.status() then
        io.stderr:write("bench: the JIT is off; run without -joff\n")
    end
    math.randomseed(os.time())
    local cfg, total = build_config()
    io.write(string.format("rsbalancer Lua benchmark: %s (%s), JIT %s, %s\n",
        jit.version, jit.arch, jit.status() and "on" or "OFF", cpu_model()))
    io.write("library: ", rsb.library_path, "  version ", tostring(rsb.version), "\n")
    io.write(string.format("%d pools, %d nodes; median of %d runs; ns per pick+report pair; clock: %s%s\n\n",
        #ALGORITHMS * #SIZES, total, RUNS,
        CLOCK_NAME == "cpu" and "process CPU time" or "CLOCK_MONOTONIC",
        QUICK and " (QUICK: short runs)" or ""))

    local t = now_ns()
    rsb.init(cfg, "bench")
    io.write(string.format("init: %.1f ms\n", (now_ns() - t) / 1e6))
    -- As an nginx worker does in init_worker_by_lua: claim a worker slot, so this
    -- process's statistics go to its own tally row (plain stores, see src/tally.rs).
    assert(rsb.init_worker())
    local bal = rsb.balancer()

    -- The seed does not depend on the algorithm: measure it once per size.
    local seed = {}
    for _, n in ipairs(SIZES) do
        seed[n] = { measure_fresh(function() return make_seed(n) end) }
    end

    local rows = {}
    for _, algo in ipairs(ALGORITHMS) do
        for _, n in ipairs(SIZES) do
            local pool = pool_name(algo, n)
            local idx = assert(bal:pool_index(pool))
            local f, fn_n, m, mn
            if algo == "chash" then
                f, fn_n = measure(ffi_loop_key, pool, KEYS)
                m, mn = measure(mlua_loop_key, bal, idx, KEYS)
            else
                f, fn_n = measure(ffi_loop, pool)
                m, mn = measure(mlua_loop, bal, idx)
            end
            local st = assert(bal:stats(pool))
            local inflight = 0
            for _, s in pairs(st) do inflight = inflight + s.inflight end
            assert(inflight == 0, pool .. ": in-flight count did not return to 0")
            rows[#rows + 1] = { algo = algo, nodes = n, ffi = f, mlua = m, seed = seed[n][1],
                                iters = fn_n, miters = mn }
            io.stderr:write(string.format("  measured %-18s %5d nodes\n", algo, n))
        end
    end

    io.write("\n")
    local hdr = string.format("%-16s %6s %9s %9s %9s %11s   %s", "algorithm", "nodes",
        "ffi ns", "mlua ns", "seed ns", "seed/ffi", "spec target (ffi)")
    io.write(hdr, "\n", string.rep("-", #hdr + 6), "\n")
    for _, r in ipairs(rows) do
        local target = ""
        local tg = TARGETS[r.algo] and TARGETS[r.algo][r.nodes]
        if tg then
            target = string.format("<= %d ns: %s", tg, r.ffi <= tg and "met" or "MISSED")
        end
        io.write(string.format("%-16s %6d %9.1f %9.1f %9.1f %10.2fx   %s\n",
            r.algo, r.nodes, r.ffi, r.mlua, r.seed, r.seed / r.ffi, target))
    end
    io.write("\n")
    io.write("seed ns: the seed's pure-Lua weighted random, pick only (it has no report);\n")
    io.write("         the same figure for every algorithm at a given node count.\n")
    io.write("ffi / mlua ns: pick + report (status 200, 50 ms). Iterations per run: ffi ")
    local lo, hi = math.huge, 0
    for _, r in ipairs(rows) do lo = math.min(lo, r.iters); hi = math.max(hi, r.iters) end
    io.write(string.format("%d..%d", lo, hi))
    lo, hi = math.huge, 0
    for _, r in ipairs(rows) do lo = math.min(lo, r.miters); hi = math.max(hi, r.miters) end
    io.write(string.format(", mlua %d..%d", lo, hi))
    io.write(string.format(", seed %d/%d/%d.\n", seed[3][2], seed[100][2], seed[1000][2]))
    io.write(string.format("seed spread (min..max of %d fresh copies): 3: %.1f..%.1f  100: %.1f..%.1f  1000: %.1f..%.1f\n",
        RUNS, seed[3][3], seed[3][4], seed[100][3], seed[100][4], seed[1000][3], seed[1000][4]))
end

main()
os.exit(0)
