--[[
  Flag a session for compaction now (operator: "compact" a session, or "requeue" a dead one).
  Input:
    KEYS[1] shard queue      <prefix>:{<shard>}:q
    KEYS[2] meta hash        <prefix>:{<shard>}:s:<sid>:meta
    KEYS[3] shard dead set   <prefix>:{<shard>}:dead
    ARGV[1] session id
    ARGV[2] wake-up channel
    ARGV[3] "dead" = only a session in the dead-letter state, "any" = any session not running,
            "force" = as "any", and mark it (meta force = 1) so that the daemon folds all but
            the kept recent turns even if the session fits its target,
            "lost" = only a session in state "queued" that has no queue entry (its queue was
            evicted: the daemon's sweep repairs it)
  Output:
    1  queued (attempts reset, wake-up published)
    0  not queued: running, already queued, or (ARGV[3] "dead") not dead, or (ARGV[3]
       "lost") not a queued session without its queue entry
    error "CS_NOSESSION ..."  the session does not exist
    error "CS_BADARG ..."     malformed ARGV
]]
local queue, meta, dead = KEYS[1], KEYS[2], KEYS[3]
local sid, channel, which = ARGV[1], ARGV[2], ARGV[3]
if sid == '' or (which ~= 'dead' and which ~= 'any' and which ~= 'force'
    and which ~= 'lost') then
  return redis.error_reply('CS_BADARG requeue: malformed arguments')
end
local state = redis.call('HGET', meta, 'state')
if not state then
  return redis.error_reply('CS_NOSESSION session ' .. sid .. ' does not exist')
end
if which == 'lost' then
  if state ~= 'queued' or redis.call('ZSCORE', queue, sid) then
    return 0
  end
elseif state == 'running' or state == 'queued' or (which == 'dead' and state ~= 'dead') then
  return 0
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', queue, now, sid)
redis.call('HSET', meta, 'state', 'queued', 'queued_at', now, 'attempts', 0)
redis.call('HDEL', meta, 'dead_at', 'reflag_above')
if which == 'force' then
  redis.call('HSET', meta, 'force', 1)
end
redis.call('ZREM', dead, sid)
redis.call('PUBLISH', channel, sid)
return 1
