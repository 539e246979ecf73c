-- Invalidate query entries one by one (cache.invalidate_query): replace each with a
-- tombstone, so that a fill whose look came before this call is refused (lua/fill.lua)
-- while one that looked after it, and saw this tombstone, may store.
-- KEYS[1 .. n]: the entry keys
-- ARGV[1]: the tombstone (its prefix, then a token unique to this call)
-- ARGV[2]: the tombstone's TTL in milliseconds
-- ARGV[3]: the tombstone prefix
-- Returns: how many entries were replaced (tombstones and absent keys do not count)
local replaced = 0
for i = 1, #KEYS do
  local current = redis.pcall('GET', KEYS[i])  -- a key of another Redis type is replaced too
  if type(current) == 'string' and string.sub(current, 1, #ARGV[3]) ~= ARGV[3] then
    replaced = replaced + 1
  end
  redis.call('SET', KEYS[i], ARGV[1], 'PX', ARGV[2])
end
return replaced
