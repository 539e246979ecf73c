-- After a flush transaction committed: make the cache agree with the database, ack, trim.
-- KEYS[1]: the partition's stream
-- KEYS[2]: the table's version counter (bumped: cached queries must see the flushed rows)
-- KEYS[3]: the table's entity generation
-- KEYS[4], KEYS[5], KEYS[6], ...: per flushed row, its pending key, its entity entry and
--          its row write counter
-- ARGV[1]: the consumer group
-- ARGV[2]: trim threshold: entries with a smaller id are all applied (XTRIM MINID), or ''
-- ARGV[3]: TTL of the flushed entity entries, in milliseconds
-- ARGV[4]: the codec envelope header
-- ARGV[5]: TTL of the version counter, in milliseconds
-- ARGV[6]: value to start the version counter at when it does not exist (random)
-- ARGV[7]: TTL of the row write counters, in milliseconds
-- ARGV[8]: value to start a row write counter at when it does not exist (random)
-- ARGV[9]: m, the number of entry ids to acknowledge, then those m ids
-- ARGV[10+m]: one letter per flushed row, in KEYS order: 'a' when its last operation in
--          the batch was applied, 'x' when it went to the dead letters (the database kept
--          its row)
-- ARGV[11+m ..]: per flushed row, the stream id of its last operation in the batch
-- Returns: the number of rows whose pending key was removed; an error, before anything is
--          written, when the stream key holds another Redis type
-- A pending key naming another id holds a newer queued state: it and its entity entry stay.
-- The pending key of an applied operation holds header .. '["<id>",' .. body .. ']', where
-- body is the state the database now has ('[row,0]', or 'null' for a delete), then the
-- signature trailer when the cache signs: the entity entry is written from it under the
-- current generation and the row's moved write counter (the row is not sent again); the
-- trailer covers the body alone, bound to the entity key, so it stays valid there
-- (sa_redis_cache/signing.py).
-- A stream key of another Redis type is an error before anything is written (the worker
-- keeps the batch and reports it); the version and row write counters are healed by bump,
-- a generation that is not a counter counts as absent (lua/_prelude.lua); a pending key of
-- another type names no id: it and its entity entry stay, like a newer state's (the next
-- enqueue of the row overwrites it).
local call, sub, byte = redis.call, string.sub, string.byte
local kind = type_of(KEYS[1])
if kind ~= 'stream' and kind ~= 'none' then
  return redis.error_reply('WRONGTYPE write-behind stream ' .. KEYS[1] .. ' holds a ' .. kind
    .. ', not a stream: the batch was applied and is not acknowledged')
end
bump(KEYS[2], ARGV[6], ARGV[5])
local header, ttl = ARGV[4], ARGV[3]
local generation = get_counter(KEYS[3])
local m = tonumber(ARGV[9])
local kinds = ARGV[10 + m]
local applied = byte('a')
local opening = header .. '["'
local a = 11 + m
local row = 0
local cleared = 0
for i = 4, #KEYS, 3 do
  row = row + 1
  local expected = opening .. ARGV[a] .. '",'
  a = a + 1
  local pending = redis.pcall('GET', KEYS[i])
  if type(pending) == 'string' and sub(pending, 1, #expected) == expected then
    call('DEL', KEYS[i])
    cleared = cleared + 1
    local writes = bump_get(KEYS[i + 2], ARGV[8], ARGV[7])
    if generation and byte(kinds, row) == applied then
      local stamp = '[[' .. generation .. ',' .. writes .. '],'
      call('SET', KEYS[i + 1], header .. stamp .. sub(pending, #expected + 1), 'PX', ttl)
    else
      call('DEL', KEYS[i + 1])
    end
  end
end
if m > 0 then
  call('XACK', KEYS[1], ARGV[1], unpack(ARGV, 10, 9 + m))
end
if ARGV[2] ~= '' then
  call('XTRIM', KEYS[1], 'MINID', ARGV[2])
end
return cleared
