-- Multi-provider pools outside nginx (lua/resty/rsbalancer/provider.lua): provider
-- groups and the "other provider" slots per topology generation, the request of each
-- node (values from the environment of the process that loaded the config), and
-- rsbalancer.rewrite_model. apply() needs ngx.var and ngx.req: tests/nginx_providers.rs.

local T = require "harness"
local F = require "fixtures"
local rsb = require "resty.rsbalancer"
local native = require "rsbalancer"
local provider = require "resty.rsbalancer.provider"

local test, eq, ok, contains = T.test, T.eq, T.ok, T.contains

-- HOME is set in every shell that runs these tests; its value stands in for a key.
local home = os.getenv("HOME")

local function config()
    return { pools = {
        llm = { nodes = {
            { id = "ds1", addr = "127.0.0.1:8001", scheme = "https", host = "api.deepseek.com",
              headers = { Authorization = { env = "HOME", prefix = "Bearer " } } },
            { id = "ds2", addr = "127.0.0.1:8002", scheme = "https", host = "api.deepseek.com",
              headers = { Authorization = { env = "HOME", prefix = "Bearer " } } },
            { id = "other", addr = "127.0.0.1:8003", scheme = "https", host = "api.other.test",
              headers = { Authorization = "Bearer literal-key" }, model = "deepseek-ai/DeepSeek-V3" },
        } },
        plain = { nodes = F.nodes({ 1, 1 }) },
    } }
end

local function slot(pool, id)
    return assert(rsb.balancer():node_index(pool, id))
end

test("groups: same scheme, host, headers and model share one", function()
    rsb.init(config(), F.name("provider"))
    local a, b, c = slot("llm", "ds1"), slot("llm", "ds2"), slot("llm", "other")
    eq(provider.group(a), provider.group(b))
    ok(provider.group(a) ~= provider.group(c))
    local others = provider.others(a)
    eq(#others, 1); eq(others[1], c)
    eq(provider.others(a), provider.others(b), "one table per group and generation")
    local oc = provider.others(c)
    table.sort(oc)
    eq(#oc, 2)
    -- A pool of one provider: false; an unknown slot: nil.
    eq(provider.others(slot("plain", "a")), false)
    eq(provider.group(4000), nil)
    eq(provider.others(4000), nil)
end)

test("groups(pool) and apply_pool(pool) of a pool of several providers", function()
    rsb.init(config(), F.name("provider"))
    eq(provider.groups("llm"), 2)
    eq(provider.groups("plain"), 1)
    eq(provider.groups("nope"), 0)
    eq(provider.apply_pool("llm"), false, "several providers: hold a node, then apply(slot)")
    local none, err = provider.apply_pool("nope")
    eq(none, nil); contains(err, "unknown pool")
    contains(T.raises(provider.groups, 1), "bad argument #1 to 'groups' (pool name expected, got number)")
end)

test("request: values from the environment, plain nodes get http and the addr's host", function()
    rsb.init(config(), F.name("provider"))
    local r = provider.request(slot("llm", "ds1"))
    eq(r.scheme, "https"); eq(r.host, "api.deepseek.com"); eq(r.tls_verify, true)
    eq(#r.headers, 1); eq(r.headers[1][1], "Authorization"); eq(r.headers[1][2], "Bearer " .. home)
    eq(r.model, nil)
    local o = provider.request(slot("llm", "other"))
    eq(o.headers[1][2], "Bearer literal-key"); eq(o.model, "deepseek-ai/DeepSeek-V3")
    local p = provider.request(slot("plain", "a"))
    eq(p.scheme, "http"); eq(p.host, "127.0.0.1"); eq(#p.headers, 0)
    -- Names and variables only everywhere else.
    local shown = rsb.status_json() .. native.json_encode(rsb.balancer():pool_config("llm"))
    ok(not shown:find("literal-key", 1, true), shown)
    ok(not shown:find(home, 1, true), shown)
    contains(shown, "HOME")
end)

test("a new generation rebuilds the groups", function()
    rsb.init(config(), F.name("provider"))
    local a = slot("llm", "ds1")
    eq(#provider.others(a), 1)
    assert(rsb.remove_node("llm", "other"))
    eq(provider.others(a), false)
end)

test("misuse raises, a missing variable refuses the config naming it", function()
    contains(T.raises(provider.group, "x"), "bad argument #1 to 'group' (node slot expected, got string)")
    contains(T.raises(provider.apply, nil), "bad argument #1 to 'apply'")
    local cfg = config()
    cfg.pools.llm.nodes[1].headers.Authorization.env = "RSB_SURELY_NOT_SET_VAR"
    local e = T.raises(rsb.init, cfg, F.name("provider"))
    contains(e, "pools.llm.nodes[0].headers.Authorization.env: environment variable \"RSB_SURELY_NOT_SET_VAR\" is not set")
end)

test("rewrite_model", function()
    local body, prev = native.rewrite_model('{"model": "deepseek-chat", "x": {"model": "keep"}}', "m/2")
    eq(body, '{"model": "m/2", "x": {"model": "keep"}}'); eq(prev, "deepseek-chat")
    local none, err = native.rewrite_model("[1]", "m")
    eq(none, nil); contains(err, "not a JSON object")
    contains(T.raises(native.rewrite_model, {}, "m"), "bad argument #1 to 'rewrite_model' (string expected, got table)")
    contains(T.raises(native.rewrite_model, "{}", nil), "bad argument #2 to 'rewrite_model' (string expected, got nil)")
end)

T.done()
