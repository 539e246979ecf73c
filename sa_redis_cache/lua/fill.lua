-- Compare-and-set fill of a cache entry, releasing the filler's lease.
-- KEYS[1]:           the entry key
-- KEYS[2]:           the entry's fill lease (held while one caller fills, see stampede.py)
-- KEYS[3]:           the entry's invalidation counter (lua/invalidate_entries.lua)
-- KEYS[4 .. n+3]:    version counters of the n tables the entry was read from
-- KEYS[n+4 .. 2n+3]: writers-in-flight sets (ZSET member = transaction, score = expiry ms)
-- ARGV[1]: TTL in milliseconds
-- ARGV[2]: the encoded entry
-- ARGV[3]: the caller's lease token, or '' when it holds no lease
-- ARGV[4]: the invalidation counter as the caller read it before its database read, or ''
--          when it did not exist
-- ARGV[5 .. n+4]: the version counter values captured before the database read
-- Returns: 1 when stored; 0 when a counter moved or a writer is in flight (the value
--          read from the database may be older than a committed write or an invalidation)
local n = (#KEYS - 3) / 2
if ARGV[3] ~= '' and redis.call('GET', KEYS[2]) == ARGV[3] then
  redis.call('DEL', KEYS[2])
end
-- pcall: a key of another Redis type under the counter's name refuses the fill
local invalidations = redis.pcall('GET', KEYS[3])
if type(invalidations) == 'table' or (invalidations or '') ~= ARGV[4] then
  return 0
end
for i = 1, n do
  if redis.call('GET', KEYS[3 + i]) ~= ARGV[4 + i] then
    return 0
  end
end
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for i = 1, n do
  if #redis.call('ZRANGEBYSCORE', KEYS[3 + n + i], now_ms, '+inf', 'LIMIT', 0, 1) > 0 then
    return 0
  end
end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[1])
return 1
