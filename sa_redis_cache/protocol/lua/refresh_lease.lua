-- Take an entry's fill lease to refresh it (early refresh, stale_ttl), unless the entry is
-- no longer the one the caller's look read: another caller refreshed it in between, and
-- a second refresh would send the same query to the database again.
-- KEYS[1]: the entry key
-- KEYS[2]: the entry's fill lease
-- ARGV[1]: the caller's lease token
-- ARGV[2]: the lease's TTL in milliseconds
-- ARGV[3]: SHA1 (hex) of the entry as the caller's look read it
-- Returns: 1 when the lease is the caller's; 0 when another caller holds it; -1 when the
--          entry changed since the look (the caller serves what it read, which was valid)
-- An entry that is gone (expired, evicted, deleted by a write) or of another Redis type
-- does not stop the refresh: no other caller has stored a newer one.
local entry = redis.pcall('GET', KEYS[1])
if type(entry) == 'string' and redis.sha1hex(entry) ~= ARGV[3] then
  return -1
end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return 1
end
return 0
