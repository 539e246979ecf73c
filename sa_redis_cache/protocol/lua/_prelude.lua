-- Shared helpers, prepended to every script by sa_redis_cache/protocol/scripts.py (no KEYS
-- or ARGV of their own: a helper is told where in them to look).
-- A key of the wrong Redis type, or a counter Redis cannot INCR, is treated as absent and
-- healed, never left to fail every later call: the cache's keys may be overwritten by an
-- operator, another program or an attacker, and a script that errors on them would keep a
-- table uncached, or its writes undelivered, for good (docs/guarantees.md#hostile-values).

-- true when a redis.pcall reply is an error (WRONGTYPE, not an integer, overflow)
local function failed(reply)
  return type(reply) == 'table' and reply.err ~= nil
end

-- Redis's own integer syntax (string2ll): the decimal form of a signed 64-bit integer, with
-- no sign but '-', no leading zero, no space; sa_redis_cache/counters.py reads it the same way
local function is_counter(v)
  if v == '0' then
    return true
  end
  local digits = string.match(v, '^%-?([1-9]%d*)$')
  if not digits or #digits > 19 then
    return false
  end
  if #digits < 19 then
    return true
  end
  if string.byte(v) == 45 then
    return digits <= '9223372036854775808'
  end
  return digits <= '9223372036854775807'
end

-- A counter's value as a string, or false when it is absent; a key of another type or a
-- value that is not a counter is deleted first and counts as absent
local function get_counter(key)
  local v = redis.pcall('GET', key)
  if type(v) == 'string' and is_counter(v) then
    return v
  end
  if v then
    redis.log(redis.LOG_WARNING, 'sa_redis_cache: unusable counter deleted: ' .. key)
    redis.call('DEL', key)
  end
  return false
end

-- get_counter, creating an absent counter at `start` (random, chosen by the client: a
-- counter lost and recreated must never come back at a value an old entry was stored under)
local function counter(key, start, ttl)
  local v = get_counter(key)
  if not v then
    redis.call('SET', key, start, 'PX', ttl)
    v = start
  end
  return v
end

-- INCR a version counter, generation or invalidation counter. An absent one starts at
-- `start`; so does one INCR refuses (another type, not an integer, the largest integer),
-- which is overwritten: every entry and fill validated against the old value then misses
-- or is refused, as after any bump. The new value is not returned: Lua numbers are doubles
-- and would round a 62-bit value (GET it back as a string).
local function bump(key, start, ttl)
  if redis.call('EXISTS', key) == 0 then
    redis.call('SET', key, start)
    redis.call('INCR', key)
  elseif failed(redis.pcall('INCR', key)) then
    redis.log(redis.LOG_WARNING, 'sa_redis_cache: unusable counter reseeded: ' .. key)
    redis.call('SET', key, start)
    redis.call('INCR', key)
  end
  redis.call('PEXPIRE', key, ttl)
end

-- bump, then the counter's new value as a string (for row write counters, whose values
-- entity entries and write-through tickets are compared against)
local function bump_get(key, start, ttl)
  bump(key, start, ttl)
  return redis.call('GET', key)
end

-- The Redis type of a key ('none' when absent)
local function type_of(key)
  return redis.call('TYPE', key)['ok']
end

-- The server's clock in milliseconds (writer marks and holder leases are scored by it)
local function server_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- Remove the members of sorted set `key` scored more than `horizon` ms after `now`. No
-- writer mark or holder lease is ever scored that far ahead (MARK_HORIZON_MS,
-- HOLDER_HORIZON_MS: the longest life plus a clock step), so such a member was planted:
-- honoured, it would refuse every fill of a table, or hold every commit on it, until the
-- year its score names. false when `key` holds another Redis type (the caller heals it).
local function drop_forged(key, now, horizon)
  local gone = redis.pcall('ZREMRANGEBYSCORE', key, '(' .. (now + horizon), '+inf')
  if failed(gone) then
    return false
  end
  if gone > 0 then
    redis.log(redis.LOG_WARNING, 'sa_redis_cache: member scored too far ahead removed: ' .. key)
  end
  return true
end

-- Remove the members of sorted set `key` whose life ended before `now` (a writer or
-- holder that died without leaving) and those drop_forged removes; false when `key`
-- holds another Redis type (the caller heals it)
local function prune(key, now, horizon)
  if not drop_forged(key, now, horizon) then
    return false
  end
  redis.call('ZREMRANGEBYSCORE', key, '-inf', '(' .. now)
  return true
end

-- The Redis type `key` held ('none' when absent); one of another type than `wanted` is
-- deleted (and the deletion logged, naming the key as `what`): the commands meant for
-- `wanted` would fail on it at every call, and the TTL they renew would keep it for good
local function heal_type(key, wanted, what)
  local kind = type_of(key)
  if kind ~= wanted and kind ~= 'none' then
    redis.log(redis.LOG_WARNING, 'sa_redis_cache: unusable ' .. what .. ' deleted: ' .. key)
    redis.call('DEL', key)
  end
  return kind
end

-- true when each of n version counters (KEYS[vkeys + 1 ..]) still holds the value captured
-- before the database read (ARGV[args + 1 ..]) and no writers set (KEYS[wkeys + 1 ..])
-- holds a live mark: a value read from the database is then no older than a committed
-- write. A counter or writers set of another Redis type answers false and is deleted (it
-- holds no mark; the next look captures a fresh value); a mark scored beyond any
-- writer's is removed, not honoured (drop_forged).
local function unchanged_and_unmarked(vkeys, args, wkeys, n)
  for i = 1, n do
    local version = redis.pcall('GET', KEYS[vkeys + i])
    if version ~= ARGV[args + i] then
      if failed(version) then
        redis.call('DEL', KEYS[vkeys + i])
      end
      return false
    end
  end
  local now_ms = server_ms()
  for i = 1, n do
    local key = KEYS[wkeys + i]
    if not drop_forged(key, now_ms, MARK_HORIZON_MS) then
      redis.call('DEL', key)
      return false
    end
    if #redis.call('ZRANGEBYSCORE', key, now_ms, '+inf', 'LIMIT', 0, 1) > 0 then
      return false
    end
  end
  return true
end
