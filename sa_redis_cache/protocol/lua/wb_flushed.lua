-- After a flush transaction committed: make the cache agree with the database, then trim
-- the stream (the trim is the acknowledgement: workers read from the head of the stream).
-- KEYS[1]: the partition's stream
-- KEYS[2]: the table's version counter (bumped: cached queries and fills that read the
--          database before this commit must not store what they read)
-- KEYS[3], KEYS[4], KEYS[5], ...: per flushed row, its pending key, its entity entry and
--          its row write counter
-- ARGV[1]: trim threshold: entries with a smaller id are all applied (XTRIM MINID), or ''
-- ARGV[2]: the codec envelope header
-- ARGV[3]: TTL of the version counter, in milliseconds
-- ARGV[4]: value to start the version counter at when it does not exist (random)
-- ARGV[5]: TTL of the row write counters, in milliseconds
-- ARGV[6]: value to start a row write counter at when it does not exist (random)
-- ARGV[7 ..]: per flushed row, the stream id of its last operation in the batch
-- Returns: the number of rows whose pending key was removed; an error, before anything is
--          written, when the stream key holds another Redis type
-- A pending key naming another id holds a newer queued state: it and its entity entry stay.
-- A pending key naming the flushed entry is removed, with the row's entity entry, and the
-- row write counter moves: the next read fills the entry from the database, which now holds
-- the row. The counter retires the entries this script cannot name: those of another
-- version of the model (another schema hash), filled from the database while the row was
-- queued by a version whose pending key they cannot see (a rolling deploy). Deleting it (rather than
-- writing the flushed state again) costs that read one database round trip, and removes
-- any entry a reader filled from the database while the row was queued (its read saw the
-- row before this flush; it could only store after a pending-key read failed). A fill
-- that read the database before this commit and stores after it is refused by the
-- version bump, which comes first.
-- A stream key of another Redis type is an error before anything is written (the worker
-- keeps the batch and reports it); the version counter is healed by bump (lua/_prelude.lua);
-- a pending key of another type names no id: it and its entity entry stay, like a newer
-- state's (the next enqueue of the row overwrites it).
local call = redis.call
local kind = type_of(KEYS[1])
if kind ~= 'stream' and kind ~= 'none' then
  return redis.error_reply('WRONGTYPE write-behind stream ' .. KEYS[1] .. ' holds a ' .. kind
    .. ', not a stream: the batch was applied and is not trimmed')
end
bump(KEYS[2], ARGV[4], ARGV[3])
local opening = ARGV[2] .. '["'
local a = 7
local cleared = 0
for i = 3, #KEYS, 3 do
  local expected = opening .. ARGV[a] .. '",'
  a = a + 1
  -- only the head of the value: the stream id it names (GETRANGE of a missing key is '')
  local pending = redis.pcall('GETRANGE', KEYS[i], 0, #expected - 1)
  if pending == expected then
    call('DEL', KEYS[i], KEYS[i + 1])
    bump(KEYS[i + 2], ARGV[6], ARGV[5])
    cleared = cleared + 1
  end
end
if ARGV[1] ~= '' then
  call('XTRIM', KEYS[1], 'MINID', ARGV[1])
end
return cleared
