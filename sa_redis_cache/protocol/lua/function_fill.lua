-- Compare-and-set fill of a cache.cached function's entry (sa_redis_cache/cached_functions.py).
-- Every value under a function's key begins with its generation: an entry is
-- '\1G' .. generation (16 bytes) .. result, a tombstone left by invalidate() (lua/
-- function_invalidate.lua) is '\1T' .. generation. The caller read the generation before
-- it called the function; invalidate() puts a new random one in place, so a call that
-- read the database before an invalidate() cannot store what it read after it.
-- KEYS[1]: the entry key
-- ARGV[1]: TTL in milliseconds
-- ARGV[2]: the encoded entry
-- ARGV[3]: the generation the caller's look found, read as below
-- Returns: 1 when stored; 0 when the generation moved since the caller's look

-- The 16 bytes after an entry's or a tombstone's two-byte header; sixteen '0' when the key
-- is absent; '?' for anything else (garbage, another Redis type: the fill replaces it).
-- cached_functions.generation_of reads a value the same way.
local function generation(key)
  local v = redis.pcall('GET', key)
  if not v then
    return '0000000000000000'
  end
  if type(v) ~= 'string' then
    return '?'
  end
  local head = string.sub(v, 1, 2)
  if (head == '\1G' or head == '\1T') and #v >= 18 then
    return string.sub(v, 3, 18)
  end
  return '?'
end

if generation(KEYS[1]) ~= ARGV[3] then
  return 0
end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[1])
return 1
