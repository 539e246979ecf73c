-- Take, renew or release a partition lease.
-- KEYS[1]: the lease key
-- KEYS[2]: the partition's stream (its type checked when taking)
-- ARGV[1]: 'take': take the lease when it is free, foreign, ours, or held by an earlier
--          worker of the same consumer name (a replacement resumes at once); 'renew': extend
--          it only while it is ours (the heartbeat); 'release': delete it if it is ours
-- ARGV[2]: the owner: this worker's instance id, a space, its consumer name
-- ARGV[3]: the consumer name
-- ARGV[4]: lease duration in milliseconds
-- Returns: 0 when another worker holds the lease (or, to 'renew', when it is not ours);
--          -1 when the stream key holds another Redis type (nothing taken: the worker
--          reports it, and the other partitions go on); else 1
-- The lease only says who should read the partition: which worker may apply what is
-- decided by the fencing token in Postgres (sarc_wb_offsets.lease_token). The worker reads
-- the stream's head (XRANGE) in the same round trip as this call, and keeps what it read
-- only when this call returned 1.
-- A lease key of another type, or one without an expiry (every lease is set with one), is
-- foreign: it is taken over rather than blocking the partition for good.
local mode, me, name, ms = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local owner = redis.pcall('GET', KEYS[1])
if failed(owner) then
  owner = false
end
if mode == 'release' then
  if owner == me then
    redis.call('DEL', KEYS[1])
  end
  return 1
end
if mode == 'renew' then
  if owner ~= me then
    return 0
  end
  redis.call('PEXPIRE', KEYS[1], ms)
  return 1
end
if owner and owner ~= me and string.match(owner, '^[^ ]+ (.*)$') ~= name
    and redis.call('PTTL', KEYS[1]) ~= -1 then
  return 0
end
local kind = type_of(KEYS[2])
if kind ~= 'stream' and kind ~= 'none' then
  return -1
end
if owner == me then
  redis.call('PEXPIRE', KEYS[1], ms)
else
  redis.call('SET', KEYS[1], me, 'PX', ms)
end
return 1
