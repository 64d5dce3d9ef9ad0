--[[
  Look at one shard for the daemon's sweep: is anything due, has any lease expired?
  Input:
    KEYS[1] shard queue      <prefix>:{<shard>}:q
    KEYS[2] shard running    <prefix>:{<shard>}:run
    KEYS[3] shard dead set   <prefix>:{<shard>}:dead
    ARGV    none
  Output:
    {due, queued, oldest queued score (ms, 0 if none), expired leases, running, dead, now}
      due      queued sessions whose score (flag time or backoff deadline) has passed
      expired  running sessions whose lease deadline has passed
      now      the server's clock (ms) the scores were compared with; 0 for an idle shard
]]
if redis.call('EXISTS', KEYS[1], KEYS[2], KEYS[3]) == 0 then
  return {0, 0, 0, 0, 0, 0, 0}  -- the common case of an idle shard: one command
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return {
  redis.call('ZCOUNT', KEYS[1], '-inf', now),
  redis.call('ZCARD', KEYS[1]),
  tonumber(oldest[2]) or 0,
  redis.call('ZCOUNT', KEYS[2], '-inf', now),
  redis.call('ZCARD', KEYS[2]),
  redis.call('ZCARD', KEYS[3]),
  now,
}
