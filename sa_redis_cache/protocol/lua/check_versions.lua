-- Step 1 of a fill on a Redis Cluster (docs/guarantees.md, "Redis Cluster"): for the tables
-- of a statement that live in another slot than the entry, check that nothing moved since
-- the capture. fill.lua then stores the entry in its own slot, checking the tables there.
-- KEYS[1 .. n]:      version counters of the n tables of this slot
-- KEYS[n+1 .. 2n]:   their writers-in-flight sets (ZSET member = transaction, score = expiry ms)
-- ARGV[1 .. n]:      the version counter values captured before the database read
-- Returns: 1 when every version equals its capture and no writer mark is live, else 0
-- A counter or writers set of another Redis type answers 0 and is healed as fill.lua does.
local n = #KEYS / 2
if unchanged_and_unmarked(0, 0, n, n) then
  return 1
end
return 0
