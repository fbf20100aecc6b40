-- The control-plane path: the mlua object behind require("resty.rsbalancer").balancer()
-- (methods of the `rsbalancer` Lua C module), including its own pick / report.

local T = require "harness"
local F = require "fixtures"
local rsb = require "resty.rsbalancer"
local native = require "rsbalancer"

local test, eq, ok, near, contains, raises =
    T.test, T.eq, T.ok, T.near, T.contains, T.raises

local CHI2_DF2 = 23.03 -- chi-square, 2 degrees of freedom, p = 1e-5

-- init a fresh region through the wrapper and return the mlua object.
local function fresh(cfg)
    eq(rsb.init(cfg, F.name("mlua")), true, "init")
    local bal = rsb.balancer()
    eq(type(bal), "userdata", "balancer()")
    return bal
end

local function two_pools()
    local cfg = F.config("weighted_random", { 30, 50, 20 }, { 1 })
    cfg.pools.chat = { algorithm = "least_conn", nodes = F.nodes({ 1, 1 }) }
    return cfg
end

-- n picks of pool `idx` through the mlua object; counts by id.
local function distribution(bal, idx, by_slot, n)
    local counts = {}
    for _ = 1, n do
        local s = assert(bal:pick(idx))
        local id = by_slot[s]
        counts[id] = (counts[id] or 0) + 1
        assert(bal:report(s, 200, 0.010))
    end
    return counts
end

test("the module and the wrapper share one library", function()
    eq(rsb.version, native.version)
    eq(type(native.version), "string")
    contains(rsb.library_path, "rsbalancer.so")
end)

