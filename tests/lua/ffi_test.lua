-- The per-request path: lua/resty/rsbalancer.lua's pick / report / report_tries,
-- which call librsbalancer through LuaJIT's FFI.

local T = require "harness"
local F = require "fixtures"
local rsb = require "resty.rsbalancer"

local test, eq, ok, near, contains, raises, starts =
    T.test, T.eq, T.ok, T.near, T.contains, T.raises, T.starts

-- Chi-square critical value, 2 degrees of freedom, p = 1e-5 (= 2 ln 1e5): a correct
-- sampler fails this once in 100,000 runs.
local CHI2_DF2 = 23.03

local JSON = [[
{
  "pools": {
    "llm": {
      "algorithm": "round_robin",
      "slow_start_ms": 0,
      "nodes": [
        { "id": "a", "addr": "127.0.0.1:8001", "weight": 1 },
        { "id": "b", "addr": "127.0.0.1:8002", "weight": 1 }
      ]
    }
  }
}
]]

local function ids_of(pool)
    local ids = {}
    for _, n in ipairs(assert(rsb.nodes(pool))) do
        ids[#ids + 1] = n.id
    end
    table.sort(ids)
    return table.concat(ids, ",")
end

local function write_tmp(text)
    local path = os.tmpname()
    local f = assert(io.open(path, "w"))
    f:write(text)
    f:close()
    return path
end

-- Init a fresh balancer for `cfg`; returns slot-by-id and id-by-slot maps.
local function fresh(cfg)
    eq(rsb.init(cfg, F.name("ffi")), true, "init")
    return F.slots(rsb.balancer())
end

---------------------------------------------------------------------------------------
-- init

test("init from a Lua table", function()
    local by_id = fresh(F.config("weighted_random", { 3, 2 }, { 1 }))
    eq(ids_of("llm"), "a,b,z1")
    local slot = assert(rsb.pick("llm"))
    local ip, port, id, pool, host = rsb.peer(slot)
    eq(ip, "127.0.0.1")
    eq(pool, "llm")
    eq(host, "127.0.0.1")
    eq(port, id == "a" and 8001 or 8002, "port of " .. tostring(id))
    eq(by_id[id], slot)
    eq(rsb.report(slot, 200, 0.05), true)
end)

test("init from a JSON string", function()
    eq(rsb.init(JSON, F.name("json")), true)
    eq(ids_of("llm"), "a,b")
    local seen = {}
    for _ = 1, 4 do
        local s = assert(rsb.pick("llm"))
        seen[select(3, rsb.peer(s))] = true
        assert(rsb.report(s, 200, 0.01))
    end
    ok(seen.a and seen.b, "round robin visits both nodes")
end)

test("init from a JSON file path", function()
    local path = write_tmp(JSON)
    local okay, err = pcall(rsb.init, path, F.name("file"))
    os.remove(path)
    ok(okay, err)
    eq(ids_of("llm"), "a,b")
    local s = assert(rsb.pick("llm"))
    eq(rsb.report(s, 200, 0.01), true)
end)

test("init with a bad config raises naming the field (table, JSON, file)", function()
    local cfg = F.config("weighted_random", { 0, 5 })
    local err = raises(rsb.init, cfg, F.name("bad"))
    contains(err, "pools.llm.nodes[0].weight")
    contains(err, "0 is out of range 1..=10000")

    err = raises(rsb.init, (JSON:gsub('"weight": 1 }', '"wieght": 1 }', 1)), F.name("bad"))
    contains(err, "pools.llm.nodes[0]")
    contains(err, "unknown field `wieght`")

    local path = write_tmp((JSON:gsub('"weight": 1 }', '"weight": 10001 }', 1)))
    err = raises(rsb.init, path, F.name("bad"))
    os.remove(path)
    contains(err, "pools.llm.nodes[0].weight: 10001 is out of range 1..=10000")

    err = raises(rsb.init, "/nonexistent/rsbalancer.json", F.name("bad"))
    contains(err, "/nonexistent/rsbalancer.json")
    contains(err, "cannot read")
end)

test("a failed init keeps the running balancer", function()
    fresh(F.config("round_robin", { 1, 1 }))
    raises(rsb.init, F.config("round_robin", { 1, 0 }), F.name("bad"))
    local s = assert(rsb.pick("llm"))
    eq(rsb.report(s, 200, 0.01), true)
end)

---------------------------------------------------------------------------------------
-- pick

test("weighted_random: 100k FFI picks follow weights 30/50/20, backup never used", function()
    local _, by_slot = fresh(F.config("weighted_random", { 30, 50, 20 }, { 100 }))
    local pick, report = rsb.pick, rsb.report
    local counts = { a = 0, b = 0, c = 0, z1 = 0 }
    local N = 100000
    for _ = 1, N do
        local s = pick("llm")
        local id = by_slot[s]
        counts[id] = counts[id] + 1
        report(s, 200, 0.010)
    end
    eq(counts.z1, 0, "picks of the backup")
    local want = { a = 0.30, b = 0.50, c = 0.20 }
    local x2 = F.chi_square(counts, want, N)
    local detail = string.format("a=%d b=%d c=%d chi2=%.2f", counts.a, counts.b, counts.c, x2)
    for id, p in pairs(want) do
        near(counts[id] / N, p, 0.02, "share of " .. id .. " (" .. detail .. ")")
    end
    ok(x2 < CHI2_DF2, "chi-square " .. detail .. " >= " .. CHI2_DF2)
    local st = assert(rsb.stats("llm"))
    eq(st.a.requests + st.b.requests + st.c.requests, N, "requests")
    eq(st.a.inflight + st.b.inflight + st.c.inflight, 0, "inflight")
end)

test("tried slots are never picked again", function()
    local by_id, by_slot = fresh(F.config("weighted_random", { 30, 50, 20 }, { 1 }))
    local two = { by_id.a, by_id.b }
    for _ = 1, 2000 do
        local s = assert(rsb.pick("llm", nil, two))
        eq(by_slot[s], "c")
        rsb.report(s, 200, 0.01)
    end
    local one = { by_id.b }
    local seen = {}
    for _ = 1, 2000 do
        local s = assert(rsb.pick("llm", nil, one))
        ok(by_slot[s] ~= "b", "picked the tried node b")
        seen[by_slot[s]] = true
        rsb.report(s, 200, 0.01)
    end
    ok(seen.a and seen.c, "both untried primaries picked")
end)

test("tried exclusion works for every algorithm", function()
    for _, algo in ipairs({ "weighted_random", "round_robin", "least_conn", "p2c_ewma", "chash" }) do
        local by_id, by_slot = fresh(F.config(algo, { 1, 1, 1 }))
        for i = 1, 300 do
            local s = assert(rsb.pick("llm", "key-" .. i, { by_id.a, by_id.c }))
            eq(by_slot[s], "b", algo)
            rsb.report(s, 200, 0.01)
        end
    end
end)

test("backup is used when every primary was tried; nil, err when all were", function()
    local by_id, by_slot = fresh(F.config("p2c_ewma", { 30, 50, 20 }, { 1 }))
    local tried = { by_id.a, by_id.b, by_id.c }
    for _ = 1, 100 do
        local s = assert(rsb.pick("llm", nil, tried))
        eq(by_slot[s], "z1")
        rsb.report(s, 200, 0.01)
    end
    tried[#tried + 1] = by_id.z1
    local s, err, no_node = rsb.pick("llm", nil, tried)
    eq(s, nil)
    eq(type(err), "string")
    ok(#err > 0, "error message")
    eq(no_node, true, "third return flags RSB_NO_NODE")
end)

test("unknown pool: nil, err", function()
    fresh(F.config("weighted_random", { 1 }))
    local s, err = rsb.pick("nope")
    eq(s, nil)
    eq(err, 'unknown pool "nope"')
end)

test("chash: the same key goes to the same node", function()
    local _, by_slot = fresh(F.config("chash", { 1, 1, 1, 1 }))
    local spread = {}
    for i = 1, 50 do
        local key = "user-" .. i
        local first = assert(rsb.pick("llm", key))
        rsb.report(first, 200, 0.01)
        for _ = 1, 5 do
            local s = assert(rsb.pick("llm", key))
            eq(s, first, key)
            rsb.report(s, 200, 0.01)
        end
        spread[by_slot[first]] = true
    end
    local n = 0
    for _ in pairs(spread) do n = n + 1 end
    ok(n >= 2, "50 keys land on more than one node")
end)

---------------------------------------------------------------------------------------
-- report, report_tries

test("report updates counters; 5xx and 0 count as failures", function()
    local by_id = fresh(F.config("round_robin", { 1 }))
    local a = by_id.a
    for _, status in ipairs({ 200, 502, 0, 404, 429 }) do
        eq(assert(rsb.pick("llm")), a)
        eq(rsb.report(a, status, 0.002), true)
    end
    local st = assert(rsb.stats("llm")).a
    eq(st.requests, 5)
    eq(st.failures, 2)
    eq(st.busy, 1)
    eq(st.inflight, 0)
    eq(st.picks, 5)
end)

test("report of an unknown slot: nil, err", function()
    fresh(F.config("round_robin", { 1 }))
    local r, err = rsb.report(100000, 200, 0.1)
    eq(r, nil)
    contains(err, "100000")
end)

test("report_tries reports both tries of \"502, 200\"", function()
    local by_id, by_slot = fresh(F.config("weighted_random", { 1, 1, 1 }))
    local first = assert(rsb.pick("llm"))
    local second = assert(rsb.pick("llm", nil, { first }))
    ok(first ~= second, "two different nodes")
    local st = assert(rsb.stats("llm"))
    eq(st[by_slot[first]].inflight, 1)
    eq(st[by_slot[second]].inflight, 1)

    rsb.report_tries({ first, second }, "502, 200", "0.001, 0.120")

    st = assert(rsb.stats("llm"))
    local s1, s2 = st[by_slot[first]], st[by_slot[second]]
    eq(s1.requests, 1, "first try requests")
    eq(s1.failures, 1, "first try failures")
    eq(s1.inflight, 0, "first try inflight")
    eq(s2.requests, 1, "second try requests")
    eq(s2.failures, 0, "second try failures")
    eq(s2.inflight, 0, "second try inflight")
    near(s2.latency_sum_us, 120000, 1, "second try latency")
    local third = by_id.a ~= first and by_id.a ~= second and "a"
        or by_id.b ~= first and by_id.b ~= second and "b" or "c"
    eq(st[third].requests, 0, "untouched node")
end)

test("report_tries: \" : \" groups, missing entries, nil vars, first", function()
    local by_id = fresh(F.config("round_robin", { 1, 1, 1 }))
    local a, b, c = by_id.a, by_id.b, by_id.c
    -- raise in-flight counts as picks would, so that every report has its pick
    local function take(...)
        for _, slot in ipairs({ ... }) do
            local others = {}
            for _, o in ipairs({ a, b, c }) do
                if o ~= slot then others[#others + 1] = o end
            end
            eq(assert(rsb.pick("llm", nil, others)), slot, "pick")
        end
    end
    local function stats() return assert(rsb.stats("llm")) end

    take(a, b, c)
    rsb.report_tries({ a, b, c }, "502, 504 : 200", "0.010, 0.020 : 0.030")
    local st = stats()
    eq(st.a.failures, 1); eq(st.b.failures, 1); eq(st.c.failures, 0)
    near(st.c.latency_sum_us, 30000, 1)

    -- fewer statuses than tries: the rest are released as cancelled (499), which
    -- says nothing about the node
    take(a, b)
    rsb.report_tries({ a, b }, "200", "0.005")
    st = stats()
    eq(st.a.failures, 1, "a served")
    eq(st.b.failures, 1, "b had no entry: released, not a failure")
    eq(st.b.requests, 2, "b had no entry: still reported once")

    -- no upstream variables at all
    take(c)
    rsb.report_tries({ c }, nil, nil)
    st = stats()
    eq(st.c.failures, 0)
    eq(st.c.requests, 2)

    -- "-" for a try that got no response time
    take(a)
    rsb.report_tries({ a }, "504", "-")
    eq(stats().a.failures, 2)

    -- `first`: tries before it were reported already (by balance() on a retry)
    take(b, c)
    eq(rsb.report(b, 502, 0.01), true)
    rsb.report_tries({ b, c }, "502, 200", "0.010, 0.040", 2)
    st = stats()
    eq(st.b.failures, 2, "b reported once, by report()")
    near(st.c.latency_sum_us, 70000, 1, "c reported by report_tries")

    for _, id in ipairs({ "a", "b", "c" }) do
        eq(st[id].inflight, 0, "inflight of " .. id)
        eq(st[id].requests, st[id].picks, "requests == picks for " .. id)
    end
end)

test("_next_item edge cases", function()
    local next_item = rsb._next_item
    local function all(s)
        local out, i, v = {}, 1, nil
        for _ = 1, 20 do
            v, i = next_item(s, i)
            if i == nil then break end
            out[#out + 1] = v == nil and "nil" or tostring(v)
        end
        eq(i, nil, "the list ends in " .. string.format("%q", s))
        return table.concat(out, "|")
    end
    eq(all("502, 200"), "502|200")
    eq(all("0.012, 0.004 : 0.100"), "0.012|0.004|0.1")
    eq(all("502 : 200"), "502|200")
    eq(all("-, 200"), "nil|200")
    eq(all("-"), "nil")
    eq(all("- : -"), "nil|nil")
    eq(all("200  "), "200")
    eq(all("200, 502   "), "200|502")
    eq(all("  200"), "200")
    eq(all(""), "")
    eq(all("   "), "")
    eq(all(", , "), "")
    eq(all("abc, 200"), "nil|200")

    local v, i = next_item("", 1)
    eq(v, nil); eq(i, nil)
    v, i = next_item("502, 200", 1)
    eq(v, 502); eq(i, 4)
    v, i = next_item("502, 200", 4)
    eq(v, 200); eq(i, 9)
    v, i = next_item("502, 200", 9)
    eq(v, nil); eq(i, nil)
    v, i = next_item("-, 200", 1)
    eq(v, nil); eq(i, 2)
end)

---------------------------------------------------------------------------------------
-- misuse raises "bad argument #n to 'fn' (...)"

test("bad arguments raise \"bad argument #\"", function()
    fresh(F.config("round_robin", { 1 }))
    starts(raises(rsb.pick, 123), "bad argument #1 to 'pick'")
    starts(raises(rsb.pick, nil), "bad argument #1 to 'pick'")
    starts(raises(rsb.report, "x", 200, 0.1), "bad argument #1 to 'report'")
    starts(raises(rsb.report, 0, "200", 0.1), "bad argument #2 to 'report'")
    starts(raises(rsb.report, 0, 200, nil), "bad argument #3 to 'report'")
    starts(raises(rsb.set_weight, "p", "a", 0), "bad argument #3 to 'set_weight'")
    starts(raises(rsb.set_weight, "llm", "a", 1.5), "bad argument #3 to 'set_weight'")
    starts(raises(rsb.set_weight, "llm", "a", 10001), "bad argument #3 to 'set_weight'")
    starts(raises(rsb.set_weight, 1, "a", 5), "bad argument #1 to 'set_weight'")
    starts(raises(rsb.set_weight, "llm", 1, 5), "bad argument #2 to 'set_weight'")
    starts(raises(rsb.init, 42, F.name("bad")), "bad argument #1 to 'init'")
    starts(raises(rsb.init, JSON, 42), "bad argument #2 to 'init'")
end)

test("bad-argument errors blame the caller's line", function()
    local line = debug.getinfo(1, "l").currentline + 1
    local function caller() local s = rsb.pick(123); return s end -- not a tail call
    local err = raises(caller)
    contains(err, "ffi_test.lua:" .. line .. ": bad argument #1 to 'pick'")
end)

test("set_weight through the wrapper changes the shared weight", function()
    fresh(F.config("weighted_random", { 1, 1 }))
    eq(rsb.set_weight("llm", "a", 7), true)
    eq(assert(rsb.stats("llm")).a.weight, 7)
    local r, err = rsb.set_weight("llm", "nope", 7)
    eq(r, nil)
    contains(err, "nope")
end)

T.done()
