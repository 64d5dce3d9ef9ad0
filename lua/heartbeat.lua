#!lua flags=allow-oom
--[[
  Extend a compaction lease, only while the caller still holds it (its token matches).
  Flags: allow-oom: it runs when Redis memory is full (compaction is what frees memory); its
  writes are a few small fields. Without flags (Redis 6.2) Redis refuses only a script's first
  write that may grow memory, so its first write frees (HDEL).
  Input:
    KEYS[1] shard running    <prefix>:{<shard>}:run
    KEYS[2] meta hash        <prefix>:{<shard>}:s:<sid>:meta
    ARGV[1] session id
    ARGV[2] lease token
    ARGV[3] lease length (ms) from now (an integer in 1..2^53-1)
  Output:
    {1, new lease deadline (ms)}  extended
    {0}  the lease was lost (past its deadline, reaped, or taken over): stop, do not swap
    error "CS_BADARG ..."  malformed ARGV
]]
local running, meta = KEYS[1], KEYS[2]
local sid, token, lease_ms = ARGV[1], ARGV[2], tonumber(ARGV[3])
if not sid or sid == '' or not token or token == '' or not (lease_ms and lease_ms >= 1
    and lease_ms <= 9007199254740991 and lease_ms % 1 == 0) then
  return redis.error_reply('CS_BADARG heartbeat: malformed arguments')
end
local score = redis.call('ZSCORE', running, sid)
if redis.call('HGET', meta, 'lease') ~= token or not score then
  return {0}
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
-- A lease past its deadline is lost even before a sweep reaps it: a late heartbeat (one a
-- frozen server runs when continued, after its sender gave up) must not revive it.
if tonumber(score) < now then
  return {0}
end
local deadline = now + lease_ms
redis.call('HDEL', meta, 'lease_deadline')  -- first write frees: see Flags above
redis.call('ZADD', running, deadline, sid)
redis.call('HSET', meta, 'lease_deadline', deadline)
return {1, deadline}
