-- Invalidate query entries one by one (cache.invalidate_query): delete each entry and move
-- its invalidation counter, so that a fill whose look came before this call is refused
-- (lua/fill.lua compares the counter as the filler saw it) while one that looked after
-- it may store. The counter outlives the entry, unlike a marker stored in its place.
-- KEYS: pairs: an entry key, then its invalidation counter (<entry key>:inv)
-- ARGV[1]: the counters' TTL in milliseconds
-- ARGV[2]: value to start a counter at when it does not exist, or holds another Redis type
--          or what INCR refuses (random: a counter that expired or was overwritten and
--          came back must not repeat a value a filler saw)
-- Returns: how many entries there were
local removed = 0
for i = 1, #KEYS, 2 do
  removed = removed + redis.call('UNLINK', KEYS[i])
  bump(KEYS[i + 1], ARGV[2], ARGV[1])
end
return removed
