-- Compare-and-set fill of a cache entry, releasing the filler's lease.
-- KEYS[1]:           the entry key
-- KEYS[2]:           the entry's fill lease (held while one caller fills, see stampede.py)
-- KEYS[3]:           the entry's invalidation counter (lua/invalidate_entries.lua)
-- KEYS[4 .. n+3]:    version counters of the n tables the entry was read from
-- KEYS[n+4 .. 2n+3]: writers-in-flight sets (ZSET member = transaction, score = expiry ms)
-- ARGV[1]: TTL in milliseconds
-- ARGV[2]: the encoded entry
-- ARGV[3]: the caller's lease token, or '' when it holds no lease
-- ARGV[4]: '=' followed by the invalidation counter as the caller read it before its
--          database read ('=' alone when it did not exist); 'n' when the entry has none
--          (entity entries: invalidate_query() never moves one, so it is not read)
-- ARGV[5]: value to reseed the invalidation counter at if it holds another Redis type
--          (random: no filler, whatever it read, can match it)
-- ARGV[6 .. n+5]: the version counter values captured before the database read
-- Returns: 1 when stored; 0 when a counter moved or a writer is in flight (the value
--          read from the database may be older than a committed write or an invalidation)
-- A counter or writers set of another Redis type refuses the fill and is healed (deleted,
-- or reseeded at random): the next look captures a fresh value, and its fill can store.
local n = (#KEYS - 3) / 2
if ARGV[3] ~= '' then
  if redis.pcall('GET', KEYS[2]) == ARGV[3] then
    redis.call('DEL', KEYS[2])
  end
elseif redis.call('PTTL', KEYS[2]) == -1 then
  -- every lease is set with an expiry: one without is foreign, and would make every miss
  -- of this entry wait for a filler that never comes
  redis.call('DEL', KEYS[2])
end
if ARGV[4] ~= 'n' then
  local invalidations = redis.pcall('GET', KEYS[3])
  if failed(invalidations) then
    redis.call('SET', KEYS[3], ARGV[5], 'PX', ARGV[1])
    return 0
  end
  if '=' .. (invalidations or '') ~= ARGV[4] then
    return 0
  end
end
if not unchanged_and_unmarked(3, 5, 3 + n, n) then
  return 0
end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[1])
return 1
