-- Read the counters an entry is validated against (table versions and generations, row
-- write counters), creating missing ones.
-- KEYS[i]: counter i
-- ARGV[2i - 1]: TTL of counter i in milliseconds (refreshed here once less than half of it
--          is left: a counter that expires only turns every entry validated against it
--          into a miss; refreshed at every call, it changed the key at each first read of
--          a row, and client-side tracking reports that as a change: every process's local
--          tier dropped all the entries validated against it)
-- ARGV[2i]: value to start counter i at when it does not exist (random, chosen by the
--          client, so that a counter lost to eviction, expiry or a restart never comes
--          back at a value an old entry was stored under); a counter of another Redis type
--          or that Redis could not INCR is replaced by it too
-- Returns: the counters' values, in KEYS order
local out = {}
for i, key in ipairs(KEYS) do
  local ttl = ARGV[2 * i - 1]
  out[i] = counter(key, ARGV[2 * i], ttl)
  local left = redis.call('PTTL', key)
  if left == -1 or left < tonumber(ttl) / 2 then
    redis.call('PEXPIRE', key, ttl)
  end
end
return out
