-- sluice: apply one batch of charges atomically (src/store/redis.rs builds the call).
--
-- This is src/limiter/algorithms/*.rs and the all-or-nothing rule of src/store/memory.rs,
-- transcribed. Redis runs a script without interleaving any other command, so evaluating every
-- charge and then writing is atomic, like the memory store's locked shards.
--
-- Numbers: Lua 5.1 numbers are doubles, exact for integers below 2^53. Times are therefore
-- split into whole milliseconds (~1.8e12 today) plus a sub-millisecond remainder in nanoseconds
-- (0..999999); every intermediate value below stays under 2^53, see the bounds at each helper.
--   * windows (sliding, fixed) count in whole milliseconds: `now` is truncated to its
--     millisecond, window lengths are whole milliseconds (at most 2^35 ms, ~397 days);
--   * token buckets count in nanoseconds relative to `now` (exact while capacity * interval
--     < 2^52 ns, ~52 days).
-- Durations returned to Rust are pairs (ms, ns) so that even a year-long reset is exact.
--
-- KEYS: the counters, all in one hash slot on a cluster.
-- ARGV[1], ARGV[2]: now as (ms, sub-ms ns); ARGV[1] == "" means "use Redis TIME".
-- Then 6 numbers per key: algorithm (0 sliding, 1 fixed, 2 bucket), limit or capacity, window
-- in ms or interval in ns, hits kind (0 take, 1 give back), hits, charge kind (0 observe,
-- 1 shadow, 2 enforce).
-- Stored values: sliding "idx prev curr expires_ms", fixed "idx count expires_ms", bucket
-- "tat_ms tat_ns". Every key carries a TTL at its state's expiry (relative to `now`, so a test
-- clock far from Redis's own clock still works), so Redis memory stays bounded.
-- Returns {committed, then per key: allowed, remaining, reset_ms, reset_ns}.

local MS = 1000000
local U32 = 4294967295

-- q, r with x = q*y + r, 0 <= r < y; exact for integers 0 <= x, 1 <= y, x + y < 2^53.
local function divmod(x, y)
  local q = math.floor(x / y)
  local r = x - q * y
  if r < 0 then
    q = q - 1
    r = r + y
  elseif r >= y then
    q = q + 1
    r = r - y
  end
  return q, r
end

-- floor(a*b/c) and the remainder, for a < 2^32, b <= 2^35, 1 <= c <= 2^35: a is split into
-- 16-bit halves so every partial product stays below 2^52. The quotient may exceed 2^53 (then
-- it is only approximately right, which only ever compares it with something smaller).
local function muldiv(a, b, c)
  local ah = math.floor(a / 65536)
  local al = a - ah * 65536
  local qa, ra = divmod(ah * b, c)
  local qb, rb = divmod(ra * 65536 + al * b, c)
  return qa * 65536 + qb, rb
end

-- ceil(a*b/c), same bounds.
local function muldiv_up(a, b, c)
  local q, r = muldiv(a, b, c)
  if r > 0 then
    q = q + 1
  end
  return q
end

-- floor(a*w*1e6/c) as (q, f) meaning q*1e6 + f nanoseconds, for the sliding window's retry
-- arithmetic (w in ms, a and c below 2^32).
local function fraction(a, w, c)
  local q, r = muldiv(a, w, c) -- a*w = q*c + r, r < c < 2^32
  return q, math.floor(r * MS / c) -- r*1e6 < 2^53: exact
end

-- w*1e6 - (q*1e6 + f) nanoseconds as (ms, ns), saturating at 0.
local function window_minus(w, q, f)
  if q > w or (q == w and f > 0) then
    return 0, 0
  end
  if f > 0 then
    return w - q - 1, MS - f
  end
  return w - q, 0
end

local function clamp32(v)
  if v > U32 then
    return U32
  end
  return v
end

-- Sliding window (src/limiter/algorithms/sliding_window.rs). st = {idx, prev, curr}.
local function sliding(limit, w, st, now, take, h)
  local idx, e = divmod(now, w)
  local prev, curr = 0, 0
  if st then
    if st[1] == idx then
      prev, curr = st[2], st[3]
    elseif st[1] + 1 == idx then
      prev, curr = st[3], 0
    elseif st[1] > idx then
      -- The clock stepped back: stay in the newer window, previous count in full.
      idx, e = st[1], 0
      prev, curr = st[2], st[3]
    end
  end
  local allowed, p2, c2 = true, prev, curr
  local rms, rns = w - e, 0
  if take then
    -- prev*(w-e) + (curr+h)*w <= limit*w  <=>  ceil(prev*(w-e)/w) <= limit - curr - h
    if curr + h <= limit and muldiv_up(prev, w - e, w) <= limit - curr - h then
      c2 = curr + h
    else
      allowed = false
      if h > limit then
        rms = w - e + w
      else
        local done = false
        local room = limit - curr - h
        if room >= 0 and prev > 0 then
          -- Later in this window, once prev's weight has faded to room/prev of the window.
          local q, f = fraction(room, w, prev)
          if q > 0 or f > 0 then
            local nms, nns = window_minus(w, q, f)
            nms = nms - e
            if nms < 0 or (nms == 0 and nns == 0) then
              nms, nns = 0, 1
            end
            rms, rns, done = nms, nns, true
          end
        end
        if not done then
          -- In the next window, where curr becomes the previous count.
          local xms, xns = 0, 0
          if curr > 0 then
            xms, xns = window_minus(w, fraction(limit - h, w, curr))
          end
          rms, rns = w - e + xms, xns
        end
      end
    end
  else
    c2 = math.max(curr - h, 0)
    local rest = h - (curr - c2)
    p2 = math.max(prev - rest, 0)
  end
  local remaining = limit - c2 - muldiv_up(p2, w - e, w)
  if remaining < 0 then
    remaining = 0
  end
  return allowed, { idx, clamp32(p2), clamp32(c2) }, (idx + 2) * w, remaining, rms, rns
end

-- Fixed window (src/limiter/algorithms/fixed_window.rs). st = {idx, count}.
local function fixed(limit, w, st, now, take, h)
  local idx, e = divmod(now, w)
  local count = 0
  if st then
    if st[1] == idx then
      count = st[2]
    elseif st[1] > idx then
      idx, e = st[1], 0
      count = st[2]
    end
  end
  local allowed, after = true, count
  if take then
    if count + h <= limit then
      after = count + h
    else
      allowed = false
    end
  else
    after = math.max(count - h, 0)
  end
  local remaining = limit - after
  if remaining < 0 then
    remaining = 0
  end
  return allowed, { idx, clamp32(after) }, (idx + 1) * w, remaining, w - e, 0
end

-- Token bucket as GCRA (src/limiter/algorithms/token_bucket.rs), in nanoseconds relative to
-- now. st = {tat_ms, tat_ns}; returns the new TAT relative to now instead of an expiry.
local function bucket(cap, t, st, now_ms, now_ns, take, h)
  local tau = cap * t
  local d = 0
  if st then
    d = (st[1] - now_ms) * MS + (st[2] - now_ns)
    if d < 0 then
      d = 0
    end
  end
  local allowed, rel, reset = true, d, d
  if take then
    if h <= cap and d + h * t <= tau then
      rel = d + h * t
      reset = rel
    elseif h <= cap then
      allowed = false
      reset = d + h * t - tau
    else
      -- More hits than the bucket holds: never admitted; report when it is full.
      allowed = false
    end
  else
    if h * t >= d then
      rel = 0
    else
      rel = d - h * t
    end
    reset = rel
  end
  local remaining = 0
  if tau > rel then
    remaining = divmod(tau - rel, t)
  end
  local rms, rns = divmod(reset, MS)
  return allowed, rel, remaining, rms, rns
end

-- Parses a stored value into numbers.
local function parse(v)
  if not v then
    return nil
  end
  local f = {}
  for x in string.gmatch(v, "%S+") do
    f[#f + 1] = tonumber(x)
  end
  return f
end

local now_ms, now_ns
if ARGV[1] == "" then
  local t = redis.call("TIME")
  local us = tonumber(t[2])
  now_ms = tonumber(t[1]) * 1000 + math.floor(us / 1000)
  now_ns = (us % 1000) * 1000
else
  now_ms, now_ns = tonumber(ARGV[1]), tonumber(ARGV[2])
end

local n = #KEYS
local charges, outs = {}, {}
local commit = true

-- The live state of key i: nil when absent or past its expiry (like the memory store).
local function load(i, c)
  local f = parse(redis.call("GET", KEYS[i]))
  if not f then
    return nil
  end
  if c.algo == 2 then
    if f[1] > now_ms or (f[1] == now_ms and f[2] > now_ns) then
      return f
    end
    return nil
  end
  if f[#f] > now_ms then
    return f
  end
  return nil
end

-- Evaluates charge c against state st with (take, h).
local function evaluate(c, st, take, h)
  local o = {}
  if c.algo == 2 then
    o.allowed, o.rel, o.remaining, o.rms, o.rns = bucket(c.limit, c.span, st, now_ms, now_ns, take, h)
  elseif c.algo == 0 then
    o.allowed, o.state, o.expires, o.remaining, o.rms, o.rns = sliding(c.limit, c.span, st, now_ms, take, h)
  else
    o.allowed, o.state, o.expires, o.remaining, o.rms, o.rns = fixed(c.limit, c.span, st, now_ms, take, h)
  end
  return o
end

for i = 1, n do
  local b = 2 + (i - 1) * 6
  local c = {
    algo = tonumber(ARGV[b + 1]),
    limit = tonumber(ARGV[b + 2]),
    span = tonumber(ARGV[b + 3]),
    take = tonumber(ARGV[b + 4]) == 0,
    h = tonumber(ARGV[b + 5]),
    kind = tonumber(ARGV[b + 6]),
  }
  c.state = load(i, c)
  local o = evaluate(c, c.state, c.take, c.h)
  if not o.allowed and c.kind == 2 then
    commit = false
  end
  -- A pure check of an unknown key leaves no trace.
  o.writes = o.allowed and (c.state ~= nil or not c.take or c.h ~= 0)
  charges[i], outs[i] = c, o
end

for i = 1, n do
  local c, o = charges[i], outs[i]
  if o.writes and (commit or c.kind == 0) then
    if c.algo == 2 then
      if o.rel > 0 then
        local tat_ms, tat_ns = divmod(now_ns + o.rel, MS)
        tat_ms = now_ms + tat_ms
        local ttl = tat_ms - now_ms
        if tat_ns > 0 then
          ttl = ttl + 1
        end
        redis.call("SET", KEYS[i], string.format("%.0f %.0f", tat_ms, tat_ns), "PX", string.format("%.0f", ttl))
        c.state = { tat_ms, tat_ns }
      else
        -- A full bucket is the same as no state.
        redis.call("DEL", KEYS[i])
        c.state = nil
      end
    else
      local s = o.state
      local v
      if c.algo == 0 then
        v = string.format("%.0f %.0f %.0f %.0f", s[1], s[2], s[3], o.expires)
      else
        v = string.format("%.0f %.0f %.0f", s[1], s[2], o.expires)
      end
      redis.call("SET", KEYS[i], v, "PX", string.format("%.0f", o.expires - now_ms))
      s[#s + 1] = o.expires
      c.state = s
    end
  end
end

local out = { commit and 1 or 0 }
for i = 1, n do
  local c, o = charges[i], outs[i]
  if not commit and o.allowed then
    -- Nothing but observations was charged: report what is left without this request.
    o = evaluate(c, c.state, true, 0)
    o.allowed = true
  end
  out[#out + 1] = o.allowed and 1 or 0
  out[#out + 1] = o.remaining
  out[#out + 1] = o.rms
  out[#out + 1] = o.rns
end
return out
