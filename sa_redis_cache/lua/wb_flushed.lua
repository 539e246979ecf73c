-- After a flush transaction committed: make the cache agree with the database, ack, trim.
-- KEYS[1]: the partition's stream
-- KEYS[2]: the table's version counter (bumped: cached queries must see the flushed rows)
-- KEYS[3]: the table's entity generation
-- KEYS[4], KEYS[5], ...: per flushed row, its pending key and its entity entry
-- ARGV[1]: the consumer group
-- ARGV[2]: trim threshold: entries with a smaller id are all applied (XTRIM MINID), or ''
-- ARGV[3]: TTL of the flushed entity entries, in milliseconds
-- ARGV[4]: the codec envelope header
-- ARGV[5]: TTL of the version counter, in milliseconds
-- ARGV[6]: value to start the version counter at when it does not exist (random)
-- ARGV[7]: m, the number of entry ids to acknowledge, then those m ids
-- ARGV[8+m ..]: per flushed row, two values: the stream id of its last operation in the
--          batch, and the row's data ('u' plus the encoded row, 'd' for a delete, or 'x'
--          when the operation went to the dead letters and the database kept its row)
-- Returns: the number of rows whose pending key was removed
-- A pending key naming another id holds a newer queued state: it and its entity entry stay.
redis.call('SET', KEYS[2], ARGV[6], 'NX', 'PX', ARGV[5])
redis.call('INCR', KEYS[2])
redis.call('PEXPIRE', KEYS[2], ARGV[5])
local header = ARGV[4]
local generation = redis.call('GET', KEYS[3])
local m = tonumber(ARGV[7])
local a = 8 + m
local cleared = 0
for i = 4, #KEYS, 2 do
  local id, data = ARGV[a], ARGV[a + 1]
  a = a + 2
  local pending = redis.call('GET', KEYS[i])
  local expected = header .. '["' .. id .. '",'
  if pending and string.sub(pending, 1, #expected) == expected then
    redis.call('DEL', KEYS[i])
    cleared = cleared + 1
    local kind = string.sub(data, 1, 1)
    if generation and kind ~= 'x' then
      local body = 'null'
      if kind == 'u' then
        body = '[' .. string.sub(data, 2) .. ',0]'
      end
      redis.call('SET', KEYS[i + 1], header .. '[' .. generation .. ',' .. body .. ']', 'PX', ARGV[3])
    else
      redis.call('DEL', KEYS[i + 1])
    end
  end
end
if m > 0 then
  redis.call('XACK', KEYS[1], ARGV[1], unpack(ARGV, 8, 7 + m))
end
if ARGV[2] ~= '' then
  redis.call('XTRIM', KEYS[1], 'MINID', ARGV[2])
end
return cleared
