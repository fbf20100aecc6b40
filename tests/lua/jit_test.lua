-- The per-request calls must JIT-compile: a hot loop of pick + report, and one of
-- report_tries, are recorded with jit.dump and the traces are checked.
--
-- For each loop (its own function below, so that its lines are known):
--   * a completed trace covers the loop: one that starts on a line of the loop and
--     closes it ("-> loop"), or -- when the loop body contains hotter inner loops
--     (report_tries scans strings byte by byte, and LuaJIT traces inner loops first)
--     -- a completed trace whose recorded bytecode contains the loop's back edge
--     (FORL on the loop's line), i.e. the loop runs inside a network of linked traces;
--   * no trace starting in (or recording) the loop aborted; no trace at all hit NYI
--     or stitched (a stitch means a Lua C function -- e.g. an mlua method -- was
--     called on the hot path); a callee's trace that aborted once must have been
--     compiled on a later attempt from the same place;
--   * run again with the VM-state profiler, >= 90% of samples are in compiled code.
-- On failure the whole dump is printed with the test output.

local T = require "harness"
local F = require "fixtures"
local rsb = require "resty.rsbalancer"
local jit = require "jit"
local dump = require "jit.dump"
local profile = require "jit.profile"

local test, eq, ok = T.test, T.eq, T.ok

local ITERATIONS = 100000
local THIS = "jit_test.lua"

---------------------------------------------------------------------------------------
-- The hot loops. Each is a function of its own: its lines are the loop's lines.

local pick, report, report_tries = rsb.pick, rsb.report, rsb.report_tries

local function loop_pick_report(n)
    for _ = 1, n do
        local slot = pick("llm")
        report(slot, 200, 0.012)
    end
end

-- balance()'s retry path: a key and a tried list.
local function loop_pick_key_tried(n, keys, tried)
    for i = 1, n do
        local slot = pick("llm", keys[i % 64 + 1], tried)
        report(slot, 200, 0.012)
    end
end

-- log(): every try of a request, from $upstream_status / $upstream_response_time.
local function loop_report_tries(n, cases)
    for i = 1, n do
        local c = cases[i % 4 + 1]
        report_tries(c[1], c[2], c[3])
    end
end

-- balance()'s arm choice on a pool with a canary (random key), then the pick.
local function loop_canary_pick(n, choose, idx)
    for _ = 1, n do
        local _, apool = choose("llm", idx)
        local slot = pick(apool)
        report(slot, 200, 0.012)
    end
end

-- balance() keeping a round's retries with one provider: the node's group and the
-- slots of the pool's other providers (resty.rsbalancer.provider), then the pick.
local function loop_provider_pick(n, others, group)
    local x = 0
    for _ = 1, n do
        local slot = pick("llm")
        local o = others(slot)
        x = x + group(slot) + (o and #o or 0)
        report(slot, 200, 0.012)
    end
    return x
end

-- Loops the checker must reject (it is not vacuous): a Lua C function (an mlua
-- method) on the hot path stitches; string.gmatch is not compiled.
local function loop_mlua_call(n, bal)
    for _ = 1, n do
        bal:generation()
    end
end

local function loop_gmatch(n)
    local x = 0
    for _ = 1, n do
        for v in ("502, 200"):gmatch("%d+") do x = x + #v end
    end
    return x
end

---------------------------------------------------------------------------------------
-- jit.dump capture and parsing

local function read_all(path)
    local f = assert(io.open(path, "rb"))
    local s = f:read("*a")
    f:close()
    return s
end

-- Run fn with jit.dump on; returns the log text.
local function capture(fn, ...)
    -- Run pending finalizers now: a __gc (e.g. of an earlier test's mlua balancer)
    -- that runs while a trace is being recorded aborts that trace.
    collectgarbage("collect")
    collectgarbage("collect")
    jit.flush() -- start from no traces, so the log shows everything the loop needs
    local path = os.tmpname()
    dump.on("tbim", path)
    local okay, err = pcall(fn, ...)
    dump.off()
    local text = read_all(path)
    os.remove(path)
    assert(okay, err)
    return text
end

-- Traces of a jit.dump log: { id, start, parent, start_file, start_line, stop,
-- abort, bc = { {op=, file=, line=}, ... } }, in order.
local function parse(text)
    local traces, cur = {}, nil
    for line in text:gmatch("[^\n]*") do
        local id, rest = line:match("^%-%-%-%- TRACE (%d+) start (.*)$")
        if id then
            cur = { id = tonumber(id), start = rest, bc = {} }
            local parent, loc = rest:match("^(%d+/%S+) (.*)$")
            cur.parent = parent
            loc = loc or rest
            cur.start_file, cur.start_line = loc:match("^(.-):(%d+)$")
            cur.start_line = tonumber(cur.start_line)
            traces[#traces + 1] = cur
        else
            local sid, stop = line:match("^%-%-%-%- TRACE (%d+) stop %-> (.*)$")
            if sid and cur and tonumber(sid) == cur.id then
                cur.stop = stop
            else
                local aid, why = line:match("^%-%-%-%- TRACE (%d+) abort (.*)$")
                if aid then
                    if cur and tonumber(aid) == cur.id and not cur.stop then
                        cur.abort = why
                    else
                        traces[#traces + 1] = { id = tonumber(aid), abort = why, bc = {}, start = "?" }
                    end
                elseif cur and not cur.stop and not cur.abort then
                    -- recorded bytecode: "0064  FORL     5 => 0059       (jit_test.lua:40)"
                    local op = line:match("^%d%d%d%d [ .]*(%u+)")
                    if op then
                        local file, ln = line:match("%(([^()%s]+):(%d+)%)%s*$")
                        cur.bc[#cur.bc + 1] = { op = op, file = file, line = tonumber(ln) }
                    end
                end
            end
        end
    end
    return traces
end

local function in_file(file, name)
    return file ~= nil and (file == name or file:sub(-#name - 1) == "/" .. name)
end

local function describe(tr)
    return string.format("TRACE %d start %s -> %s", tr.id, tr.start,
        tr.abort and ("ABORT " .. tr.abort) or tostring(tr.stop))
end

-- Aborts that are how LuaJIT gets short inner loops of a callee compiled (here the
-- byte scans of _next_item and pick's copy of `tried`): the loop got hot on its exit
-- iteration, or was met while recording another root trace. LuaJIT then links the
-- outer trace to the inner loop's trace or absorbs the loop into a function trace;
-- the coverage and profiler checks below tell whether that worked.
local BENIGN = {
    ["leaving loop in root trace"] = true,
    ["inner loop in root trace"] = true,
    ["loop unroll limit reached"] = true,
}

-- Did a trace starting where `bad` started complete later in the log?
local function retried_ok(traces, bad)
    local after = false
    for _, tr in ipairs(traces) do
        if tr == bad then
            after = true
        elseif after and not tr.abort and tr.stop and tr.start == bad.start then
            return true
        end
    end
    return false
end

-- Check one capture; returns a list of problems (empty when fine) and a summary.
local function check(traces, fn, text)
    local info = debug.getinfo(fn, "S")
    local first, last = info.linedefined, info.lastlinedefined
    local function in_loop(file, line)
        return in_file(file, THIS) and line and line >= first and line <= last
    end
    local problems, summary = {}, {}
    local closes_loop, covers_backedge = nil, nil
    for _, tr in ipairs(traces) do
        summary[#summary + 1] = describe(tr)
        -- jit.dump's own code (it runs while the loop is recorded) is not ours.
        if tr.start:find("dump.lua:", 1, true) then goto next_trace end
        local starts_here = in_loop(tr.start_file, tr.start_line)
        local touches = starts_here
        local backedge = false
        for _, b in ipairs(tr.bc) do
            if in_loop(b.file, b.line) then
                touches = true
                if b.op == "FORL" or b.op == "JFORL" or b.op == "LOOP" or b.op == "ITERL" then
                    backedge = true
                end
            end
        end
        if tr.abort then
            if tr.abort:find("NYI", 1, true) then
                problems[#problems + 1] = "NYI: " .. describe(tr)
            elseif starts_here or touches then
                -- LuaJIT gives up a root trace that meets an inner loop not compiled
                -- yet (or unrolls too far) and records the same start again later:
                -- which loop gets hot first follows the bytecode's addresses (the
                -- hot counters are hashed by them), so it varies from run to run.
                -- Fine when the retry from the same start completed, or for a side
                -- trace (start "N/exit"): its exit then runs in the interpreter, which
                -- the share of compiled samples below still has to allow.
                local benign = BENIGN[tr.abort:match(" %-%- (.*)$") or ""]
                local side = tr.start:find("%d+/%d+") ~= nil
                if not (benign and (side or retried_ok(traces, tr))) then
                    problems[#problems + 1] = "aborted in the loop: " .. describe(tr)
                end
            elseif not (BENIGN[tr.abort:match(" %-%- (.*)$") or ""] or retried_ok(traces, tr)) then
                problems[#problems + 1] = "aborted and never compiled: " .. describe(tr)
            end
        end
        if tr.start:find("stitch", 1, true) or (tr.stop and tr.stop:find("stitch", 1, true)) then
            problems[#problems + 1] = "stitched: " .. describe(tr)
        end
        if touches and tr.stop == "interpreter" then
            problems[#problems + 1] = "falls back to the interpreter: " .. describe(tr)
        end
        if not tr.abort and tr.stop then
            if starts_here and tr.stop == "loop" then
                closes_loop = closes_loop or tr
            elseif backedge and not tr.stop:find("interpreter", 1, true) then
                covers_backedge = covers_backedge or tr
            end
        end
        ::next_trace::
    end
    if text:find("NYI", 1, true) then
        problems[#problems + 1] = "the log mentions NYI"
    end
    return problems, summary, closes_loop, covers_backedge, first, last
end

-- Share of VM-state profiler samples in compiled code ("N") while fn(...) runs.
local function compiled_share(fn, ...)
    local counts, total = {}, 0
    profile.start("vi1", function(_, n, vmstate)
        counts[vmstate] = (counts[vmstate] or 0) + n
        total = total + n
    end)
    local t0 = os.clock()
    repeat
        fn(...)
    until total >= 100 or os.clock() - t0 > 5
    profile.stop()
    local parts = {}
    for k, v in pairs(counts) do parts[#parts + 1] = k .. "=" .. v end
    table.sort(parts)
    return total > 0 and (counts.N or 0) / total or 0, table.concat(parts, " ")
end

-- The whole check for one loop; `strict`: the loop must have its own "-> loop" trace.
local function assert_compiles(label, strict, fn, ...)
    local text = capture(fn, ITERATIONS, ...)
    local traces = parse(text)
    local problems, summary, closes, covers, first, last = check(traces, fn, text)
    if strict and not closes then
        problems[#problems + 1] = string.format(
            "no trace starting on %s:%d-%d stops with '-> loop'", THIS, first, last)
    elseif not closes and not covers then
        problems[#problems + 1] = string.format(
            "no completed trace starts on %s:%d-%d with '-> loop' or records its back edge",
            THIS, first, last)
    end
    local share, states = compiled_share(fn, ITERATIONS, ...)
    if share < 0.9 then
        problems[#problems + 1] = string.format(
            "only %.0f%% of profiler samples in compiled code (%s)", share * 100, states)
    end
    local aborts = 0
    for _, tr in ipairs(traces) do
        if tr.abort then aborts = aborts + 1 end
    end
    io.write("     ", label, ": ", #traces, " traces (", aborts, " aborted attempts); ",
        closes and ("loop trace " .. closes.id) or ("back edge in trace " .. (covers and covers.id or "?")),
        string.format("; %.0f%% compiled (%s)\n", share * 100, states))
    if #problems > 0 then
        error(label .. ":\n  " .. table.concat(problems, "\n  ")
              .. "\ntraces:\n  " .. table.concat(summary, "\n  ")
              .. "\n---- jit.dump log ----\n" .. text .. "\n---- end of log ----", 2)
    end
end

---------------------------------------------------------------------------------------

test("the JIT compiler is on", function()
    ok(jit.status(), "run with the JIT on (not luajit -joff)")
    eq(jit.arch ~= nil, true)
end)

test("the dump parser sees loops, links, aborts and stitches", function()
    local sample = table.concat({
        "---- TRACE 1 start jit_test.lua:10",
        "0006  FORL     1 => 0003       (jit_test.lua:10)",
        "---- TRACE 1 stop -> loop",
        "---- TRACE 2 start 1/3 rsbalancer.lua:230",
        "0000  . FUNCC               ; ffi.meta.__call",
        "---- TRACE 2 stop -> 1",
        "---- TRACE 3 start x.lua:5",
        "---- TRACE 3 abort x.lua:6 -- NYI: bytecode 51",
        "---- TRACE 4 start 2/stitch x.lua:7",
        "---- TRACE 4 stop -> return",
    }, "\n")
    local t = parse(sample)
    eq(#t, 4)
    eq(t[1].stop, "loop"); eq(t[1].start_file, "jit_test.lua"); eq(t[1].start_line, 10)
    eq(t[1].bc[1].op, "FORL"); eq(t[1].bc[1].line, 10)
    eq(t[2].parent, "1/3"); eq(t[2].stop, "1"); eq(t[2].start_line, 230)
    eq(t[3].abort, "x.lua:6 -- NYI: bytecode 51")
    ok(t[4].start:find("stitch", 1, true), "stitch start")
end)

test("pick + report: 100k iterations compile to a loop trace", function()
    rsb.init(F.config("p2c_ewma", { 30, 50, 20 }, { 1 }), F.name("jit"))
    assert_compiles("pick+report", true, loop_pick_report)
    local st = assert(rsb.stats("llm"))
    eq(st.a.inflight + st.b.inflight + st.c.inflight + st.z1.inflight, 0, "inflight")
end)

test("pick with key and tried + report compiles to a loop trace", function()
    local by_id = select(1, rsb.init(F.config("chash", { 1, 1, 1, 1 }), F.name("jit"))
        and F.slots(rsb.balancer()))
    local keys = {}
    for i = 1, 64 do keys[i] = "session-" .. i end
    assert_compiles("pick(key, tried)+report", true, loop_pick_key_tried, keys, { by_id.a })
end)

test("report_tries with typical $upstream_status / $upstream_response_time compiles", function()
    local by_id = select(1, rsb.init(F.config("weighted_random", { 1, 1, 1 }), F.name("jit"))
        and F.slots(rsb.balancer()))
    local a, b, c = by_id.a, by_id.b, by_id.c
    local cases = {
        { { a }, "200", "0.052" },
        { { a, b }, "502, 200", "0.001, 0.120" },
        { { b }, "200", "1.337" },
        { { a, b, c }, "504, 502 : 200", "60.001, 0.003 : 0.250" },
    }
    assert_compiles("report_tries", false, loop_report_tries, cases)
end)

test("provider group and others + pick + report compile to a loop trace", function()
    local cfg = F.config("weighted_random", { 1, 1, 1 })
    cfg.pools.llm.nodes[1].headers = { ["X-Key"] = "k1" }
    cfg.pools.llm.nodes[2].model = "m2"
    rsb.init(cfg, F.name("jit"))
    local provider = require "resty.rsbalancer.provider"
    assert_compiles("provider group/others+pick", true, loop_provider_pick, provider.others, provider.group)
end)

test("canary arm choice + pick + report compiles to a loop trace", function()
    rsb.init({ pools = {
        llm = { algorithm = "weighted_random", slow_start_ms = 0, nodes = F.nodes({ 1, 1 }),
                canary = { pool = "llm_canary", share = 0.3 } },
        llm_canary = { algorithm = "weighted_random", slow_start_ms = 0,
                       nodes = { { id = "c", addr = "127.0.0.1:8101" } } },
    } }, F.name("jit"))
    local canary = require "resty.rsbalancer.canary"
    assert_compiles("canary choose+pick+report", true, loop_canary_pick, canary.choose,
        assert(rsb.balancer():pool_index("llm")))
    local st = assert(rsb.stats("llm_canary"))
    ok(st.c.requests > 0, "the canary was picked")
end)

test("the checker rejects a stitching loop and a loop with string.gmatch", function()
    rsb.init(F.config("round_robin", { 1 }), F.name("jit"))
    local okay, err = pcall(assert_compiles, "mlua call (expected to fail)", true,
        loop_mlua_call, rsb.balancer())
    eq(okay, false, "a loop calling an mlua method passed")
    ok(tostring(err):find("stitched", 1, true), "no stitch reported: " .. tostring(err):sub(1, 2000))
    okay, err = pcall(assert_compiles, "gmatch (expected to fail)", false, loop_gmatch)
    eq(okay, false, "a loop calling string.gmatch passed")
    local e = tostring(err)
    ok(e:find("NYI", 1, true) or e:find("stitched", 1, true) or e:find("compiled code", 1, true),
        "no NYI/stitch/profile problem reported: " .. e:sub(1, 2000))
end)

T.done()
