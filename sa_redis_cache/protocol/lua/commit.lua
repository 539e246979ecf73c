-- Post-commit work for one table, run after the database commit and before commit() returns.
-- KEYS[1]: the table's version counter
-- KEYS[2]: the table's writers-in-flight set
-- KEYS[3]: the table's entity generation
-- KEYS[4], KEYS[5], ...: pairs of (entity entry, row write counter) for each written row
-- ARGV[1]: the transaction's token in the writers set
-- ARGV[2]: the Pub/Sub channel on which invalidations are announced
-- ARGV[3]: the announcement (table and rows, encoded by the client)
-- ARGV[4]: 1 when the transaction wrote rows it cannot name (bulk or textual DML): the
--          entity generation is bumped again, because a write-through commit of a row
--          that the bulk statement then overwrote may have stored its state under the
--          generation the bulk statement's flush mark had already moved to
-- ARGV[5]: TTL of the version counter and the generation, in milliseconds
-- ARGV[6]: value to start a counter at when it does not exist or holds what INCR refuses
--          (random, never 1)
-- ARGV[7], ARGV[8], ARGV[9] for each row, in KEYS order:
--          the write ticket from flush_mark.lua, the TTL in ms, the new encoded state
--          (an empty string means delete: cache_aside strategy or a deleted row)
-- Returns: the number of rows whose new state was written through
-- A counter, writers key or row counter of another Redis type, or a counter INCR refuses,
-- is healed as in flush_mark.lua (lua/_prelude.lua): the commit's bump always lands.
bump(KEYS[1], ARGV[6], ARGV[5])
if failed(redis.pcall('ZREM', KEYS[2], ARGV[1])) then
  redis.call('DEL', KEYS[2])
end
if ARGV[4] == '1' then
  bump(KEYS[3], ARGV[6], ARGV[5])
end
local written = 0
local a = 7
for i = 4, #KEYS, 2 do
  local ticket, ttl, state = ARGV[a], ARGV[a + 1], ARGV[a + 2]
  a = a + 3
  -- another writer flushed this row after us: its commit is newer or undecided, so
  -- neither state may be left in the cache
  if state ~= '' and redis.pcall('GET', KEYS[i + 1]) == ticket then
    redis.call('SET', KEYS[i], state, 'PX', ttl)
    written = written + 1
  else
    redis.call('DEL', KEYS[i])
  end
end
redis.call('PUBLISH', ARGV[2], ARGV[3])
return written
