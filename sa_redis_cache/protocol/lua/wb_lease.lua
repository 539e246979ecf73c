-- Take, renew or release a partition lease; on success, optionally read new entries.
-- KEYS[1]: the lease key
-- KEYS[2]: the partition's stream (its type checked when taking or renewing, read when
--          ARGV[3] > 0)
-- ARGV[1]: the owner (worker id)
-- ARGV[2]: lease duration in milliseconds; 0 releases the lease if ARGV[1] holds it
-- ARGV[3]: 0 to only take or renew; n > 0 to also XREADGROUP up to n new entries ('>')
-- ARGV[4]: the consumer group; ARGV[5]: the consumer name
-- Returns: 0 when the lease is someone else's; -1 when the stream key holds another Redis
--          type (nothing taken: the worker reports it, and the other partitions go on);
--          else 1, or the entries read when ARGV[3] > 0
-- Reading in the same script as the lease check means no worker can be handed new
-- entries of a partition it no longer holds, even after a pause longer than the lease.
-- A lease key of another type, or one without an expiry (every lease is set with one), is
-- foreign: it is taken over rather than blocking the partition for good.
local holder = redis.pcall('GET', KEYS[1])
if failed(holder) then
  holder = false
end
if ARGV[2] == '0' then
  if holder == ARGV[1] then
    redis.call('DEL', KEYS[1])
  end
  return 1
end
if holder and holder ~= ARGV[1] and redis.call('PTTL', KEYS[1]) ~= -1 then
  return 0
end
local kind = type_of(KEYS[2])
if kind ~= 'stream' and kind ~= 'none' then
  return -1
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
