-- Shared fixtures for the Lua suites: configs and fresh balancer names.

local F = {}

local seq = 0

--- A balancer name not used before in this process: each init() with it maps a
-- new region, so tests do not see each other's counters.
function F.name(prefix)
    seq = seq + 1
    return (prefix or "t") .. "_" .. seq
end

--- nodes({30, 50, 20} [, {backup_weight, ...}]): node list with ids a, b, c, ...
-- and backups z1, z2, ... on 127.0.0.1:8001.. / :9001..
function F.nodes(weights, backups)
    local list = {}
    for i, w in ipairs(weights) do
        list[#list + 1] = { id = string.char(96 + i), addr = "127.0.0.1:" .. (8000 + i), weight = w }
    end
    for i, w in ipairs(backups or {}) do
        list[#list + 1] = { id = "z" .. i, addr = "127.0.0.1:" .. (9000 + i), weight = w, backup = true }
    end
    return list
end

--- config(algorithm, weights [, backups]): one pool "llm", slow start off (so that
-- weights are exact from the first pick).
function F.config(algorithm, weights, backups)
    return {
        pools = {
            llm = {
                algorithm = algorithm,
                slow_start_ms = 0,
                nodes = F.nodes(weights, backups),
            },
        },
    }
end

--- slot -> id and id -> slot maps of pool `pool` from the mlua object.
function F.slots(bal, pool)
    local by_id, by_slot = {}, {}
    for _, n in ipairs(assert(bal:nodes(pool or "llm"))) do
        by_id[n.id] = n.slot
        by_slot[n.slot] = n.id
    end
    return by_id, by_slot
end

--- Pearson chi-square of counts against expected proportions.
function F.chi_square(counts, probs, total)
    local x = 0
    for k, p in pairs(probs) do
        local e = p * total
        local d = (counts[k] or 0) - e
        x = x + d * d / e
    end
    return x
end

return F
