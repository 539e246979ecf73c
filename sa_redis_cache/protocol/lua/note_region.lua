-- Record the table whose version retires a FromCache region's entries (reads/regions.py).
-- KEYS[1]: the region's set of tables
-- ARGV[1]: the table's name
-- ARGV[2]: the set's TTL in milliseconds
-- Returns: 1
-- A key of another Redis type is deleted first: SADD failed on it at every read of the
-- region, and the PEXPIRE sent with it kept it alive.
heal_type(KEYS[1], 'set', 'region set')
redis.call('SADD', KEYS[1], ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
