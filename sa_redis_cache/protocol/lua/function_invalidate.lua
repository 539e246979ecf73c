-- Forget the cached result of one call of a cache.cached function, leaving a tombstone
-- with a new generation in its place (lua/function_fill.lua refuses every fill whose look
-- came before it; a deleted key would let such a fill store).
-- KEYS[1]: the entry key
-- ARGV[1]: the tombstone's TTL in milliseconds (the function's TTL, at least 30 s)
-- ARGV[2]: the new generation (16 random bytes of hex, chosen by the client)
-- Returns: 1 when a result was stored under the key, else 0
local v = redis.pcall('GET', KEYS[1])
local had = 0
if type(v) == 'string' and string.sub(v, 1, 2) ~= '\1T' then
  had = 1
end
redis.call('SET', KEYS[1], '\1T' .. ARGV[2], 'PX', ARGV[1])
return had
