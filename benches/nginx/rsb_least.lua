-- A reference contender of scripts/bench-throughput.sh and bench-instructions.sh
-- ("ovh-least"), not a balancer: the least per-response feedback through rsbalancer's
-- library that a gateway can have. One rsb_pick_retry and set_current_peer in
-- balancer_by_lua, one rsb_report in log_by_lua, on the rsbalancer gateway's own config
-- (same pool, same locations), with no request state: the report goes to the node the
-- worker picked last, and every answer is reported as a 200 in 1 ms. What the full
-- balance() and log() cost above it is the Lua of the product; what it costs above
-- the floor is the library's pick and report inside a worker.
local ffi = require "ffi"
local rsbalancer = require "resty.rsbalancer"

local _M = {}

local C, handle, pool_index, ask, peers, set_current_peer
local tried = ffi.new("uint32_t[1]")
local out = ffi.new("uint32_t[2]")
local last = 0

--- setup(pool): in init_worker_by_lua, after rsbalancer.init_worker().
function _M.setup(pool)
    C = ffi.load(rsbalancer.library_path)
    local bal = rsbalancer.balancer()
    handle = ffi.cast("const struct rsb_balancer *", bal:handle())
    ask = require("resty.rsbalancer.admission").ask_key(nil)
    peers = {}
    for _, n in ipairs(bal:nodes(pool)) do
        peers[n.slot] = { n.ip, n.port }
    end
    set_current_peer = require("ngx.balancer").set_current_peer
    pool_index = bal:pool_index(pool)
end

function _M.balance()
    if C.rsb_pick_retry(handle, pool_index, ask, tried, 0, 0, 0, 0, out) ~= C.RSB_OK then
        return ngx.exit(ngx.ERROR)
    end
    last = out[0]
    local p = peers[last]
    set_current_peer(p[1], p[2])
end

function _M.log()
    C.rsb_report(handle, last, 200, 1000, 0)
end

return _M
