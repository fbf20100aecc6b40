-- resty.rsbalancer.http: the one HTTP exchange the timers need (health probes, alert
-- webhooks): connect with a cosocket, send a complete request, read the status line,
-- close. Bodies of responses are not read; there is no lua-resty-http here.

local ngx = ngx
local tcp = ngx.socket.tcp
local find, sub, tonumber, tostring = string.find, string.sub, tonumber, tostring

local _M = {}

--- status(host, port, timeout_ms, request [, tls]): the response's status code, or
-- nil, err. `request` is the whole request text (it should say "Connection: close";
-- it may hold secrets: it is never part of an error). `tls` = { sni = name or nil,
-- verify = bool }: a TLS handshake first, the certificate checked (when `verify`)
-- against lua_ssl_trusted_certificate and the name `sni`.
function _M.status(host, port, timeout_ms, request, tls)
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
    local line
    line, err = sock:receive("*l")
    sock:close()
    if not line then
        return nil, "receive: " .. tostring(err)
    end
    local _, _, code = find(line, "^HTTP/%d%.%d (%d%d%d)")
    code = tonumber(code)
    if not code then
        return nil, "bad status line: " .. sub(line, 1, 64)
    end
    return code
end

return _M
