-- Release a fill lease if the caller still holds it (a fill that was not attempted).
-- KEYS[1]: the lease key
-- ARGV[1]: the caller's lease token
-- Returns: 1 when released, 0 when the lease had expired or belongs to another caller
if redis.pcall('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
if redis.call('PTTL', KEYS[1]) == -1 then
  -- every lease is set with an expiry: a key without one (of any type) is foreign, and
  -- would make every miss of the entry wait for a filler that never comes
  redis.call('DEL', KEYS[1])
end
return 0
