-- A miss's first look and its fill lease in one round trip: read an entry with the keys
-- it is validated against and, when the entry is absent, ask for its fill lease at once
-- (the lease and the look are atomic: no fill can land between them, so no second look
-- is needed before the database read).
-- KEYS[1]:      the entry key
-- KEYS[2]:      the entry's fill lease
-- KEYS[3 .. n]: the keys read with the entry (its invalidation counter, version counters)
-- ARGV[1]: the caller's lease token
-- ARGV[2]: the lease's TTL in milliseconds
-- Returns: the values of KEYS[1] and KEYS[3 .. n] as MGET returns them (nil for a missing
--          key or one of another type), then 1 when the lease is the caller's, else 0
local read = {KEYS[1]}
for i = 3, #KEYS do
  read[#read + 1] = KEYS[i]
end
local got = redis.call('MGET', unpack(read))
local leased = 0
if not got[1] and redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then
  leased = 1
end
got[#got + 1] = leased
return got
