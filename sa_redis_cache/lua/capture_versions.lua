-- Read the version counters of the tables a statement depends on, creating missing ones.
-- KEYS[i]: version counter of table i
-- ARGV[1]: TTL of the counters in milliseconds (refreshed here: a counter that expires
--          only turns every entry validated against it into a miss)
-- ARGV[1 + i]: value to start counter i at when it does not exist (random, chosen by the
--          client, so that a counter lost to eviction, expiry or a restart never comes
--          back at a value an old entry was stored under)
-- Returns: the counters' values, in KEYS order
local out = {}
for i, key in ipairs(KEYS) do
  local v = redis.call('GET', key)
  if not v then
    v = ARGV[1 + i]
    redis.call('SET', key, v, 'PX', ARGV[1])
  else
    redis.call('PEXPIRE', key, ARGV[1])
  end
  out[i] = v
end
return out
