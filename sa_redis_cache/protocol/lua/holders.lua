-- A writer waiting for acknowledgements asks where the holders it waits for stand.
-- KEYS[1]: the table's holders (ZSET: holder id -> lease expiry in ms, server time)
-- ARGV[1 ..]: holder ids
-- Returns: {server time in ms, expiry of holder 1 in ms or -1 when it is gone, ...}
-- A holder scored beyond any lease (HOLDER_HORIZON_MS) was written by someone else: it
-- is removed and answered as gone, so that no writer waits for it.
local now = server_ms()
local out = {now}
local zset = type_of(KEYS[1]) == 'zset'
if zset then
  drop_forged(KEYS[1], now, HOLDER_HORIZON_MS)
end
for i = 1, #ARGV do
  local score = zset and redis.call('ZSCORE', KEYS[1], ARGV[i])
  out[#out + 1] = score and score or -1
end
return out