test("pool_names, pool_index, nodes", function()
    local bal = fresh(two_pools())
    local names = assert(bal:pool_names())
    eq(table.concat(names, ","), "chat,llm")
    local li, ci = assert(bal:pool_index("llm")), assert(bal:pool_index("chat"))
    ok(li ~= ci, "distinct pool indexes")
    local nodes = assert(bal:nodes("llm"))
    eq(#nodes, 4)
    local seen = {}
    for i, n in ipairs(nodes) do
        eq(type(n.slot), "number")
        ok(not seen[n.slot], "distinct slots")
        seen[n.slot] = true
        eq(n.ip, "127.0.0.1")
        eq(n.host, "127.0.0.1")
        eq(n.backup, i == 4, "backup flag of " .. n.id)
    end
    eq(nodes[1].id, "a"); eq(nodes[1].port, 8001)
    eq(nodes[4].id, "z1"); eq(nodes[4].port, 9001)
    eq(assert(bal:node_index("llm", "b")), nodes[2].slot)
end)

test("pick / report / stats through the mlua object", function()
    local bal = fresh(two_pools())
    local idx = assert(bal:pool_index("llm"))
    local by_id, by_slot = F.slots(bal)
    local counts = distribution(bal, idx, by_slot, 30000)
    eq(counts.z1, nil, "backup picked")
    local x2 = F.chi_square(counts, { a = 0.3, b = 0.5, c = 0.2 }, 30000)
    ok(x2 < CHI2_DF2, string.format("chi-square %.2f (a=%s b=%s c=%s)", x2,
        tostring(counts.a), tostring(counts.b), tostring(counts.c)))
    local st = assert(bal:stats("llm"))
    for _, id in ipairs({ "a", "b", "c" }) do
        eq(st[id].requests, counts[id], "requests of " .. id)
        eq(st[id].picks, counts[id], "picks of " .. id)
        eq(st[id].inflight, 0, "inflight of " .. id)
        eq(st[id].failures, 0)
        near(st[id].latency_sum_us, counts[id] * 10000, counts[id], "latency_sum_us of " .. id)
        near(st[id].ewma_us, 10000, 1, "ewma_us of " .. id)
    end
    eq(st.z1.backup, true)
    eq(st.a.backup, false)

    -- key and tried arguments
    local s = assert(bal:pick(idx, nil, { by_id.a, by_id.b }))
    eq(by_slot[s], "c")
    assert(bal:report(s, 503, 0.5))
    s = assert(bal:pick(idx, "some-key", { by_id.a, by_id.b, by_id.c }))
    eq(by_slot[s], "z1")
    assert(bal:report(s, 200, 0.5, 2))
    st = assert(bal:stats("llm"))
    eq(st.c.failures, 1)
    eq(st.z1.requests, 1)
end)

test("weights follow set_weight (mlua and FFI picks)", function()
    local bal = fresh(F.config("weighted_random", { 30, 50, 20 }))
    local idx = assert(bal:pool_index("llm"))
    local _, by_slot = F.slots(bal)
    local g0 = bal:generation()
    eq(bal:set_weight("llm", "a", 10), true)
    eq(bal:set_weight("llm", "b", 10), true)
    eq(bal:set_weight("llm", "c", 80), true)
    ok(bal:generation() > g0, "generation moved")
    local st = assert(bal:stats("llm"))
    eq(st.a.weight, 10); eq(st.b.weight, 10); eq(st.c.weight, 80)

    local N = 30000
    local counts = distribution(bal, idx, by_slot, N)
    local want = { a = 0.1, b = 0.1, c = 0.8 }
    local x2 = F.chi_square(counts, want, N)
    ok(x2 < CHI2_DF2, string.format("mlua picks: chi-square %.2f (a=%s b=%s c=%s)", x2,
        tostring(counts.a), tostring(counts.b), tostring(counts.c)))

    -- the FFI path sees the same shared weights
    local ffi_counts = {}
    for _ = 1, N do
        local s = assert(rsb.pick("llm"))
        local id = by_slot[s]
        ffi_counts[id] = (ffi_counts[id] or 0) + 1
        rsb.report(s, 200, 0.010)
    end
    x2 = F.chi_square(ffi_counts, want, N)
    ok(x2 < CHI2_DF2, string.format("FFI picks: chi-square %.2f (a=%s b=%s c=%s)", x2,
        tostring(ffi_counts.a), tostring(ffi_counts.b), tostring(ffi_counts.c)))
end)

test("generation changes with set_weight and configure, not with picks", function()
    local bal = fresh(F.config("round_robin", { 1, 1 }))
    local g0 = bal:generation()
    eq(type(g0), "number")
    local idx = assert(bal:pool_index("llm"))
    for _ = 1, 10 do assert(bal:report(assert(bal:pick(idx)), 200, 0.01)) end
    eq(bal:generation(), g0, "picks and reports")
    assert(bal:set_weight("llm", "a", 3))
    local g1 = bal:generation()
    ok(g1 ~= g0, "set_weight")
    assert(bal:configure(F.config("round_robin", { 1, 1, 1 })))
    local g2 = bal:generation()
    ok(g2 ~= g1, "configure")
    -- a refused configure changes nothing
    local r = bal:configure(F.config("round_robin", { 0 }))
    eq(r, nil)
    eq(bal:generation(), g2, "refused configure")
end)

test("configure keeps a remaining node's slot and counters", function()
    local bal = fresh(F.config("weighted_random", { 1, 1, 1 }))
    local idx = assert(bal:pool_index("llm"))
    local by_id = F.slots(bal)
    for _ = 1, 300 do
        local s = assert(bal:pick(idx))
        assert(bal:report(s, s == by_id.c and 502 or 200, 0.02))
    end
    local before = assert(bal:stats("llm"))
    ok(before.a.requests > 0 and before.c.failures > 0, "traffic reached a and c")

    -- drop b, add d; a and c remain
    local cfg = F.config("weighted_random", { 1, 1, 1, 1 })
    table.remove(cfg.pools.llm.nodes, 2)
    eq(cfg.pools.llm.nodes[3].id, "d")
    eq(bal:configure(cfg), true)

    local after = assert(bal:stats("llm"))
    eq(after.b, nil, "b removed")
    ok(after.d, "d added")
    eq(after.d.requests, 0)
    for _, id in ipairs({ "a", "c" }) do
        for _, k in ipairs({ "requests", "picks", "failures", "latency_sum_us" }) do
            eq(after[id][k], before[id][k], id .. "." .. k)
        end
        near(after[id].ewma_us, before[id].ewma_us, 1e-6 * before[id].ewma_us + 1, id .. ".ewma_us")
    end
    local now = F.slots(bal)
    eq(now.a, by_id.a, "slot of a")
    eq(now.c, by_id.c, "slot of c")

    -- the wrapper's peer table follows the new topology
    local s = assert(rsb.pick("llm", nil, { now.a, now.c }))
    eq(s, now.d)
    local ip, port, id = rsb.peer(s)
    eq(ip, "127.0.0.1"); eq(port, 8004); eq(id, "d")
    rsb.report(s, 200, 0.01)
end)

test("configure from a JSON string", function()
    local bal = fresh(F.config("round_robin", { 1 }))
    local json = '{"pools":{"llm":{"algorithm":"round_robin","nodes":['
        .. '{"id":"a","addr":"127.0.0.1:8001"},{"id":"x","addr":"127.0.0.1:8010"}]}}}'
    eq(bal:configure(json), true)
    local by_id = F.slots(bal)
    ok(by_id.x, "x added")
end)

test("runtime failures return nil, err", function()
    local bal = fresh(F.config("round_robin", { 1, 1 }, { 1 }))
    local function nil_err(want, r, err)
        eq(r, nil, want)
        eq(type(err), "string", want)
        contains(err, want)
    end
    nil_err("unknown pool index 999", bal:pick(999))
    nil_err("unknown node slot 100000", bal:report(100000, 200, 0.1))
    nil_err('unknown node "nope" in pool "llm"', bal:set_weight("llm", "nope", 5))
    nil_err('unknown pool "nope"', bal:set_weight("nope", "a", 5))
    nil_err('unknown pool "nope"', bal:stats("nope"))
    nil_err('unknown pool "nope"', bal:nodes("nope"))
    nil_err('unknown pool "nope"', bal:pool_index("nope"))
    nil_err('unknown node "nope"', bal:node_index("llm", "nope"))
    nil_err("pools.llm.nodes[1].weight", bal:configure(F.config("round_robin", { 1, 0 })))
    nil_err("pools: at least one pool is required", bal:configure('{"pools":{}}'))
    nil_err("shm.max_nodes", bal:configure({ shm = { max_nodes = 10 }, pools = F.config("round_robin", { 1 }).pools }))
    local by_id = F.slots(bal)
    local idx = assert(bal:pool_index("llm"))
    local r, err = bal:pick(idx, nil, { by_id.a, by_id.b, by_id.z1 })
    eq(r, nil)
    eq(type(err), "string")
    local r2, err2 = native.shared(F.name("bad"), F.config("round_robin", { 0 }))
    eq(r2, nil)
    contains(err2, "pools.llm.nodes[0].weight")
end)

test("a bad value anywhere in a config table or JSON text: nil, err naming the field", function()
    local function nil_err(want, r, err)
        eq(r, nil, want)
        eq(type(err), "string", want)
        contains(err, want)
    end
    local function with(path_set)
        local cfg = F.config("round_robin", { 1, 1 })
        path_set(cfg)
        return cfg
    end
    local name = F.name("badtable")
    nil_err("pools.llm.nodes[1].weight: a function is not a config value",
            native.shared(name, with(function(c) c.pools.llm.nodes[2].weight = print end)))
    nil_err("pools.llm.nodes[0].id: a userdata is not a config value",
            native.shared(name, with(function(c) c.pools.llm.nodes[1].id = io.stdout end)))
    nil_err("pools.llm.slow_start_ms: inf is not a finite number",
            native.shared(name, with(function(c) c.pools.llm.slow_start_ms = math.huge end)))
    local r, err = native.shared(name, with(function(c) c.pools.llm.nodes[1].id = "a\255" end))
    nil_err("pools.llm.nodes[0].id: ", r, err)
    contains(err, "is not valid UTF-8")
    nil_err("pools.llm: a key: boolean key",
            native.shared(name, with(function(c) c.pools.llm[true] = 1 end)))
    nil_err("pools.llm.nodes: array items and keys mixed",
            native.shared(name, with(function(c) c.pools.llm.nodes.extra = 1 end)))
    local cyc = with(function() end)
    cyc.pools.llm.ewma = cyc
    nil_err("nested deeper than 32 levels", native.shared(name, cyc))
    -- Whole numbers are integers; 5.5 is not.
    nil_err("pools.llm.nodes[0].weight: invalid type: floating point `5.5`, expected u32",
            native.shared(name, with(function(c) c.pools.llm.nodes[1].weight = 5.5 end)))
    -- JSON text with a byte that is not UTF-8 in a string (was: raised).
    nil_err("pools.llm.nodes[0].id: invalid unicode code point",
            native.shared(name, '{"pools":{"llm":{"nodes":[{"id":"a\255","addr":"127.0.0.1:1"}]}}}'))
    -- The same through init(): raises with the message (nginx refuses the config).
    contains(raises(rsb.init, with(function(c) c.pools.llm.refresh_ms = print end), name),
             "pools.llm.refresh_ms: a function is not a config value")
end)

test("misuse raises bad argument", function()
    local bal = fresh(F.config("round_robin", { 1 }))
    contains(raises(bal.set_weight, bal, "llm", "a", 0), "bad argument #3 to 'set_weight'")
    contains(raises(bal.set_weight, bal, "llm", "a", 10001), "bad argument #3 to 'set_weight'")
    contains(raises(bal.report, bal, 0, 200, -1), "bad argument #3 to 'report'")
    contains(raises(bal.configure, bal, 42), "bad argument #1 to 'configure'")
    contains(raises(bal.pick, bal, "llm"), "bad argument")
    contains(raises(native.new, true), "bad argument #1 to 'new'")
end)

test("rsbalancer.new: a private balancer", function()
    local b = assert(native.new(F.config("round_robin", { 1, 1 })))
    local idx = assert(b:pool_index("llm"))
    local s = assert(b:pick(idx))
    eq(b:report(s, 200, 0.001), true)
    local st = assert(b:stats("llm"))
    eq(st.a.requests + st.b.requests, 1)
    eq(st.a.inflight + st.b.inflight, 0)
end)

test("take_notices: a quota 429 cools its node, announced once", function()
    local b = assert(native.new(F.config("round_robin", { 1, 1 })))
    local lines, dropped = b:take_notices()
    eq(#lines, 0)
    eq(dropped, 0)
    local s = assert(b:pick(assert(b:pool_index("llm"))))
    local id
    for _, n in ipairs(assert(b:nodes("llm"))) do
        if n.slot == s then id = n.id end
    end
    eq(b:report(s, 429, 0.001, 30), true)
    eq(b:report(s, 429, 0.001, 30), true) -- already cooling: no second transition
    lines, dropped = b:take_notices()
    eq(#lines, 1, "one line")
    eq(dropped, 0)
    contains(lines[1], "pool llm node " .. id .. " (")
    contains(lines[1], ": 429 with Retry-After 30.0 s (quota; 1 consecutive 429s)")
    eq(#b:take_notices(), 0, "taken")
end)

test("add_include_usage: a streamed body asks for usage, every other byte kept", function()
    eq(native.add_include_usage('{"stream": true}'), '{"stream": true,"stream_options":{"include_usage":true}}')
    eq(native.add_include_usage('{"stream":true,"stream_options":{"x":1}}'),
       '{"stream":true,"stream_options":{"include_usage":true,"x":1}}')
    eq(native.add_include_usage('{"stream":false}'), false)
    eq(native.add_include_usage('{"stream":true,"stream_options":{"include_usage":false}}'), false)
    local none, err = native.add_include_usage('{"stream":')
    eq(none, nil)
    ok(err)
    raises(function() native.add_include_usage(1) end, "bad argument #1 to 'add_include_usage'")
end)

test("stream readers through the FFI: first content event, answer tail, usage event", function()
    local ffi = require "ffi"
    local C = ffi.load(rsb.library_path)
    local off = ffi.new("uint64_t[2]")
    local chunk = ": keep-alive\n\n\ndata: {\"choices\":[]}\n\n"
    eq(C.rsb_sse_first(chunk, #chunk, off), C.RSB_OK)
    eq(tonumber(off[0]), 15)
    chunk = ": keep-alive\n\n"
    eq(C.rsb_sse_first(chunk, #chunk, off), C.RSB_OK)
    ok(tonumber(off[0]) >= #chunk, "no content")
    local t = ffi.new("rsb_tail[1]")
    local prev, last = 'data: {"choices":[],"usage":{"prompt_tokens":3,"comp', 'letion_tokens":8}}\n\ndata: [DONE]\n\n'
    eq(C.rsb_answer_tail(prev, #prev, last, #last, t), C.RSB_OK)
    eq(t[0].prompt_tokens, 3)
    eq(t[0].completion_tokens, 8)
    eq(bit.band(t[0].flags, C.RSB_SIGNAL_FLAG_USAGE + C.RSB_SIGNAL_FLAG_DONE),
       C.RSB_SIGNAL_FLAG_USAGE + C.RSB_SIGNAL_FLAG_DONE)
    eq(bit.band(t[0].flags, C.RSB_SIGNAL_FLAG_FINISHED), 0)
    chunk = 'data: {"choices":[],"usage":{}}\n\ndata: [DONE]\n\n'
    eq(C.rsb_usage_event(chunk, #chunk, off), C.RSB_OK)
    eq(tonumber(off[0]), 0)
    eq(tonumber(off[1]), #'data: {"choices":[],"usage":{}}\n\n')
end)

T.done()
