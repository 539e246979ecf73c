-- Register (or renew) a process as a holder of local-tier entries of one table.
-- KEYS[1]: the table's holders (ZSET: member = holder id, score = lease expiry in ms, server time)
-- ARGV[1]: holder id
-- ARGV[2]: lease in milliseconds
-- ARGV[3]: '1' to renew only: a holder no longer in the set (its lease lapsed and a writer
--          pruned it) is not added back, it must empty its tier and register again
-- Returns: {server time in ms, 1 when held, 0 when a renewal found the holder gone}
local now = server_ms()
heal_type(KEYS[1], 'zset', 'holder set')
-- holders that died without leaving: writers stopped waiting for them at their expiry;
-- and planted ones scored beyond any lease, which the TTL below would keep alive for good
prune(KEYS[1], now, HOLDER_HORIZON_MS)
local lease = tonumber(ARGV[2])
if ARGV[3] == '1' then
  if redis.call('ZADD', KEYS[1], 'XX', 'CH', now + lease, ARGV[1]) == 0
      and not redis.call('ZSCORE', KEYS[1], ARGV[1]) then
    return {now, 0}
  end
else
  redis.call('ZADD', KEYS[1], now + lease, ARGV[1])
end
-- the set outlives every lease in it, so that a live holder's lease is never lost to expiry
redis.call('PEXPIRE', KEYS[1], lease * 10 + 60000)
return {now, 1}
