-- The tables recorded for a FromCache region (cache.invalidate_region).
-- KEYS[1]: the region's set of tables
-- Returns: {1, table, table, ...} (just {1} when none is recorded); {0} when the key held
--          another Redis type: it is deleted, and what it recorded is lost (the caller
--          retires every table it knows instead)
local kind = heal_type(KEYS[1], 'set', 'region set')
if kind == 'set' then
  local out = redis.call('SMEMBERS', KEYS[1])
  table.insert(out, 1, 1)
  return out
end
if kind == 'none' then
  return {1}
end
return {0}
