-- Queue one commit's write-behind operations, atomically: every one or none.
-- KEYS[1 .. n]: the entity generation of each of the n tables the commit wrote
-- KEYS[n+1 ..]: per operation, four keys: its partition's stream, its entity entry, its
--          pending key (sa_redis_cache/wb_config.py describes them), its row write counter
-- ARGV[1]: n, the number of tables
-- ARGV[2]: the codec envelope header that prefixes every stored value
-- ARGV[3]: TTL of a generation counter created here, in milliseconds
-- ARGV[4]: TTL of the row write counters, in milliseconds
-- ARGV[5]: value to start a row write counter at when it does not exist (random)
-- ARGV[6 .. 5+n]: value to start each table's generation at when it does not exist (random)
-- ARGV[6+n ..]: per operation, seven values: its table's index (1-based), 'u' (upsert) or
--          'd' (delete), the row's pk text as a JSON string, the model's schema hash, the
--          data as JSON (the encoded full row for 'u', the encoded primary key for 'd'),
--          the trailer to append to both values ('' when the cache does not sign:
--          sa_redis_cache/signing.py), and '' or ',' followed by the JSON object naming the
--          row's JSON columns whose None is no JSON null
--          (sa_redis_cache/strategies/write_behind/nulls.py)
-- Each stream entry has one field, 'e': the JSON array [op, pk text, schema hash, data],
-- with that object as a fifth element when there is one (one value per entry: the worker
-- reads and parses one string per operation).
-- Returns: the stream id of each operation, in order; an error naming the key, before
--          anything is written, when a stream key holds another Redis type
-- The entity entry and the pending key get no TTL: an unflushed state must not expire.
-- The worker gives the entity entry its TTL and removes the pending key after the flush.
-- The row write counter moves: entity entries of the row in other scopes (and any filled
-- from the database before this commit) are no longer valid.
-- A stream key of another type is never replaced here: the writes queued in the stream it
-- replaced are lost, and an operator must learn that (docs/write-behind.md#hostile-values).
-- Entity entries and pending keys of another type are overwritten by SET: this library
-- stores strings there, so such a key holds no queued write. A generation or row write
-- counter that is not a counter is reseeded (lua/_prelude.lua).
local n = tonumber(ARGV[1])
local header = ARGV[2]
local checked = {}
for k = n + 1, #KEYS, 4 do
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
  generations[i] = counter(KEYS[i], ARGV[5 + i], ARGV[3])
end
local ids = {}
local a = 6 + n
for k = n + 1, #KEYS, 4 do
  local t, op, pk, schema, data = tonumber(ARGV[a]), ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4]
  local trailer, nulls = ARGV[a + 5], ARGV[a + 6]
  a = a + 7
  local entry = '["' .. op .. '",' .. pk .. ',"' .. schema .. '",' .. data .. nulls .. ']'
  local id = redis.call('XADD', KEYS[k], '*', 'e', entry)
  local body = 'null'
  if op == 'u' then
    body = '[' .. data .. ',0]'
  end
  local writes = bump_get(KEYS[k + 3], ARGV[5], ARGV[4])
  -- SET without PX also removes a TTL the key had: the state lives until flushed
  local stamp = '[[' .. generations[t] .. ',' .. writes .. '],'
  redis.call('SET', KEYS[k + 1], header .. stamp .. body .. ']' .. trailer)
  redis.call('SET', KEYS[k + 2], header .. '["' .. id .. '",' .. body .. ']' .. trailer)
  ids[#ids + 1] = id
end
return ids
