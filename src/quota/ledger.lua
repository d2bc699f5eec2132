-- sluice: the quota ledger's pools, shared by replicas (src/quota/redis_ledger.rs builds the
-- calls; src/quota/ledger.rs's MemoryLedger is the reference: this is its claim, grant and
-- release, transcribed).
--
-- One hash per pool. Field: the claimant, 32 hex digits. Value: "demand assigned exp_s exp_ns".
--   * demand and assigned are kept as the caller wrote them and never reformatted here: Lua's
--     tostring keeps 14 digits, the caller's shortest round-trip form keeps the exact double;
--   * the expiry is whole seconds plus nanoseconds, each exact in a double (Lua numbers are
--     doubles, and nanoseconds since the epoch exceed 2^53). An entry counts while its expiry
--     is after `now`; a claim drops the expired entries of the pools it reads.
-- Every write sets the hash's TTL, so that a pool nobody claims any more vanishes.
--
-- KEYS: one pool per operation (repeats allowed; all in one slot on a cluster).
-- ARGV[1]: "claim", "grant" or "release"; ARGV[2], ARGV[3]: now (s, ns); ARGV[4], ARGV[5]: the
-- expiry of entries written now (s, ns); ARGV[6]: the hashes' TTL (ms). Then, for KEYS[i],
-- ARGV[6 + 2i - 1]: the claimant and ARGV[6 + 2i]: its demand (claim), its assigned rate
-- (grant), or anything (release).
-- A claim returns, per operation, {claimants, demand, assigned to the others} as strings: a
-- Lua number returned to Redis is truncated to an integer.

local BASE = 6
local mode = ARGV[1]
local now_s, now_ns = tonumber(ARGV[2]), tonumber(ARGV[3])
local expiry = ARGV[4] .. " " .. ARGV[5]
local ttl = ARGV[6]

-- demand, assigned, exp_s, exp_ns as strings; nil for a value that is not ours.
local function fields(value)
  return string.match(value, "^(%S+) (%S+) (%d+) (%d+)$")
end

local function live(exp_s, exp_ns)
  local s, ns = tonumber(exp_s), tonumber(exp_ns)
  return s > now_s or (s == now_s and ns > now_ns)
end

if mode == "release" then
  for i, key in ipairs(KEYS) do
    redis.call("HDEL", key, ARGV[BASE + 2 * i - 1])
  end
  return 0
end

if mode == "grant" then
  -- The claimant's demand stays, even from an expired entry (as in memory: a grant does not
  -- look at expiries; the next claim does).
  local expiring = {}
  for i, key in ipairs(KEYS) do
    local who = ARGV[BASE + 2 * i - 1]
    local demand = "0"
    local old = redis.call("HGET", key, who)
    if old then
      demand = fields(old) or "0"
    end
    redis.call("HSET", key, who, demand .. " " .. ARGV[BASE + 2 * i] .. " " .. expiry)
    if not expiring[key] then
      redis.call("PEXPIRE", key, ttl)
      expiring[key] = true
    end
  end
  return 0
end

if mode ~= "claim" then
  return redis.error_reply("unknown ledger operation " .. tostring(mode))
end

-- A pool's live entries and their sums, read once per call and kept up to date in Lua while
-- this call's claims change it: each claim then costs O(1), and sees the claims before it.
local pools = {}

local function load(key)
  local pool = { entries = {}, claimants = 0, demand = 0, assigned = 0, expiring = false }
  local raw = redis.call("HGETALL", key)
  local dead = {}
  for j = 1, #raw, 2 do
    local who = raw[j]
    local d, a, exp_s, exp_ns = fields(raw[j + 1])
    local demand, assigned = tonumber(d), tonumber(a)
    if demand and assigned and live(exp_s, exp_ns) then
      pool.entries[who] = { demand = demand, assigned = assigned, assigned_text = a }
      pool.claimants = pool.claimants + 1
      pool.demand = pool.demand + demand
      pool.assigned = pool.assigned + assigned
    else
      dead[#dead + 1] = who
    end
  end
  -- HDEL in slices: unpack is bounded by Lua's C stack.
  for j = 1, #dead, 100 do
    redis.call("HDEL", key, unpack(dead, j, math.min(j + 99, #dead)))
  end
  return pool
end

local out = {}
for i, key in ipairs(KEYS) do
  local who, demand_text = ARGV[BASE + 2 * i - 1], ARGV[BASE + 2 * i]
  local demand = tonumber(demand_text) or 0
  local pool = pools[key]
  if not pool then
    pool = load(key)
    pools[key] = pool
  end
  local e = pool.entries[who]
  if e then
    -- A live entry keeps its grant.
    pool.demand = pool.demand - e.demand + demand
    e.demand = demand
  else
    -- New, or expired (and dropped with its grant).
    e = { demand = demand, assigned = 0, assigned_text = "0" }
    pool.entries[who] = e
    pool.claimants = pool.claimants + 1
    pool.demand = pool.demand + demand
  end
  redis.call("HSET", key, who, demand_text .. " " .. e.assigned_text .. " " .. expiry)
  if not pool.expiring then
    redis.call("PEXPIRE", key, ttl)
    pool.expiring = true
  end
  out[#out + 1] = string.format("%d", pool.claimants)
  out[#out + 1] = string.format("%.17g", pool.demand)
  out[#out + 1] = string.format("%.17g", pool.assigned - e.assigned)
end
return out
