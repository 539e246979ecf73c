-- Bump every given version counter and generation (a restarted server, an outage).
-- KEYS[i]: a table's version counter or entity generation
-- ARGV[1]: TTL of the counters in milliseconds
-- ARGV[1 + i]: value to start counter i at when it does not exist (random, never 1)
-- Returns: how many counters were bumped
for i, key in ipairs(KEYS) do
  if redis.call('EXISTS', key) == 0 then
    redis.call('SET', key, ARGV[1 + i])
  end
  redis.call('INCR', key)
  redis.call('PEXPIRE', key, ARGV[1])
end
return #KEYS
