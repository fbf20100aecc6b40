-- The seed article's balancer (shared/seed: "3.1 动态权重分配算法"), made runnable in
-- balancer_by_lua for benches/gateway.rs. select_node() is the seed's code verbatim:
-- weights summed on every call, math.random() * total, a walk over the list, a pick
-- counter per node, all per worker. What the article leaves out is added in the
-- plainest way: a name -> address map, set_current_peer, and (when asked)
-- set_more_tries on the first try so that nginx's proxy_next_upstream retries happen.
-- A retry picks at random again: the seed has no notion of "already tried".
local balancer = require "ngx.balancer"

local _M = {}

local upstreams = {}
local addr = {}

--- init(nodes): in init_by_lua; nodes = { {name=, host=, port=, weight=}, ... }.
function _M.init(nodes)
    upstreams, addr = {}, {}
    for i, n in ipairs(nodes) do
        upstreams[i] = { name = n.name, weight = n.weight, current = 0 }
        addr[n.name] = { n.host, n.port }
    end
end

function _M.init_worker()
    math.randomseed(ngx.worker.pid() * 7919 + ngx.now() * 1000)
end

-- The seed, verbatim.
local function select_node()
    local total_weight = 0
    for _, node in ipairs(upstreams) do
        total_weight = total_weight + node.weight
    end
    local rand = math.random() * total_weight
    local weight_sum = 0
    for _, node in ipairs(upstreams) do
        weight_sum = weight_sum + node.weight
        if rand <= weight_sum then
            node.current = node.current + 1
            return node.name
        end
    end
end

--- balance(more_tries): in balancer_by_lua.
function _M.balance(more_tries)
    if more_tries > 0 then
        local ctx = ngx.ctx
        if not ctx.seed_first then
            ctx.seed_first = true
            balancer.set_more_tries(more_tries)
        end
    end
    local a = addr[select_node()]
    local ok, err = balancer.set_current_peer(a[1], a[2])
    if not ok then
        ngx.log(ngx.ERR, "seed: set_current_peer: ", err)
        return ngx.exit(500)
    end
end

return _M
