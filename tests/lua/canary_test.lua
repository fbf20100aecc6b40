-- The canary split's per-request arm choice (lua/resty/rsbalancer/canary.lua) outside
-- nginx: with a random key (the sticky keys need ngx.var and ngx.crc32_short, tested
-- in real nginx by tests/nginx_canary.rs), the share read from shared memory on every
-- call, the nginx variable of each sticky key, and the control calls.

local T = require "harness"
local F = require "fixtures"
local rsb = require "resty.rsbalancer"
local canary = require "resty.rsbalancer.canary"

local test, eq, ok, contains = T.test, T.eq, T.ok, T.contains

local function config(share, key)
    return {
        pools = {
            llm = { nodes = F.nodes({ 1, 1 }), canary = { pool = "llm_canary", share = share, key = key } },
            llm_canary = { nodes = { { id = "c", addr = "127.0.0.1:8101" } } },
        },
    }
end

local function idx(name)
    return assert(rsb.balancer():pool_index(name))
end

-- Share of `n` choices that went to the canary.
local function canary_share(n)
    local p, c = idx("llm"), idx("llm_canary")
    local hits = 0
    for _ = 1, n do
        local aidx, apool = canary.choose("llm", p)
        if aidx == c then
            eq(apool, "llm_canary")
            hits = hits + 1
        else
            eq(aidx, p); eq(apool, "llm")
        end
    end
    return hits / n
end

test("random split: the share within 4.5 sd, read live on every call", function()
    rsb.init(config(0.2), F.name("canary"))
    local n = 100000
    -- sd of a share over n draws at p = 0.2: sqrt(0.16 / n) = 0.00126
    T.near(canary_share(n), 0.2, 4.5 * math.sqrt(0.16 / n), "share 0.2")
    eq(rsb.set_canary_share("llm", 0.7), true)
    T.near(canary_share(n), 0.7, 4.5 * math.sqrt(0.21 / n), "share 0.7")
    eq(rsb.set_canary_share("llm", 0), true)
    eq(canary_share(1000), 0, "share 0")
    eq(rsb.set_canary_share("llm", 1), true)
    eq(canary_share(1000), 1, "share 1")
end)

test("pools without a canary, and the canary pool itself, stay on their pool", function()
    rsb.init(config(1), F.name("canary"))
    local c = idx("llm_canary")
    local a, p = canary.choose("llm_canary", c)
    eq(a, c); eq(p, "llm_canary")
    rsb.init(F.config("weighted_random", { 1 }), F.name("canary"))
    local i = idx("llm")
    a, p = canary.choose("llm", i)
    eq(a, i); eq(p, "llm")
end)

test("sticky keys read these nginx variables", function()
    local v = canary._key_var
    eq(v("header:X-User-Id"), "http_x_user_id")
    eq(v("cookie:sid"), "cookie_sid")
    eq(v("addr"), "binary_remote_addr")
    eq(v("random"), false)
    eq(v(nil), false)
end)

test("canary_state and argument checks", function()
    rsb.init(config(0.25, "header:X-User"), F.name("canary"))
    local st = assert(rsb.canary_state("llm"))
    eq(st.canary, "llm_canary"); eq(st.share, 0.25); eq(st.key, "header:X-User")
    eq(st.rolled_back, false); eq(st.rollbacks, 0)
    eq(rsb.canary_state("llm_canary"), false, "no canary")
    local none, err = rsb.canary_state("nope")
    eq(none, nil); contains(err, "unknown pool \"nope\"")
    contains(T.raises(rsb.canary_state, 7), "bad argument #1 to 'canary_state' (string expected, got number)")
    local events = assert(rsb.balancer():canary_tick())
    eq(#events, 0)
end)

test("a bad canary block is refused with its field and value", function()
    local cfg = config(0.2)
    cfg.pools.llm.canary.pool = "llm"
    local e = T.raises(rsb.init, cfg, F.name("canary"))
    contains(e, "pools.llm.canary.pool: \"llm\" is this pool itself")
end)

T.done()
