-- The Lua side of the C ABI: lua/resty/rsbalancer/cdef.lua is generated from
-- include/rsbalancer.h by `make header` (tests/header.rs fails when it is stale).
-- Here: LuaJIT accepts it and it declares exactly the header's declarations; every C
-- function and constant the Lua modules use is declared; the enum constants read
-- through ffi.C and the loaded library are the header's numbers; and the library is
-- checked against the header: every function is exported, and the struct layout
-- agrees with what the library writes.

local T = require "harness"
local F = require "fixtures"
local ffi = require "ffi"
local rsb = require "resty.rsbalancer"
local CDEF = require "resty.rsbalancer.cdef"
local native = require "rsbalancer"

local test, eq, ok, contains = T.test, T.eq, T.ok, T.contains

local HEADER = "include/rsbalancer.h"

local function read_all(path)
    local f = assert(io.open(path, "rb"))
    local s = f:read("*a")
    f:close()
    return s
end

-- C text -> list of normalized top-level declarations (without the ';').
local function declarations(text)
    text = text:gsub("/%*.-%*/", " ")          -- block comments
    text = text:gsub("//[^\n]*", " ")          -- line comments
    -- C++ guards: drop `#ifdef __cplusplus ... #endif` blocks whole
    text = text:gsub("#ifdef __cplusplus.-#endif", " ")
    text = text:gsub("\n%s*#[^\n]*", "\n")      -- other preprocessor lines
    text = text:gsub("^%s*#[^\n]*", "")
    local decls, depth, buf = {}, 0, {}
    for i = 1, #text do
        local ch = text:sub(i, i)
        if ch == "{" then depth = depth + 1 elseif ch == "}" then depth = depth - 1 end
        if ch == ";" and depth == 0 then
            decls[#decls + 1] = table.concat(buf)
            buf = {}
        else
            buf[#buf + 1] = ch
        end
    end
    local out = {}
    for _, d in ipairs(decls) do
        d = d:gsub("%s+", " ")
        d = d:gsub("%s*%*%s*", " *")           -- "char* p", "char * p" -> "char *p"
        d = d:gsub("%s*([%(%),])%s*", "%1")
        d = d:gsub(",", ", ")
        d = d:gsub("%s*([{}])%s*", " %1 ")
        d = d:gsub("%s+", " "):gsub("^ ", ""):gsub(" $", "")
        if d ~= "" then out[#out + 1] = d end
    end
    return out
end

-- Name and kind of a normalized declaration.
local function classify(d)
    if d:match("^typedef ") then
        return "type", d:match("([%w_]+)$")
    end
    local name = d:match("([%w_]+)%(.*%)$")
    if name then
        return "function", name
    end
    return "other", d
end

local header_text = read_all(HEADER)
local header = declarations(header_text)
local header_set, header_by_name = {}, {}
for _, d in ipairs(header) do
    header_set[d] = true
    local kind, name = classify(d)
    header_by_name[name] = header_by_name[name] or {}
    table.insert(header_by_name[name], { kind = kind, decl = d })
end
local generated = declarations(CDEF)

-- Every Lua module that talks to the library.
local SOURCES = {
    "lua/resty/rsbalancer.lua",
    "lua/resty/rsbalancer/admission.lua",
    "lua/resty/rsbalancer/canary.lua",
    "lua/resty/rsbalancer/admin.lua",
}

-- The header's enum constants: name -> number.
local header_values = {}
for name, v in header_text:gmatch("(RSB_[%u_]+) = (%d+)") do
    header_values[name] = tonumber(v)
end

test("the parser reads the header and the generated cdef", function()
    local nfun = 0
    for _, d in ipairs(header) do
        if classify(d) == "function" then nfun = nfun + 1 end
    end
    ok(nfun >= 10, "functions found in the header: " .. nfun)
    ok(header_set["size_t rsb_last_error(char *buf, size_t cap)"],
        "normalized prototype of rsb_last_error not found; header declarations:\n  "
        .. table.concat(header, "\n  "))
    ok(#generated >= 20, "declarations in the generated cdef: " .. #generated)
    ok(header_values.RSB_VERDICT_GO_PROBE and header_values.RSB_WEIGHT_MAX,
        "the shared constants are in the header")
    -- normalization sanity
    local d = declarations("/* x */ enum r f(const struct b *b,\n   uint32_t  x); // y\n")
    eq(d[1], "enum r f(const struct b *b, uint32_t x)")
end)

test("the generated cdef declares exactly the header's declarations", function()
    eq(#generated, #header, "number of declarations")
    for i, d in ipairs(header) do
        eq(generated[i], d, "declaration " .. i)
    end
end)

test("every C function and constant the Lua modules use is declared", function()
    local used = 0
    for _, path in ipairs(SOURCES) do
        local src = read_all(path)
        for name in src:gmatch("[^%w_]C%.([%w_]+)") do
            used = used + 1
            if name:match("^RSB_") then
                ok(header_values[name], path .. ": C." .. name .. " is not a constant of the header")
            else
                local h = header_by_name[name]
                ok(h and h[1].kind == "function", path .. ": C." .. name .. " is not a header function")
            end
        end
        -- No copy of the C declarations left in a module.
        ok(not src:find("ffi%.cdef%s*[%[%(]"), path .. " declares C itself")
    end
    ok(used >= 20, "C.* uses found: " .. used)
end)

test("enum constants through ffi.C and the library are the header's numbers", function()
    local lib = ffi.load(rsb.library_path)
    local n = 0
    for name, v in pairs(header_values) do
        n = n + 1
        eq(ffi.C[name], v, "ffi.C." .. name)
        eq(lib[name], v, "lib." .. name)
        eq(type(lib[name]), "number", name .. " is a Lua number")
    end
    ok(n >= 28, "constants: " .. n)
end)

local lib = ffi.load(rsb.library_path)

test("every header function is exported by " .. rsb.library_path, function()
    for _, d in ipairs(header) do
        local kind, name = classify(d)
        if kind == "function" then
            local okay, err = pcall(function() return lib[name] end)
            ok(okay, name .. ": " .. tostring(err))
        end
    end
end)

-- The function that fills a struct rsb_node_stats (its name has changed before).
local stats_fn
for _, d in ipairs(header) do
    local kind, name = classify(d)
    if kind == "function" and d:find("struct rsb_node_stats *out", 1, true) then
        stats_fn = name
    end
end

test("struct rsb_node_stats layout agrees with the library (FFI vs mlua)", function()
    ok(stats_fn, "no function taking a struct rsb_node_stats * in the header")
    eq(rsb.init(F.config("p2c_ewma", { 3, 1 }, { 2 }), F.name("cdef")), true)
    local bal = rsb.balancer()
    for i = 1, 50 do
        local s = assert(rsb.pick("llm"))
        rsb.report(s, i % 5 == 0 and 503 or (i % 7 == 0 and 429 or 200), 0.001 * i)
    end
    local held = assert(rsb.pick("llm")) -- one in flight
    local h = ffi.cast("const struct rsb_balancer *", bal:handle())
    local out = ffi.new("rsb_node_stats")
    local st = assert(bal:stats("llm"))
    for _, n in ipairs(assert(bal:nodes("llm"))) do
        eq(lib[stats_fn](h, n.slot, out), 0, stats_fn .. " " .. n.id)
        local m = st[n.id]
        for _, k in ipairs({ "weight", "inflight", "picks", "requests", "failures", "busy",
                             "latency_sum_us" }) do
            eq(tonumber(out[k]), m[k], n.id .. "." .. k)
        end
        eq(tonumber(out.ewma_us), m.ewma_us, n.id .. ".ewma_us")
        eq(out.backup ~= 0, m.backup, n.id .. ".backup")
    end
    rsb.report(held, 200, 0.01)
end)

test("index and version functions agree with the mlua module", function()
    local bal = rsb.balancer()
    local h = ffi.cast("const struct rsb_balancer *", bal:handle())
    eq(ffi.string(lib.rsb_version()), native.version)
    local out = ffi.new("uint32_t[1]")
    eq(lib.rsb_pool_index(h, "llm", 3, out), 0)
    eq(out[0], bal:pool_index("llm"))
    eq(lib.rsb_node_index(h, "llm", 3, "b", 1, out), 0)
    eq(out[0], bal:node_index("llm", "b"))
    eq(lib.rsb_pool_index(h, "nope", 4, out), 2, "RSB_INVALID_ARGUMENT")
    local buf = ffi.new("char[256]")
    lib.rsb_last_error(buf, 256)
    contains(ffi.string(buf), "nope")
    eq(tonumber(lib.rsb_generation(nil)), 0, "generation of NULL")
    eq(lib.rsb_pick(nil, 0, nil, 0, nil, 0, out), 1, "RSB_NULL_ARGUMENT")
end)

T.done()
