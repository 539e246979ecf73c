-- Read the version counters of the tables a statement depends on, creating missing ones.
-- KEYS[i]: version counter of table i
-- ARGV[i]: value to start counter i at when it does not exist (random, chosen by the
--          client, so that a counter lost to eviction or a restart never comes back at a
--          value an old entry was stored under)
-- Returns: the counters' values, in KEYS order
local out = {}
for i, key in ipairs(KEYS) do
  local v = redis.call('GET', key)
  if not v then
    redis.call('SET', key, ARGV[i])
    v = ARGV[i]
  end
  out[i] = v
end
return out
