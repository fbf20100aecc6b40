-- resty.rsbalancer.http outside nginx: fetch() against a scripted socket (the bytes a
-- server would send), for each way a body can end: Content-Length, chunked, the
-- connection's close; bodies over the bound; statuses other than 200. The real
-- cosocket path: tests/nginx_queue.rs (scrapes) and tests/nginx_policy.rs (probes).

local T = require "harness"
local test, eq, ok, contains = T.test, T.eq, T.ok, T.contains

-- A socket that answers with `reply` (a string) and records what it was sent.
local sent, reply, closed
local function socket()
    local pos = 1
    local s = {}
    function s:settimeout() end
    function s:connect(host)
        if host == "refuse" then return nil, "connection refused" end
        return true
    end
    function s:send(data) sent = data return #data end
    function s:close() closed = true end
    function s:receive(what)
        if what == "*l" then
            local a, b = reply:find("\r?\n", pos)
            if not a then
                local rest = reply:sub(pos)
                pos = #reply + 1
                return nil, "closed", rest
            end
            local line = reply:sub(pos, a - 1)
            pos = b + 1
            return line
        end
        local want = what
        local data = reply:sub(pos, pos + want - 1)
        pos = pos + #data
        if #data < want then return nil, "closed", data end
        return data
    end
    return s
end

_G.ngx = { socket = { tcp = socket } }
package.loaded["resty.rsbalancer.http"] = nil
local http = require "resty.rsbalancer.http"

local function fetch(text, max)
    reply, closed = text, false
    return http.fetch("127.0.0.1", 80, 100, "GET /metrics HTTP/1.0\r\n\r\n", max or 1024)
end

test("a body by Content-Length, and only that much", function()
    local code, body = fetch("HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: b\r\n\r\nhello, and more")
    eq(code, 200)
    eq(body, "hello")
    ok(closed)
    eq(sent, "GET /metrics HTTP/1.0\r\n\r\n")
end)

test("a chunked body, reassembled", function()
    local code, body = fetch("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        .. "4\r\nvllm\r\nc;ext=1\r\n:num_queue 7\r\n0\r\n\r\n")
    eq(code, 200)
    eq(body, "vllm:num_queue 7")
end)

test("a body up to the close", function()
    local code, body = fetch("HTTP/1.0 200 OK\nContent-Type: text/plain\n\nline 1\nline 2\n")
    eq(code, 200)
    eq(body, "line 1\nline 2\n")
end)

test("bodies over the bound are refused, whichever way they end", function()
    local long = string.rep("x", 40)
    local code, err = fetch("HTTP/1.1 200 OK\r\nContent-Length: 40\r\n\r\n" .. long, 32)
    eq(code, nil)
    contains(err, "longer than 32 bytes")
    code, err = fetch("HTTP/1.1 200 OK\r\n\r\n" .. long, 32)
    eq(code, nil)
    contains(err, "longer than 32 bytes")
    code, err = fetch("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n20\r\n"
        .. long:sub(1, 32) .. "\r\n8\r\n" .. long:sub(1, 8) .. "\r\n0\r\n\r\n", 32)
    eq(code, nil)
    contains(err, "longer than 32 bytes")
    -- Exactly the bound is fine.
    code, err = fetch("HTTP/1.1 200 OK\r\n\r\n" .. long:sub(1, 32), 32)
    eq(code, 200)
    eq(#err, 32)
end)

test("other statuses come without a body; broken answers are errors", function()
    local code, body = fetch("HTTP/1.1 503 Service Unavailable\r\nContent-Length: 3\r\n\r\nbad")
    eq(code, 503)
    eq(body, nil)
    code, body = fetch("<html>not http</html>\n")
    eq(code, nil)
    contains(body, "bad status line")
    code, body = fetch("HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nshort")
    eq(code, nil)
    contains(body, "receive: closed")
    code, body = fetch("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")
    eq(code, nil)
    contains(body, "bad chunk size")
    code, body = fetch("HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\nabc")
    eq(code, 200, "a Content-Length that is no number: read to the close")
    eq(body, "abc")
    code, body = fetch("HTTP/1.1 200 OK\r\n" .. string.rep("X-A: b\r\n", 101) .. "\r\n")
    eq(code, nil)
    contains(body, "header lines")
    reply = ""
    code, body = http.fetch("refuse", 80, 100, "GET / HTTP/1.0\r\n\r\n", 10)
    eq(code, nil)
    contains(body, "connect: connection refused")
end)

test("status() reads the status line only", function()
    reply = "HTTP/1.1 204 No Content\r\n\r\n"
    eq(http.status("127.0.0.1", 80, 100, "GET /health HTTP/1.0\r\n\r\n"), 204)
end)

T.done()
