-- resty.rsbalancer.metrics: the Prometheus endpoint.
--
--   location = /metrics {
--       allow 127.0.0.1;      # the scraper's address
--       deny all;
--       access_log off;
--       content_by_lua_block { require("resty.rsbalancer.metrics").serve() }
--   }
--
-- The text is rendered by the library (src/metrics/) from the shared region's
-- atomics: every worker answers with the same numbers, and rendering adds nothing
-- to the proxied requests' path.

local rsb = require "resty.rsbalancer"

local _M = { version = "0.1.0" }

_M.CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

--- serve(): content handler. 200 with the exposition; 500 (and an error-log line)
-- when it cannot be rendered; 405 for methods other than GET and HEAD.
function _M.serve()
    local method = ngx.req.get_method()
    if method ~= "GET" and method ~= "HEAD" then
        ngx.header["Allow"] = "GET, HEAD"
        return ngx.exit(405)
    end
    local text, err = rsb.metrics()
    if not text then
        ngx.log(ngx.ERR, "rsbalancer: metrics: ", err)
        return ngx.exit(500)
    end
    ngx.status = 200
    ngx.header["Content-Type"] = _M.CONTENT_TYPE
    ngx.header["Content-Length"] = #text
    ngx.print(text) -- nginx sends no body for HEAD
end

return _M
