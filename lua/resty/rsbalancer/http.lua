-- resty.rsbalancer.http: the HTTP exchanges the timers need (health probes, alert
-- webhooks, /metrics scrapes): connect with a cosocket, send a complete request, read
-- the status line (and, for fetch(), the headers and a bounded body), close. There is
-- no lua-resty-http here.

local ngx = ngx
local tcp = ngx.socket.tcp
local find, sub, lower, match = string.find, string.sub, string.lower, string.match
local concat, tonumber, tostring = table.concat, tonumber, tostring

local _M = {}

-- Most header lines fetch() reads before it gives up on a response.
local MAX_HEADERS = 100

-- A connected socket that has sent `request`, or nil, err.
local function open(host, port, timeout_ms, request, tls)
    local sock = tcp()
    sock:settimeout(timeout_ms)
    local ok, err = sock:connect(host, port)
    if not ok then
        return nil, "connect: " .. tostring(err)
    end
    if tls then
        -- pcall: lua-resty-core 0.1.25 (Debian 12) raises "assertion failed!" when a
        -- handshake that completes at once fails its certificate check, rather than
        -- returning nil, err (nginx logs the reason as "lua ssl certificate verify error").
        local pok
        pok, ok, err = pcall(sock.sslhandshake, sock, nil, tls.sni, tls.verify)
        if not pok then
            ok, err = nil, "failed (certificate not verified: see the \"lua ssl\" error before this line)"
        end
        if not ok then
            sock:close()
            return nil, "TLS handshake: " .. tostring(err)
        end
    end
    ok, err = sock:send(request)
    if not ok then
        sock:close()
        return nil, "send: " .. tostring(err)
    end
    return sock
end

-- The next line from `sock`, or nil, err.
local function receive_line(sock)
    local line, err = sock:receive("*l")
    if not line then
        return nil, "receive: " .. tostring(err)
    end
    return line
end

-- A socket that has sent `request` and read the response's status line, and the
-- status code; or nil, err (the socket closed).
local function exchange(host, port, timeout_ms, request, tls)
    local sock, err = open(host, port, timeout_ms, request, tls)
    if not sock then
        return nil, err
    end
    local line
    line, err = receive_line(sock)
    if not line then
        sock:close()
        return nil, err
    end
    local _, _, code = find(line, "^HTTP/%d%.%d (%d%d%d)")
    code = tonumber(code)
    if not code then
        sock:close()
        return nil, "bad status line: " .. sub(line, 1, 64)
    end
    return sock, code
end

--- status(host, port, timeout_ms, request [, tls]): the response's status code, or
-- nil, err. `request` is the whole request text (it should say "Connection: close";
-- it may hold secrets: it is never part of an error). `tls` = { sni = name or nil,
-- verify = bool }: a TLS handshake first, the certificate checked (when `verify`)
-- against lua_ssl_trusted_certificate and the name `sni`.
function _M.status(host, port, timeout_ms, request, tls)
    local sock, code = exchange(host, port, timeout_ms, request, tls)
    if not sock then
        return nil, code
    end
    sock:close()
    return code
end

-- The body of a chunked response, at most `max` bytes, or nil, err.
local function read_chunked(sock, max)
    local parts, total = {}, 0
    while true do
        local line, err = receive_line(sock)
        if not line then
            return nil, err
        end
        local hex = match(line, "^%s*(%x+)")
        local size = hex and tonumber(hex, 16)
        if not size then
            return nil, "bad chunk size line: " .. sub(line, 1, 32)
        end
        if size == 0 then
            return concat(parts)
        end
        total = total + size
        if total > max then
            return nil, "body longer than " .. max .. " bytes"
        end
        local data
        data, err = sock:receive(size)
        if not data then
            return nil, "receive: " .. tostring(err)
        end
        parts[#parts + 1] = data
        line, err = receive_line(sock) -- the CRLF after the chunk
        if not line then
            return nil, err
        end
    end
end

-- The body after the headers: by Content-Length, chunked, or up to the connection's
-- close; at most `max` bytes, or nil, err.
local function read_body(sock, length, chunked, max)
    if chunked then
        return read_chunked(sock, max)
    end
    if length then
        if length > max then
            return nil, "body longer than " .. max .. " bytes (Content-Length " .. length .. ")"
        end
        local data, err = sock:receive(length)
        if not data then
            return nil, "receive: " .. tostring(err)
        end
        return data
    end
    local data, err, partial = sock:receive(max + 1)
    if data then
        return nil, "body longer than " .. max .. " bytes"
    end
    if err == "closed" then
        return partial
    end
    return nil, "receive: " .. tostring(err)
end

--- fetch(host, port, timeout_ms, request, max_bytes [, tls]): status, body; or nil,
-- err. As status(), then the headers and, for a 200, the body (Content-Length,
-- chunked or up to the close), refused when longer than `max_bytes`. Other statuses
-- come without a body (nil). `timeout_ms` bounds each socket operation.
function _M.fetch(host, port, timeout_ms, request, max_bytes, tls)
    local sock, code = exchange(host, port, timeout_ms, request, tls)
    if not sock then
        return nil, code
    end
    local err, length, chunked
    for i = 1, MAX_HEADERS + 1 do
        local line
        line, err = receive_line(sock)
        if not line then
            sock:close()
            return nil, err
        end
        if line == "" then
            break
        end
        if i > MAX_HEADERS then
            sock:close()
            return nil, "more than " .. MAX_HEADERS .. " header lines"
        end
        local name, value = match(line, "^([^:]+):%s*(.-)%s*$")
        name = name and lower(name)
        if name == "content-length" then
            length = tonumber(match(value, "^%d+$"))
        elseif name == "transfer-encoding" then
            chunked = find(lower(value), "chunked", 1, true) ~= nil
        end
    end
    if code ~= 200 then
        sock:close()
        return code
    end
    local body
    body, err = read_body(sock, length, chunked, max_bytes)
    sock:close()
    if not body then
        return nil, err
    end
    return code, body
end

return _M
