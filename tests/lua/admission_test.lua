-- Priorities from untrusted values (resty.rsbalancer.priority) and admit()'s argument
-- checks; the queue itself is tested in Rust (src/admit.rs, tests/admission.rs) and in
-- nginx (tests/nginx_admission.rs).

local T = require "harness"
local F = require "fixtures"
local rsb = require "resty.rsbalancer"

local test, eq, raises, contains = T.test, T.eq, T.raises, T.contains

test("priority parses whole numbers and clamps them", function()
    eq(rsb.priority("7"), 7)
    eq(rsb.priority(3), 3)
    eq(rsb.priority("12"), 10)
    eq(rsb.priority("0"), 1)
    eq(rsb.priority("-4"), 1)
end)

test("priority caps an untrusted value at max", function()
    eq(rsb.priority("9", { max = 5 }), 5)
    eq(rsb.priority("4", { max = 5 }), 4)
end)

test("priority falls back to the default for absent or garbage values", function()
    eq(rsb.priority(nil, { default = 5 }), 5)
    eq(rsb.priority("high", { default = 3 }), 3)
    eq(rsb.priority("2.5", { default = 3 }), 3)
    eq(rsb.priority("nan", { default = 3 }), 3)
    eq(rsb.priority(""), nil)
end)

test("priority misuse raises bad argument", function()
    contains(raises(rsb.priority, "1", 5), "bad argument #2 to 'priority' (table expected, got number)")
    contains(raises(rsb.priority, "1", { max = 11 }), "bad argument #2 to 'priority' (max: integer 1..10")
    contains(raises(rsb.priority, "1", { default = 0 }), "bad argument #2 to 'priority' (default: integer 1..10")
end)

test("admit checks its arguments before anything else", function()
    rsb.init(F.config("p2c_ewma", { 1, 1 }), F.name("adm"))
    contains(raises(rsb.admit, "nope"), "bad argument #1 to 'admit' (unknown pool nope)")
    contains(raises(rsb.admit, "llm", 11), "bad argument #2 to 'admit' (priority 1..10 expected, got 11)")
    contains(raises(rsb.admit, "llm", 2.5), "bad argument #2 to 'admit' (priority 1..10 expected, got 2.5)")
    contains(raises(rsb.admit, "llm", "9"), "bad argument #2 to 'admit' (priority 1..10 expected, got 9)")
    contains(raises(rsb.admit, "llm", { priority = 0 }), "bad argument #2 to 'admit'")
end)

T.done()
