-- Flush-time invalidation of one table, run before the database commit.
-- KEYS[1]: the table's version counter
-- KEYS[2]: the table's writers-in-flight set
-- KEYS[3]: the table's entity generation (entity entries are valid only under it)
-- KEYS[4], KEYS[5], ...: pairs of (entity entry, row write counter) for each written row
-- ARGV[1]: the transaction's token (member of the writers set)
-- ARGV[2]: how long the writer mark lives, in milliseconds (a crashed writer's mark expires)
-- ARGV[3]: TTL of the row write counters, in milliseconds
-- ARGV[4]: value to start the version counter, the entity generation or a row write
--          counter at when it does not exist or is unusable (random)
-- ARGV[5]: 1 when the rows written are not known (bulk or textual DML): the entity
--          generation is bumped so that every entity entry of the table becomes a miss
-- ARGV[6]: TTL of the version counter and the generation, in milliseconds
-- Returns: the entity generation, then each row's write ticket (the row counter after
--          INCR, as a string); a write-through commit stores its state only if its ticket
--          is current, and entity entries are valid only under the current counter
-- Bumping the version makes every fill that captured versions before this flush fail
-- its compare-and-set; the mark refuses fills until the commit is done; deleting the
-- entity entries removes what was filled before the mark.
-- A missing counter starts at the random ARGV[4], never at 1: a counter lost and
-- recreated must not come back at a value an old entry was stored under. A counter of
-- another Redis type or that INCR refuses is reseeded the same way (row write counters
-- too), a writers key of another type is replaced by a new set, and a mark scored beyond
-- any writer's is removed (lua/_prelude.lua): a write never fails on what another program
-- left under our keys.
bump(KEYS[1], ARGV[4], ARGV[6])
local now_ms = server_ms()
-- lapsed marks go, and planted far-future ones: the TTL set below would keep those for good
if not prune(KEYS[2], now_ms, MARK_HORIZON_MS) then
  redis.call('DEL', KEYS[2])
end
redis.call('ZADD', KEYS[2], now_ms + tonumber(ARGV[2]), ARGV[1])
redis.call('PEXPIRE', KEYS[2], ARGV[2])
local generation = counter(KEYS[3], ARGV[4], ARGV[6])
if ARGV[5] == '1' then
  bump(KEYS[3], ARGV[4], ARGV[6])
  -- read it back as a string: Lua numbers are doubles and would round a 62-bit value
  generation = redis.call('GET', KEYS[3])
end
redis.call('PEXPIRE', KEYS[3], ARGV[6])
local tickets = {generation}
for i = 4, #KEYS, 2 do
  redis.call('DEL', KEYS[i])
  tickets[#tickets + 1] = bump_get(KEYS[i + 1], ARGV[4], ARGV[3])
end
return tickets
