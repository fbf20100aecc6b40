-- The admin Lua API of resty.rsbalancer (state, add_node, remove_node, drain and the
-- other setters), the module's JSON helpers, and the pure parts of the HTTP admin
-- module (token comparison, Accept negotiation, the status page's text).

local T = require "harness"
local F = require "fixtures"
local rsb = require "resty.rsbalancer"
local native = require "rsbalancer"

local test, eq, ok, contains, raises = T.test, T.eq, T.ok, T.contains, T.raises

local function fresh(cfg)
    eq(rsb.init(cfg, F.name("admin")), true, "init")
end

local function ids(pool)
    local out = {}
    for _, n in ipairs(assert(rsb.state(pool)).nodes) do out[#out + 1] = n.id end
    return table.concat(out, ",")
end

test("state: every pool, or one, with the admin fields", function()
    fresh(F.config("weighted_random", { 30, 50 }, { 5 }))
    local st = assert(rsb.state())
    eq(type(st.generation), "number")
    local p = st.pools.llm
    eq(p.algorithm, "weighted_random")
    eq(p.canary_share, 0)
    eq(p.emergency.mode, "auto")
    eq(p.emergency.active, false)
    eq(#p.nodes, 3)
    local a = p.nodes[1]
    eq(a.id, "a")
    eq(a.weight, 30)
    eq(a.effective_weight, 30)
    eq(a.draining, false)
    eq(a.state, "healthy")
    eq(p.nodes[3].backup, true)
    eq(assert(rsb.state("llm")).nodes[2].id, "b")
    local none, err, kind = rsb.state("nope")
    eq(none, nil)
    eq(err, 'unknown pool "nope"')
    eq(kind, "not_found")
end)

test("drain, set_canary_share, set_emergency show in state", function()
    local cfg = F.config("weighted_random", { 1, 1 })
    fresh(cfg)
    local none, err = rsb.set_canary_share("llm", 0.3)
    eq(none, nil)
    contains(err, "no canary")
    cfg.pools.llm.canary = { pool = "next" }
    cfg.pools.next = { nodes = F.nodes({ 1 }) }
    fresh(cfg)
    eq(rsb.drain("llm", "a"), true)
    eq(rsb.set_canary_share("llm", 0.3), true)
    eq(rsb.set_emergency("llm", "on"), true)
    local p = assert(rsb.state("llm"))
    eq(p.nodes[1].draining, true)
    eq(p.nodes[1].state, "draining")
    eq(p.canary_share, 0.3)
    eq(p.emergency.mode, "on")
    eq(rsb.drain("llm", "a", false), true)
    eq(assert(rsb.state("llm")).nodes[1].draining, false)
end)

test("add_node and remove_node", function()
    fresh(F.config("weighted_random", { 1, 1 }))
    local slot = assert(rsb.add_node("llm", { id = "c", addr = "127.0.0.1:8003", weight = 7 }))
    eq(type(slot), "number")
    eq(ids("llm"), "a,b,c")
    eq(assert(rsb.state("llm")).nodes[3].weight, 7)
    assert(rsb.pick("llm")) -- syncs the wrapper's address table
    local ip, port, id = rsb.peer(slot)
    eq(ip, "127.0.0.1")
    eq(port, 8003)
    eq(id, "c")
    assert(rsb.add_node("llm", { id = "z", addr = "127.0.0.1:9009", backup = true }))
    eq(assert(rsb.state("llm")).nodes[4].backup, true)
    eq(assert(rsb.state("llm")).nodes[4].weight, 1)
    eq(rsb.remove_node("llm", "a"), true)
    eq(ids("llm"), "b,c,z")
end)

test("add_node and remove_node: runtime failures return nil, err, kind", function()
    fresh(F.config("weighted_random", { 1 }, { 1 }))
    local before = ids("llm")
    local function refused(want_kind, want_msg, r, err, kind)
        eq(r, nil, want_msg)
        contains(err, want_msg)
        eq(kind, want_kind, want_msg)
    end
    refused("conflict", 'node "a" already exists', rsb.add_node("llm", { id = "a", addr = "127.0.0.1:1" }))
    refused("not_found", 'unknown pool "nope"', rsb.add_node("nope", { id = "x", addr = "127.0.0.1:1" }))
    refused("invalid", "weight: 0 is out of range", rsb.add_node("llm", { id = "x", addr = "127.0.0.1:1", weight = 0 }))
    refused("invalid", "addr: ", rsb.add_node("llm", { id = "x", addr = "nowhere" }))
    refused("conflict", "without a primary", rsb.remove_node("llm", "a"))
    refused("not_found", 'unknown node "q"', rsb.remove_node("llm", "q"))
    eq(ids("llm"), before, "nothing changed")
end)

test("admin misuse raises bad argument", function()
    fresh(F.config("weighted_random", { 1 }))
    contains(raises(rsb.add_node, 1, {}), "bad argument #1 to 'add_node'")
    contains(raises(rsb.add_node, "llm", "x"), "bad argument #2 to 'add_node' (table expected")
    contains(raises(rsb.add_node, "llm", { id = "x" }), "bad argument #2 to 'add_node' (id and addr are required)")
    contains(raises(rsb.add_node, "llm", { id = "x", addr = "127.0.0.1:1", colour = 1 }),
             "bad argument #2 to 'add_node' (unknown key colour)")
    contains(raises(rsb.add_node, "llm", { id = "x", addr = "127.0.0.1:1", weight = "5" }),
             "bad argument #2 to 'add_node' (weight: number expected, got string)")
    contains(raises(rsb.remove_node, "llm", 5), "bad argument #2 to 'remove_node'")
    contains(raises(rsb.state, 5), "bad argument #1 to 'state'")
    -- The mlua method itself checks the table too.
    local bal = rsb.balancer()
    contains(raises(bal.add_node, bal, "llm", { id = "x", addr = "127.0.0.1:1", weight = 1.5 }),
             "bad argument #2 to 'add_node' (weight:")
    contains(raises(bal.add_node, bal, "llm", { id = "x", addr = "127.0.0.1:1", resolved = "x" }),
             "bad argument #2 to 'add_node'")
end)

test("json_decode / json_encode", function()
    local v = assert(native.json_decode('{"a": 1, "b": [true, null], "c": {"d": "e"}, "f": 2.5}'))
    eq(v.a, 1)
    eq(v.b[1], true)
    eq(v.b[2], native.null)
    ok(getmetatable(v.b) ~= nil, "arrays are marked")
    eq(getmetatable(v), nil, "objects are not")
    eq(v.c.d, "e")
    eq(v.f, 2.5)
    local none, err = native.json_decode('{"a": ')
    eq(none, nil)
    contains(err, "invalid JSON")
    eq(native.json_encode({ a = 1, b = "x" }), '{"a":1,"b":"x"}')
    eq(native.json_encode({ w = 3.0 }), '{"w":3}')
    eq(native.json_encode(native.json_decode("[1,2]")), "[1,2]")
end)

test("admin_body: the admin routes' bodies, parsed and validated whole", function()
    local body = native.admin_body
    local b = assert(body("node", '{"weight": 5.0, "drain": true}'))
    eq(b.weight, 5)
    eq(b.drain, true)
    b = assert(body("add_node", '{"id": "x", "addr": "127.0.0.1:1"}'))
    eq(b.id, "x")
    eq(b.addr, "127.0.0.1:1")
    eq(b.weight, nil)
    eq(b.backup, nil)
    eq(assert(body("canary", '{"share": 0.25}')).share, 0.25)
    eq(assert(body("emergency", '{"mode": "off"}')).mode, "off")
    -- Refusals: nil, a message naming the key (and value), the HTTP status.
    local cases = {
        { "node", '{"weight": 5, "weight": 7}', 'duplicate key "weight"', 400 },
        { "add_node", '{"id": "x", "addr": "a:1", "id": "y"}', 'duplicate key "id"', 400 },
        { "node", '{"weight": 0}', "weight: 0 is out of range 1..=10000", 400 },
        { "node", '{"colour": 1}', 'unknown key "colour" (allowed: drain, weight)', 400 },
        { "canary", '{"share": 1.5}', "share: 1.5 is out of range 0..1", 400 },
        { "emergency", "[1]", "body must be a JSON object", 400 },
        { "node", "", "a JSON object body is required", 400 },
        { "node", '{"weight": 5' .. string.rep(" ", native.admin_body_max) .. "}", "over the limit", 413 },
    }
    for _, c in ipairs(cases) do
        local none, err, status = body(c[1], c[2])
        eq(none, nil, c[2])
        contains(err, c[3])
        eq(status, c[4], c[2])
    end
    eq(native.admin_body_max, 16384)
    contains(raises(body, "nodes", "{}"), "bad argument #1 to 'admin_body' (route node, add_node,")
end)

test("admin module: constant-time token comparison", function()
    local admin = require "resty.rsbalancer.admin"
    local same = admin._same_token
    eq(same("secret", "secret"), true)
    eq(same("secreT", "secret"), false)
    eq(same("secre", "secret"), false)
    eq(same("secrets", "secret"), false)
    eq(same("", "secret"), false)
end)

-- Constant time means: every byte of the expected token is read, and the given one at
-- the same positions, wherever the first mismatch is (an early-exit loop reads less on
-- an early mismatch; `==` reads nothing). The module caches string.byte when it loads,
-- so a fresh copy is loaded with a recording string.byte.
test("admin module: the token comparison reads every byte wherever they differ", function()
    local name = "resty.rsbalancer.admin"
    local real, loaded = string.byte, package.loaded[name]
    local reads = {}
    string.byte = function(s, i, ...)
        reads[#reads + 1] = { s = s, i = i }
        return real(s, i, ...)
    end
    package.loaded[name] = nil
    local fine, fresh = pcall(require, name)
    string.byte, package.loaded[name] = real, loaded
    assert(fine, fresh)
    local same = fresh._same_token
    local expected = "s3cr3t-token-0123"
    -- Per position 1..#expected, how often `expected` and `given` were read there.
    local function trace(given)
        reads = {}
        local r = same(given, expected)
        local of_e, of_g = {}, {}
        for _, rd in ipairs(reads) do
            local t = rd.s == expected and of_e or of_g
            t[rd.i] = (t[rd.i] or 0) + 1
        end
        return r, of_e, of_g, #reads
    end
    local r, of_e, _, n = trace(expected)
    eq(r, true)
    for i = 1, #expected do
        -- given == expected is the same Lua string: both reads count as `expected`.
        eq(of_e[i], 2, "equal tokens: reads at " .. i)
    end
    for _, given in ipairs({ "X3cr3t-token-0123", "s3cr3t-tokeX-0123", "s3cr3t-token-012X",
                             "s3cr3t", "X", "", "s3cr3t-token-01234", "s3cr3t-token-0123-and-more" }) do
        local r2, e2, g2, n2 = trace(given)
        eq(r2, false, given)
        for i = 1, #expected do
            eq(e2[i], 1, given .. ": expected read at " .. i)
            eq(g2[i], 1, given .. ": given read at " .. i)
        end
        eq(n2, n, given .. ": as many reads as for a match")
    end
end)

test("admin module: Accept negotiation", function()
    local admin = require("resty.rsbalancer.admin")
    local q, page = admin._accept_q, admin._wants_page
    local browser = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"
    eq(q(browser, "text/html"), 1)
    eq(q(browser, "application/json"), 0.8, "*/* counts for JSON")
    eq(q("application/json", "application/json"), 1)
    eq(q("text/html;q=0.5, application/json", "text/html"), 0.5)
    eq(q("*/*", "text/html"), 1)
    eq(q("*/*;q=0.3, text/*;q=0.6", "text/html"), 0.6, "the most specific range wins")
    eq(q("text/html;q=0, */*", "text/html"), 0, "an explicit q=0 refuses")
    eq(q("TEXT/HTML;Q=2", "text/html"), 1, "case-insensitive, clamped")
    eq(q("image/png", "text/html"), 0)
    -- The page only when text/html is preferred to JSON.
    eq(page(nil), false, "no Accept: JSON")
    eq(page("*/*"), false, "curl: JSON")
    eq(page("application/json"), false)
    eq(page("application/json, text/html"), false, "a tie: JSON")
    eq(page("text/html;q=0.5, application/json"), false)
    eq(page(browser), true, "a browser: the page")
    eq(page("text/html"), true)
    eq(page("text/html, application/json;q=0.9"), true)
    eq(page("text/*"), true)
end)

test("status page: self-contained, prefix embedded", function()
    local html = require("resty.rsbalancer.status_page").render("/ops/rsb/")
    contains(html, '"/ops/rsb/"')
    ok(not html:find("@PREFIX@", 1, true), "placeholder left")
    ok(not html:find("https?://"), "no external URL")
    ok(not html:find("<link", 1, true) and not html:find("src=", 1, true), "no external asset")
end)

T.done()
