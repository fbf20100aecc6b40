-- A tiny test harness for the Lua suites (run with luajit from the repo root).
--
--   local T = require "harness"
--   T.test("name", function() T.eq(1 + 1, 2) end)
--   T.done()   -- prints "N passed, M failed" as its last line; exits 1 if M > 0
--
-- Paths: scripts/test-lua.sh sets LUA_PATH/LUA_CPATH; when a test is run by hand
-- (`luajit tests/lua/ffi_test.lua`) the repo's paths are prepended here.

local function prepend(field, entry)
    if not package[field]:find(entry, 1, true) then
        package[field] = entry .. ";" .. package[field]
    end
end
prepend("path", "tests/lua/?.lua")
prepend("path", "lua/?.lua")
prepend("cpath", "build/lib/?.so")

local T = {}
local passed, failed = 0, 0
local failures = {}

local function show(v)
    if type(v) == "string" then
        return string.format("%q", v)
    end
    return tostring(v)
end

local function fail(msg, level)
    error(msg, (level or 1) + 1)
end

--- test(name, fn): run fn; an error (from an assertion or anything else) fails it.
function T.test(name, fn)
    local ok, err = xpcall(fn, debug.traceback)
    if ok then
        passed = passed + 1
        io.write("ok   ", name, "\n")
    else
        failed = failed + 1
        failures[#failures + 1] = name
        io.write("FAIL ", name, "\n")
        for line in (tostring(err) .. "\n"):gmatch("(.-)\n") do
            io.write("     | ", line, "\n")
        end
    end
    io.flush()
end

--- eq(got, want [, msg]): primitive equality.
function T.eq(got, want, msg)
    if got ~= want then
        fail((msg and msg .. ": " or "") .. "expected " .. show(want) .. ", got " .. show(got), 2)
    end
    return got
end

--- ok(v [, msg]): v is truthy.
function T.ok(v, msg)
    if not v then
        fail(msg or ("expected a true value, got " .. show(v)), 2)
    end
    return v
end

--- near(got, want, tol [, msg]): |got - want| <= tol.
function T.near(got, want, tol, msg)
    if type(got) ~= "number" or math.abs(got - want) > tol then
        fail((msg and msg .. ": " or "") .. "expected " .. show(want) .. " +/- " .. tol
             .. ", got " .. show(got), 2)
    end
    return got
end

--- contains(s, sub [, msg]): plain substring.
function T.contains(s, sub, msg)
    if type(s) ~= "string" or not s:find(sub, 1, true) then
        fail((msg and msg .. ": " or "") .. "expected a string containing " .. show(sub)
             .. ", got " .. show(s), 2)
    end
    return s
end

--- raises(fn, ...): fn(...) must raise; returns the error message as a string.
function T.raises(fn, ...)
    local ok, err = pcall(fn, ...)
    if ok then
        fail("expected an error, got none", 2)
    end
    return tostring(err)
end

--- starts(s, prefix [, msg]): s begins with prefix.
function T.starts(s, prefix, msg)
    if type(s) ~= "string" or s:sub(1, #prefix) ~= prefix then
        fail((msg and msg .. ": " or "") .. "expected a string starting with " .. show(prefix)
             .. ", got " .. show(s), 2)
    end
    return s
end

--- Counts so far (for suites that want to print extra diagnostics).
function T.counts()
    return passed, failed
end

--- done(): the closing line, then exit (1 if anything failed).
function T.done()
    if failed > 0 then
        io.write("failed: ", table.concat(failures, "; "), "\n")
    end
    io.write(passed, " passed, ", failed, " failed\n")
    io.flush()
    os.exit(failed > 0 and 1 or 0)
end

return T
