-- After a commit's invalidation: the holders of local-tier entries of one table that must
-- see it before the commit returns, and the fence key that tells them they have.
-- KEYS[1]: the table's holders (ZSET: holder id -> lease expiry in ms, server time)
-- KEYS[2]: the fence key of this commit on this table (under the tracked prefix)
-- Returns: {server time in ms, holder 1, its expiry in ms, holder 2, its expiry, ...}
--
-- The fence key is set and deleted at once: Redis's client-side tracking then sends its
-- name to every holder, after the names of the keys this commit changed (they were
-- changed earlier). A holder that reads the fence name has dropped everything the commit
-- changed, and acknowledges on the commit's ack list. With no live holder, nothing is
-- written and nobody waits. A holder scored beyond any lease (HOLDER_HORIZON_MS) was
-- planted: it is removed, never waited for.
local now = server_ms()
if heal_type(KEYS[1], 'zset', 'holder set') ~= 'zset' then
  return {now}
end
prune(KEYS[1], now, HOLDER_HORIZON_MS)
local holders = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
if #holders == 0 then
  return {now}
end
redis.call('SET', KEYS[2], '1')
redis.call('DEL', KEYS[2])
local out = {now}
for i = 1, #holders do
  out[#out + 1] = holders[i]
end
return out
