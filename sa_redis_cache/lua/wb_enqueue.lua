-- Queue one commit's write-behind operations, atomically: every one or none.
-- KEYS[1 .. n]: the entity generation of each of the n tables the commit wrote
-- KEYS[n+1 ..]: per operation, three keys: its partition's stream, its entity entry, its
--          pending key (sa_redis_cache/wb_config.py describes them)
-- ARGV[1]: n, the number of tables
-- ARGV[2]: the codec envelope header that prefixes every stored value
-- ARGV[3]: TTL of a generation counter created here, in milliseconds
-- ARGV[4 .. 3+n]: value to start each table's generation at when it does not exist (random)
-- ARGV[4+n ..]: per operation, five values: its table's index (1-based), 'u' (upsert) or
--          'd' (delete), the row's pk text, the model's schema hash, and the data as JSON:
--          the encoded full row for 'u', the encoded primary key for 'd'
-- Returns: the stream id of each operation, in order; an error naming the key, before
--          anything is written, when a stream key holds another Redis type
-- The entity entry and the pending key get no TTL: an unflushed state must not expire.
-- The worker gives the entity entry its TTL and removes the pending key after the flush.
-- A stream key of another type is never replaced here: the writes queued in the stream it
-- replaced are lost, and an operator must learn that (docs/write-behind.md#hostile-values).
-- Entity entries and pending keys of another type are overwritten by SET: this library
-- stores strings there, so such a key holds no queued write. A generation that is not a
-- counter is reseeded (lua/_prelude.lua).
local n = tonumber(ARGV[1])
local header = ARGV[2]
local checked = {}
for k = n + 1, #KEYS, 3 do
  local stream = KEYS[k]
  if not checked[stream] then
    checked[stream] = true
    local kind = type_of(stream)
    if kind ~= 'stream' and kind ~= 'none' then
      return redis.error_reply('WRONGTYPE write-behind stream ' .. stream .. ' holds a ' .. kind
        .. ', not a stream: nothing was queued. The writes queued in the stream it replaced'
        .. ' are lost; see what wrote it, then delete it (docs/write-behind.md)')
    end
  end
end
local generations = {}
for i = 1, n do
  generations[i] = counter(KEYS[i], ARGV[3 + i], ARGV[3])
end
local ids = {}
local a = 4 + n
for k = n + 1, #KEYS, 3 do
  local t, op, pk, schema, data = tonumber(ARGV[a]), ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4]
  a = a + 5
  local id = redis.call('XADD', KEYS[k], '*', 'o', op, 'k', pk, 'h', schema, 'd', data)
  local body = 'null'
  if op == 'u' then
    body = '[' .. data .. ',0]'
  end
  -- SET without PX also removes a TTL the key had: the state lives until flushed
  redis.call('SET', KEYS[k + 1], header .. '[' .. generations[t] .. ',' .. body .. ']')
  redis.call('SET', KEYS[k + 2], header .. '["' .. id .. '",' .. body .. ']')
  ids[#ids + 1] = id
end
return ids
