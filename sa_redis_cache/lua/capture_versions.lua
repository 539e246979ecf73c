-- Read the version counters of the tables a statement depends on, creating missing ones.
-- KEYS[i]: version counter of table i
-- ARGV[1]: TTL of the counters in milliseconds (refreshed here: a counter that expires
--          only turns every entry validated against it into a miss)
-- ARGV[1 + i]: value to start counter i at when it does not exist (random, chosen by the
--          client, so that a counter lost to eviction, expiry or a restart never comes
--          back at a value an old entry was stored under); a counter of another Redis type
--          or that Redis could not INCR is replaced by it too
-- Returns: the counters' values, in KEYS order
local out = {}
for i, key in ipairs(KEYS) do
  out[i] = counter(key, ARGV[1 + i], ARGV[1])
  redis.call('PEXPIRE', key, ARGV[1])
end
return out
