-- Bump version counters and generations (explicit invalidation, undelivered writes, a
-- restarted server), deleting entries too.
-- KEYS[1 .. n]: version counters and entity generations, each bumped
-- KEYS[n+1 ..]: entries to delete (cache.invalidate's entity entry)
-- ARGV[1]: TTL of the counters in milliseconds
-- ARGV[2]: n, the number of counters
-- ARGV[2 + i]: value to start counter i at when it does not exist or holds what INCR
--          refuses (random, never 1)
-- Returns: how many counters were bumped
local n = tonumber(ARGV[2])
for i = n + 1, #KEYS do
  redis.call('UNLINK', KEYS[i])
end
for i = 1, n do
  bump(KEYS[i], ARGV[2 + i], ARGV[1])
end
return n
