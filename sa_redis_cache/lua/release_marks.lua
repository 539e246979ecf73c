-- Remove one transaction's writer mark after a rollback.
-- KEYS[1]: the table's writers-in-flight set
-- ARGV[1]: the transaction's token
-- Returns: 1 when a mark was removed
return redis.call('ZREM', KEYS[1], ARGV[1])
