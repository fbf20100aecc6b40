-- A reference contender of scripts/bench-throughput.sh and bench-instructions.sh
-- ("ovh-bare"), not a balancer, and not rsbalancer: the least per-response feedback a
-- balancer sharing its state between workers can have, in C (bare_feedback.c next to
-- this file, built by scripts/bench-overhead-setup.sh). One bare_pick and
-- set_current_peer in balancer_by_lua, one bare_report in log_by_lua, on the floor's
-- config (benches/nginx/gateway-seed.conf with the seed's Lua taken out), with no
-- request state: the report goes to the node the worker picked last (with requests
-- interleaved a node's in-flight count drifts; their sum stays right), and every answer
-- is reported as a 200 in 1 ms. What it costs above the floor + empty log_by_lua is a
-- weighted random draw, an in-flight count and a latency average in shared memory.
local ffi = require "ffi"

ffi.cdef [[
int bare_init(unsigned n, const unsigned *weights);
unsigned bare_pick(void);
void bare_report(unsigned node, unsigned status, unsigned latency_us);
]]

local _M = {}

local C, ports
local set_current_peer = require("ngx.balancer").set_current_peer
local last = 0

--- setup(path): in init_by_lua, the absolute path of bare_feedback.so.
function _M.setup(path)
    C = ffi.load(path)
end

--- init(node_ports): in init_by_lua after setup (the master, before the workers
-- fork): the static nodes on 127.0.0.1, weight 100 each.
function _M.init(node_ports)
    ports = node_ports
    local weights = ffi.new("unsigned[?]", #ports)
    for i = 0, #ports - 1 do
        weights[i] = 100
    end
    if C.bare_init(#ports, weights) ~= 0 then
        error("bare_init failed")
    end
end

function _M.balance()
    last = C.bare_pick()
    set_current_peer("127.0.0.1", ports[last + 1])
end

function _M.log()
    C.bare_report(last, 200, 1000)
end

return _M
