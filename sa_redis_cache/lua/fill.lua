-- Compare-and-set fill of a cache entry, releasing the filler's lease.
-- KEYS[1]:           the entry key
-- KEYS[2]:           the entry's fill lease (held while one caller fills, see stampede.py)
-- KEYS[3 .. n+2]:    version counters of the n tables the entry was read from
-- KEYS[n+3 .. 2n+2]: writers-in-flight sets (ZSET member = transaction, score = expiry ms)
-- ARGV[1]: TTL in milliseconds
-- ARGV[2]: the encoded entry
-- ARGV[3]: the caller's lease token, or '' when it holds no lease
-- ARGV[4]: the prefix of an invalidation tombstone (see lua/tombstone.lua)
-- ARGV[5]: the tombstone the caller found under KEYS[1] before its read, or ''
-- ARGV[6 .. n+5]: the counter values captured before the database read
-- Returns: 1 when stored; 0 when a counter moved, a writer is in flight, or the entry was
--          invalidated since the caller looked (the value read from the database may be
--          older than a committed write)
local n = (#KEYS - 2) / 2
if ARGV[3] ~= '' and redis.call('GET', KEYS[2]) == ARGV[3] then
  redis.call('DEL', KEYS[2])
end
-- pcall: a key of another Redis type is not ours to read; the SET below replaces it
local current = redis.pcall('GET', KEYS[1])
if type(current) == 'string' and current ~= ARGV[5] and string.sub(current, 1, #ARGV[4]) == ARGV[4] then
  return 0
end
for i = 1, n do
  if redis.call('GET', KEYS[2 + i]) ~= ARGV[5 + i] then
    return 0
  end
end
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for i = 1, n do
  if #redis.call('ZRANGEBYSCORE', KEYS[2 + n + i], now_ms, '+inf', 'LIMIT', 0, 1) > 0 then
    return 0
  end
end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[1])
return 1
