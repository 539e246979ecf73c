-- A writer waiting for acknowledgements asks where the holders it waits for stand.
-- KEYS[1]: the table's holders (ZSET: holder id -> lease expiry in ms, server time)
-- ARGV[1 ..]: holder ids
-- Returns: {server time in ms, expiry of holder 1 in ms or -1 when it is gone, ...}
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = {now}
local zset = type_of(KEYS[1]) == 'zset'
for i = 1, #ARGV do
  local score = zset and redis.call('ZSCORE', KEYS[1], ARGV[i])
  out[#out + 1] = score and score or -1
end
return out
