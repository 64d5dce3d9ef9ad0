#!lua flags=allow-oom
--[[
  Take back an expired compaction lease (its daemon died or stalled): the session goes back to
  its queue with attempts + 1, or to the dead-letter state once attempts reach the maximum.
  The caller picks the candidate (ZRANGEBYSCORE on the running set) so every key is in KEYS.
  Flags: allow-oom: it runs when Redis memory is full (compaction is what frees memory); its
  writes are a few small fields. Without flags (Redis 6.2) Redis refuses only a script's first
  write that may grow memory, so its first write frees (ZREM).
  Input:
    KEYS[1] shard queue      <prefix>:{<shard>}:q
    KEYS[2] shard running    <prefix>:{<shard>}:run
    KEYS[3] meta hash        <prefix>:{<shard>}:s:<sid>:meta
    KEYS[4] shard dead set   <prefix>:{<shard>}:dead
    ARGV[1] session id
    ARGV[2] maximum attempts (an integer in 1..2^53-1)
  Output:
    {1, new state ("queued" or "dead")}  reaped
    {0}   the lease has not expired (or the session is not running)
    {-1}  the session no longer exists; its stale entry was removed
    error "CS_BADARG ..."  malformed ARGV
]]
local queue, running, meta, dead = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local sid, max_attempts = ARGV[1], tonumber(ARGV[2])
if not sid or sid == ''
    or not (max_attempts and max_attempts >= 1 and max_attempts <= 9007199254740991
      and max_attempts % 1 == 0) then
  return redis.error_reply('CS_BADARG reap: malformed arguments')
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local deadline = tonumber(redis.call('ZSCORE', running, sid))
if not deadline or deadline > now then
  return {0}
end
redis.call('ZREM', running, sid)
if redis.call('EXISTS', meta) == 0 then
  return {-1}
end
local attempts = redis.call('HINCRBY', meta, 'attempts', 1)
redis.call('HINCRBY', meta, 'lease_expiries', 1)
redis.call('HDEL', meta, 'lease', 'lease_deadline')
redis.call('HSET', meta, 'last_error', 'lease expired')
local state = 'queued'
if attempts >= max_attempts then
  state = 'dead'
  redis.call('HSET', meta, 'state', state, 'dead_at', now)
  redis.call('ZADD', dead, now, sid)
else
  redis.call('ZADD', queue, now, sid)
  redis.call('HSET', meta, 'state', state)
end
return {1, state}
