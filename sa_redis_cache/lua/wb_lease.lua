-- Take, renew or release a partition lease; on success, optionally read new entries.
-- KEYS[1]: the lease key
-- KEYS[2]: the partition's stream (used only when reading)
-- ARGV[1]: the owner (worker id)
-- ARGV[2]: lease duration in milliseconds; 0 releases the lease if ARGV[1] holds it
-- ARGV[3]: 0 to only take or renew; n > 0 to also XREADGROUP up to n new entries ('>')
-- ARGV[4]: the consumer group; ARGV[5]: the consumer name
-- Returns: 0 when the lease is someone else's; else 1, or the entries read when ARGV[3] > 0
-- Reading in the same script as the lease check means no worker can be handed new
-- entries of a partition it no longer holds, even after a pause longer than the lease.
local holder = redis.call('GET', KEYS[1])
if ARGV[2] == '0' then
  if holder == ARGV[1] then
    redis.call('DEL', KEYS[1])
  end
  return 1
end
if holder and holder ~= ARGV[1] then
  return 0
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
if ARGV[3] == '0' then
  return 1
end
local got = redis.call('XREADGROUP', 'GROUP', ARGV[4], ARGV[5], 'COUNT', ARGV[3], 'STREAMS', KEYS[2], '>')
if not got then
  return {}
end
return got[1][2]
