-- sluice: blocks and runtime allowlist entries shared by replicas (src/store/redis_sync.rs).
--
-- KEYS[1]: version counter, KEYS[2]: hash net -> block JSON, KEYS[3]: hash net -> allow JSON;
-- one hash tag, so one slot on a cluster and this script is atomic there too.
-- One entry per net (not one blob) so that two replicas changing different nets at once both
-- keep their change; the version tells pollers that something changed.
--
-- ARGV[1] = "poll", ARGV[2] = the version the caller has:
--   returns {version, changed (0/1), block JSONs, allow JSONs} (the lists empty if unchanged).
-- ARGV[1] = "seed" or "push", then triples (op, net, JSON) with op B (block), b (unblock),
-- A (allow), a (disallow): applies them and bumps the version; "seed" only when nothing is
-- shared yet (the first replica brings its state file). Returns {version, applied (0/1)}.

local mode = ARGV[1]
if mode == "poll" then
  local v = tonumber(redis.call("GET", KEYS[1]) or "0")
  if v == tonumber(ARGV[2]) then
    return { v, 0, {}, {} }
  end
  return { v, 1, redis.call("HVALS", KEYS[2]), redis.call("HVALS", KEYS[3]) }
end

if mode == "seed" and redis.call("EXISTS", KEYS[1]) == 1 then
  return { tonumber(redis.call("GET", KEYS[1])), 0 }
end

for i = 2, #ARGV, 3 do
  local op, net, json = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  if op == "B" then
    redis.call("HSET", KEYS[2], net, json)
  elseif op == "b" then
    redis.call("HDEL", KEYS[2], net)
  elseif op == "A" then
    redis.call("HSET", KEYS[3], net, json)
  elseif op == "a" then
    redis.call("HDEL", KEYS[3], net)
  end
end
return { redis.call("INCR", KEYS[1]), 1 }
