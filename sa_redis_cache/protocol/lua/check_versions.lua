-- Step 1 of a fill on a Redis Cluster (docs/guarantees.md, "Redis Cluster"): for the tables
-- of a statement that live in another slot than the entry, check that nothing moved since
-- the capture. fill.lua then stores the entry in its own slot, checking the tables there.
-- KEYS[1 .. n]:      version counters of the n tables of this slot
-- KEYS[n+1 .. 2n]:   their writers-in-flight sets (ZSET member = transaction, score = expiry ms)
-- ARGV[1 .. n]:      the version counter values captured before the database read
-- Returns: 1 when every version equals its capture and no writer mark is live, else 0
-- A counter or writers set of another Redis type answers 0 and is healed as fill.lua does.
local n = #KEYS / 2
for i = 1, n do
  local version = redis.pcall('GET', KEYS[i])
  if version ~= ARGV[i] then
    if failed(version) then
      redis.call('DEL', KEYS[i])
    end
    return 0
  end
end
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for i = 1, n do
  local writing = redis.pcall('ZRANGEBYSCORE', KEYS[n + i], now_ms, '+inf', 'LIMIT', 0, 1)
  if failed(writing) then
    redis.call('DEL', KEYS[n + i])
    return 0
  end
  if #writing > 0 then
    return 0
  end
end
return 1
